"""Prompt building, placeholder tokenisation and the omni (video + audio + text) processor.

Checkpoint layout (what :meth:`OmniProcessor.save_pretrained` writes and
:meth:`OmniProcessor.from_pretrained` reads)::

    ckpt_dir/                   chat tokenizer (tokenizer.json, tokenizer_config.json, ...)
    ckpt_dir/config.json        model config (written by the model code); key read here: "num_frames"
    ckpt_dir/vision_tower/      SiglipImageProcessor (preprocessor_config.json)
    ckpt_dir/audio_tower/       WhisperFeatureExtractor (preprocessor_config.json)
    ckpt_dir/bert/              BERT tokenizer for the question gate
    ckpt_dir/omni_processor.json  num_frames / max_audio_seconds (ours)

The tower folders are found as the model loader finds them (r1omni_ray.model.towers): the run config's
override, else config.json's "mm_vision_tower" / "mm_audio_tower" / "text_model_path", else the default
sub-folder, relative paths against ckpt_dir.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from r1omni_ray.data.audio import load_audio_features
from r1omni_ray.data.prompts import build_prompt
from r1omni_ray.data.records import OmniRecord
from r1omni_ray.data.video import load_video_frames
from r1omni_ray.labels import AUDIO_TOKEN, AUDIO_TOKEN_INDEX, VIDEO_TOKEN, VIDEO_TOKEN_INDEX
from r1omni_ray.model.towers import AUDIO_SUBDIR, BERT_SUBDIR, VISION_SUBDIR, TowerPaths, resolve_tower_dirs

PROCESSOR_CONFIG = "omni_processor.json"
DEFAULT_NUM_FRAMES = 8

_PLACEHOLDER_SPLIT = re.compile(f"({re.escape(VIDEO_TOKEN)}|{re.escape(AUDIO_TOKEN)})")
_PLACEHOLDER_IDS = {VIDEO_TOKEN: VIDEO_TOKEN_INDEX, AUDIO_TOKEN: AUDIO_TOKEN_INDEX}


def siglip_image_processor_class():
    """SiglipImageProcessor, or its PIL backend on transformers>=5 without torchvision (same
    outputs, avoids the fallback warning)."""
    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, "SiglipImageProcessorPil"):
        return transformers.SiglipImageProcessorPil
    return transformers.SiglipImageProcessor


def _encode(text: str, tokenizer) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids)


def tokenize_with_placeholders(text: str, tokenizer) -> list[int]:
    """Tokenise ``text`` piecewise around ``<video>``/``<audio>`` and put VIDEO_TOKEN_INDEX (-201)
    / AUDIO_TOKEN_INDEX (-202) at the placeholder positions (HumanOmni's scheme)."""
    ids: list[int] = []
    for piece in _PLACEHOLDER_SPLIT.split(text):
        if piece in _PLACEHOLDER_IDS:
            ids.append(_PLACEHOLDER_IDS[piece])
        elif piece:
            ids.extend(_encode(piece, tokenizer))
    return ids


def prompt_modalities(inputs: Any) -> tuple[bool, bool]:
    """(video, audio): which media a processed prompt carries (after split_media too): its ``media_kinds``, or
    for HumanOmni prompts its placeholder ids."""
    kinds = getattr(inputs, "media_kinds", None)
    if kinds is not None:
        return kinds
    ids = set(inputs.prompt_ids)
    return VIDEO_TOKEN_INDEX in ids, AUDIO_TOKEN_INDEX in ids


@dataclass
class PromptMedia:
    """The heavy part of a processed prompt: what travels by object reference, never through the driver.
    For a frozen tower it is the tower's output (computed once, on the rollout worker) instead of its raw
    input; see ModelConfig.ship_frozen_tower_features."""

    pixel_values: torch.Tensor | None
    audio_features: torch.Tensor | None
    vision_feats: torch.Tensor | None = None
    audio_feats: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.pixel_values, self.audio_features, self.vision_feats, self.audio_feats)
                if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass
class OmniInputs:
    record_id: str
    prompt_ids: list[int]
    pixel_values: torch.Tensor | None  # [T, 3, H, W] float32
    audio_features: torch.Tensor | None  # [n_mels, frames] float32
    bert_input_ids: list[int]
    label: str
    solution: str
    response: str | None = None
    prompt: str = ""  # the rendered prompt text (with the <video>/<audio> placeholders)
    vision_feats: torch.Tensor | None = None  # a frozen vision tower's output, in place of pixel_values
    audio_feats: torch.Tensor | None = None  # a frozen audio tower's pooled output, in place of audio_features
    # Families with multi-axis rotary positions (Qwen2.5-Omni's TMRoPE): [axes, len(prompt_ids)] long; None for
    # plain 1-D positions. And the video's (t, h, w) patch grid, which that family's vision tower needs.
    positions: torch.Tensor | None = None
    video_grid_thw: tuple[int, int, int] | None = None
    # (video, audio) the prompt carries, for families whose placeholders are not HumanOmni's negative ids
    media_kinds: tuple[bool, bool] | None = None

    def split_media(self) -> tuple[OmniInputs, PromptMedia]:
        """(these inputs without their tensors, the tensors)."""
        media = PromptMedia(self.pixel_values, self.audio_features, self.vision_feats, self.audio_feats)
        return replace(self, pixel_values=None, audio_features=None, vision_feats=None, audio_feats=None), media

    def with_media(self, media: PromptMedia | None) -> OmniInputs:
        if media is None:
            return self
        return replace(self, pixel_values=media.pixel_values, audio_features=media.audio_features,
                       vision_feats=media.vision_feats, audio_feats=media.audio_feats)

    def with_tower_features(self, vision: torch.Tensor | None, audio: torch.Tensor | None) -> OmniInputs:
        """These inputs with the given tower outputs in place of their raw media (None keeps the raw one)."""
        out = self
        if vision is not None:
            out = replace(out, pixel_values=None, vision_feats=vision)
        if audio is not None:
            out = replace(out, audio_features=None, audio_feats=audio)
        return out


class OmniProcessor:
    """Turns an :class:`OmniRecord` into model inputs (prompt ids with placeholders, frames,
    Whisper features, BERT gate ids), as R1-Omni's trainer (``input_style="trainer"``) or its
    inference path (``"inference"``) builds them (see r1omni_ray.data.prompts)."""

    def __init__(
        self,
        tokenizer,
        image_processor,
        feature_extractor,
        bert_tokenizer,
        num_frames: int = DEFAULT_NUM_FRAMES,
        max_audio_seconds: float | None = None,
        input_style: str = "trainer",
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.feature_extractor = feature_extractor
        self.bert_tokenizer = bert_tokenizer
        self.num_frames = int(num_frames)
        self.max_audio_seconds = max_audio_seconds
        self.input_style = input_style
        # Where the Whisper features' STFT runs: a rollout worker with a GPU sets "cuda".
        self.feature_device = "cpu"
        # process() runs on several threads (data/media_decoder.py): the media decode in parallel, the
        # tokenisers one at a time (a fast tokenizer whose truncation setting changes is mutably borrowed and
        # raises "Already borrowed" under concurrent calls; not seen here, where it never changes: cheap insurance).
        self._text_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------
    def build_prompt(self, question: str, use_video: bool = True, use_audio: bool = True) -> str:
        return build_prompt(question, self.tokenizer, self.input_style, use_video, use_audio).prompt

    def process(self, record: OmniRecord, use_video: bool = True, use_audio: bool = True) -> OmniInputs:
        """Load and preprocess one record.  Media problems raise MediaError (naming the file)."""
        use_video = use_video and record.video is not None
        use_audio = use_audio and record.audio is not None
        with self._text_lock:
            text = build_prompt(record.question, self.tokenizer, self.input_style, use_video, use_audio)
            prompt_ids = tokenize_with_placeholders(text.prompt, self.tokenizer)
        # The trainer pads frames to squares (aspect_ratio="pad"); the inference path does not.
        pad = self.input_style == "trainer"
        pixel_values = (
            load_video_frames(record.video, self.num_frames, self.image_processor, pad=pad) if use_video else None
        )
        feats = (
            load_audio_features(record.audio, self.feature_extractor, self.max_audio_seconds, self.feature_device)
            if use_audio
            else None
        )
        # Both reference paths truncate at the BERT tokenizer's own model_max_length (512 for bert-base).
        with self._text_lock:
            bert_ids = self.bert_tokenizer(text.bert_text, truncation=True)["input_ids"]
        return OmniInputs(
            record_id=record.id,
            prompt_ids=prompt_ids,
            pixel_values=pixel_values,
            audio_features=feats,
            bert_input_ids=list(bert_ids),
            label=record.label,
            solution=record.solution,
            response=record.response,
            prompt=text.prompt,
        )

    def response_ids(self, text: str) -> list[int]:
        """Completion token ids + eos (SFT target for the assistant turn)."""
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("tokenizer has no eos token")
        return _encode(text, self.tokenizer) + [int(eos)]

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        ckpt_dir: str | os.PathLike,
        num_frames: int | None = None,
        max_audio_seconds: float | None = None,
        towers: TowerPaths = TowerPaths(),
        input_style: str = "trainer",
    ) -> OmniProcessor:
        """Load everything from local paths (see the module docstring for the layout)."""
        from transformers import AutoTokenizer, BertTokenizerFast, WhisperFeatureExtractor

        ckpt = Path(ckpt_dir)
        if not ckpt.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {ckpt}")
        config: dict[str, Any] = {}
        if (ckpt / "config.json").is_file():
            config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        extra: dict[str, Any] = {}
        if (ckpt / PROCESSOR_CONFIG).is_file():
            extra = json.loads((ckpt / PROCESSOR_CONFIG).read_text(encoding="utf-8"))

        dirs = resolve_tower_dirs(ckpt, towers)
        if dirs.bert is None:
            raise FileNotFoundError(f"{ckpt}: no BERT tokenizer folder ({ckpt / BERT_SUBDIR}); set model.bert_path")
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
        image_processor = siglip_image_processor_class().from_pretrained(str(dirs.vision))
        feature_extractor = WhisperFeatureExtractor.from_pretrained(str(dirs.audio))
        bert_tokenizer = BertTokenizerFast.from_pretrained(str(dirs.bert))

        if num_frames is None:
            num_frames = config.get("num_frames") or extra.get("num_frames") or DEFAULT_NUM_FRAMES
        if max_audio_seconds is None:
            max_audio_seconds = extra.get("max_audio_seconds")
        return cls(
            tokenizer,
            image_processor,
            feature_extractor,
            bert_tokenizer,
            num_frames=int(num_frames),
            max_audio_seconds=max_audio_seconds,
            input_style=input_style,
        )

    def save_pretrained(self, ckpt_dir: str | os.PathLike) -> Path:
        """Write tokenizer (ckpt_dir), image processor (vision_tower/), feature extractor
        (audio_tower/), BERT tokenizer (bert/) and omni_processor.json.  config.json is left to
        the model code."""
        ckpt = Path(ckpt_dir)
        ckpt.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(ckpt))
        self.image_processor.save_pretrained(str(ckpt / VISION_SUBDIR))
        self.feature_extractor.save_pretrained(str(ckpt / AUDIO_SUBDIR))
        self.bert_tokenizer.save_pretrained(str(ckpt / BERT_SUBDIR))
        extra = {"num_frames": self.num_frames, "max_audio_seconds": self.max_audio_seconds}
        (ckpt / PROCESSOR_CONFIG).write_text(json.dumps(extra, indent=1) + "\n", encoding="utf-8")
        return ckpt
