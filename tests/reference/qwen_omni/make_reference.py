"""Writes the Qwen2.5-Omni input reference: small clips and what the reference pipeline makes of them, for
tests/unit/test_qwen_omni_processor.py.

The reference pipeline is the one Qwen2.5-Omni's model card gives: qwen-omni-utils' ``process_mm_info``
(frame choice at 2 fps and the frame resize; decord reads the video) and transformers' own
``Qwen2_5OmniProcessor`` (Qwen2VLVideoProcessor, WhisperFeatureExtractor, placeholder expansion), then the
thinker's ``get_rope_index`` for the TMRoPE positions. The audio waveform is this project's (decord, as
R1-Omni reads it; qwen-omni-utils would call the ffmpeg program, which these machines do not have).

Run once, where torchvision, decord and qwen-omni-utils are installed (e.g. the Python 3.12 environment with
``pip install --no-deps torchvision==0.28.0 qwen-omni-utils audioread``):
    python -m tests.reference.qwen_omni.make_reference
The clips and the tokenizer are committed; manifest.json holds ids, positions and grids as lists and the pixel
and feature tensors as sha256 digests of their float32 bytes (exact equality, a few bytes each).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1omni_ray.data.qwen_omni_processor import thinker_token_ids as thinker_ids

HERE = Path(__file__).resolve().parent
QUESTION = "As an emotional recognition expert, which emotion does the person show?"
# Smaller per-frame budgets than the defaults (128..768 tokens of 28 x 28 px), so the reference stays small:
# every clip below is resized (up or down) under them.
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 16 * 28 * 28
NUM_MEL_BINS = 128  # Whisper-large-v3's, as Qwen2.5-Omni's feature extractor
CASES: dict[str, dict[str, Any]] = {
    # 4 s, 8 fps, 120x160 with its own AAC track: 8 frames at 2 fps, scaled down, audio interleaved
    "interleaved": {"clip": "talk_4s.mp4", "audio": None, "use_audio_in_video": True},
    # 9 s at 4 fps, 40x56: 18 frames, scaled up; five 2 s chunks of video and audio interleaved
    "chunks": {"clip": "long_9s.mp4", "audio": None, "use_audio_in_video": True},
    # 1.5 s, 8 fps (12 frames -> the 4-frame minimum), a separate wav as its own audio item
    "separate_audio": {"clip": "short_1500ms.mp4", "audio": "voice.wav", "use_audio_in_video": False},
    # video without audio
    "video_only": {"clip": "talk_4s.mp4", "audio": None, "use_audio_in_video": False, "no_audio": True},
}


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def _frames(t: int, h: int, w: int, seed: int) -> np.ndarray:
    """Smooth moving gradients (small files), different per seed."""
    y, x = np.mgrid[0:h, 0:w]
    out = []
    for k in range(t):
        img = np.stack([(x * 3 + 9 * k + seed * 40) % 256, (y * 4 + 4 * k) % 256, ((x + y) * 2 + k) % 256], -1)
        out.append(img.astype(np.uint8))
    return np.stack(out)


def write_clips(out: Path) -> None:
    from r1omni_ray.tiny.synthetic import synth_wave, write_mp4, write_wav

    rng = np.random.default_rng(7)
    write_mp4(out / "talk_4s.mp4", _frames(32, 120, 160, 1), synth_wave("high", rng, seconds=4.0)[0], fps=8)
    write_mp4(out / "long_9s.mp4", _frames(36, 40, 56, 2), synth_wave("low", rng, seconds=9.0)[0], fps=4)
    write_mp4(out / "short_1500ms.mp4", _frames(12, 64, 64, 3), None, fps=8)
    write_wav(out / "voice.wav", synth_wave("low", rng, seconds=1.5)[0])


def reference_case(case: dict[str, Any], clip_dir: Path, tok) -> dict[str, Any]:
    """What the reference pipeline gives for one case (needs torchvision and qwen-omni-utils)."""
    from qwen_omni_utils import process_mm_info
    from transformers import (
        Qwen2_5OmniProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniPreTrainedModelForConditionalGeneration as Model,
    )

    from r1omni_ray.data.audio import load_audio
    from r1omni_ray.data.prompts import trainer_question
    from r1omni_ray.data.qwen_omni_processor import QWEN_OMNI_SYSTEM_PROMPT

    clip = str(clip_dir / case["clip"])
    uiv = case["use_audio_in_video"]
    items: list[dict[str, Any]] = [{"type": "video", "video": clip, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}]
    if case["audio"]:
        items.append({"type": "audio", "audio": str(clip_dir / case["audio"])})
    items.append({"type": "text", "text": trainer_question(QUESTION)})
    conv = [{"role": "system", "content": [{"type": "text", "text": QWEN_OMNI_SYSTEM_PROMPT}]},
            {"role": "user", "content": items}]
    # Frames from qwen-omni-utils; audio loaded by this project (see the module docstring).
    _, _, videos, kwargs = process_mm_info([{**m, "content": [i for i in m["content"] if i["type"] != "audio"]}
                                            if isinstance(m["content"], list) else m for m in conv],
                                           use_audio_in_video=False, return_video_kwargs=True)
    audio_path = None if case.get("no_audio") else (str(clip_dir / case["audio"]) if case["audio"] else clip)
    audios = [load_audio(audio_path)] if audio_path else None
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    proc = Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
                                feature_extractor=WhisperFeatureExtractor(feature_size=NUM_MEL_BINS), tokenizer=tok)
    out = proc(text=text, videos=videos, audio=audios, use_audio_in_video=uiv, fps=kwargs["fps"][0],
               size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, return_tensors="pt")
    index = _RopeIndex(thinker_ids(tok))
    audio_lens = out["feature_attention_mask"].sum(-1) if audios else None
    pos, _ = Model.get_rope_index(index, out["input_ids"], None, out["video_grid_thw"], out["attention_mask"], uiv,
                                  audio_lens, torch.tensor(out["video_second_per_grid"]))
    res = {"input_ids": out["input_ids"][0].tolist(), "positions": pos[:, 0].tolist(),
           "video_grid_thw": out["video_grid_thw"][0].tolist(),
           "video_second_per_grid": float(out["video_second_per_grid"][0]),
           "pixel_values_videos": {"shape": list(out["pixel_values_videos"].shape),
                                   "sha256": digest(out["pixel_values_videos"])}}
    if audios:
        valid = int(out["feature_attention_mask"][0].sum())
        feats = out["input_features"][0, :, :valid]
        res["input_features"] = {"shape": list(feats.shape), "sha256": digest(feats)}
    return res


class _RopeIndex:
    """The attributes get_rope_index reads off a model."""

    def __init__(self, ids: dict[str, int]) -> None:
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
            Qwen2_5OmniPreTrainedModelForConditionalGeneration as Model,
        )

        self.spatial_merge_size = 2
        self.config = type("C", (), {"image_token_id": ids["image_token_index"], "video_token_id": ids["video_token_index"],
                                     "audio_token_id": ids["audio_token_index"],
                                     "vision_start_token_id": ids["vision_start_token_id"],
                                     "audio_start_token_id": ids["audio_start_token_id"],
                                     "position_id_per_seconds": 25, "seconds_per_chunk": 2})()
        self.get_llm_pos_ids_for_vision = lambda *a: Model.get_llm_pos_ids_for_vision(self, *a)
        self.get_chunked_index = lambda *a: Model.get_chunked_index(self, *a)


def main() -> None:
    from transformers import AutoTokenizer

    from r1omni_ray.tiny.qwen_omni import make_tiny_qwen_omni_processor

    make_tiny_qwen_omni_processor(HERE / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(HERE / "tokenizer"))
    write_clips(HERE)
    manifest = {"question": QUESTION, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "num_mel_bins": NUM_MEL_BINS,
                "cases": {name: {**case, "expected": reference_case(case, HERE, tok)} for name, case in CASES.items()}}
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {HERE / 'manifest.json'}")


if __name__ == "__main__":
    main()
