"""The tiny processor of the embedded default: locally built tokenizers, a SigLIP image processor and a
Whisper feature extractor at small sizes, saved in the real checkpoint layout (no hub here)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from transformers import WhisperFeatureExtractor

from r1omni_ray.data.processor import OmniProcessor, siglip_image_processor_class
from r1omni_ray.model.towers import BERT_SUBDIR
from r1omni_ray.tiny.synthetic import SYNTHETIC_VOCAB_TEXTS
from r1omni_ray.tiny.tokenizer import build_tiny_bert_tokenizer, build_tiny_tokenizer


def make_tiny_processor(
    out_dir: str | os.PathLike,
    corpus: Iterable[str] = (),
    image_size: int = 32,
    num_mel_bins: int = 16,
    audio_seconds: float = 2.0,
    num_frames: int = 4,
) -> OmniProcessor:
    """Build tiny tokenizers + SiglipImageProcessor(size=image_size, mean/std 0.5) +
    WhisperFeatureExtractor(feature_size=num_mel_bins, chunk_length=audio_seconds, 16 kHz), save
    them in the checkpoint layout under ``out_dir`` and return the processor.  The synthetic
    reasoning vocabulary is always included.  ``audio_seconds`` must be a whole number (Whisper's
    chunk_length); features are then ``[num_mel_bins, audio_seconds * 100]``."""
    if float(audio_seconds) != int(audio_seconds) or int(audio_seconds) <= 0:
        raise ValueError(f"audio_seconds must be a positive whole number of seconds, got {audio_seconds}")
    chunk = int(audio_seconds)
    out = Path(out_dir)
    texts = list(SYNTHETIC_VOCAB_TEXTS) + [str(c) for c in corpus]
    tokenizer = build_tiny_tokenizer(out, texts)
    bert = build_tiny_bert_tokenizer(out / BERT_SUBDIR, texts)
    image_processor = siglip_image_processor_class()(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    feature_extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, chunk_length=chunk, sampling_rate=16000)
    proc = OmniProcessor(
        tokenizer, image_processor, feature_extractor, bert,
        num_frames=num_frames, max_audio_seconds=float(chunk),
    )
    proc.save_pretrained(out)
    return proc
