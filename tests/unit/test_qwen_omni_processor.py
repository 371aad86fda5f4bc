"""Qwen2.5-Omni inputs against the reference pipeline (qwen-omni-utils + transformers' Qwen2_5OmniProcessor +
the thinker's get_rope_index), on the clips of tests/reference/qwen_omni/: token ids, TMRoPE positions and
grids equal, video patches and audio features bit for bit (sha256 of their float32 bytes). Where torchvision
and qwen-omni-utils are importable the reference is also recomputed live."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, WhisperFeatureExtractor

from r1omni_ray.data.errors import MediaError
from r1omni_ray.data.qwen_omni_processor import (
    QwenOmniProcessor,
    VideoSpec,
    audio_token_count,
    video_frame_count,
    video_frame_indices,
)
from r1omni_ray.data.records import OmniRecord
from tests.reference.qwen_omni.make_reference import HERE, digest, reference_case, thinker_ids

MANIFEST = json.loads((HERE / "manifest.json").read_text())
CASES = sorted(MANIFEST["cases"])


def processor(use_audio_in_video: bool) -> QwenOmniProcessor:
    tok = AutoTokenizer.from_pretrained(str(HERE / "tokenizer"))
    spec = VideoSpec(min_pixels=MANIFEST["min_pixels"], max_pixels=MANIFEST["max_pixels"])
    fe = WhisperFeatureExtractor(feature_size=MANIFEST["num_mel_bins"])
    return QwenOmniProcessor(tok, fe, thinker_ids(tok), spec, use_audio_in_video=use_audio_in_video)


def ours(case: dict) -> tuple:
    clip = str(HERE / case["clip"])
    audio = None if case.get("no_audio") else str(HERE / case["audio"]) if case["audio"] else clip
    rec = OmniRecord(id="r", video=clip, audio=audio, question=MANIFEST["question"], label="happy",
                     solution="<answer>happy</answer>")
    return processor(case["use_audio_in_video"]).process(rec), audio


def check(got, want: dict) -> None:
    assert got.prompt_ids == want["input_ids"]
    assert got.positions.tolist() == want["positions"]
    assert list(got.video_grid_thw) == want["video_grid_thw"]
    assert list(got.pixel_values.shape) == want["pixel_values_videos"]["shape"]
    assert digest(got.pixel_values) == want["pixel_values_videos"]["sha256"]
    if "input_features" in want:
        assert list(got.audio_features.shape) == want["input_features"]["shape"]
        assert digest(got.audio_features) == want["input_features"]["sha256"]
    else:
        assert got.audio_features is None


@pytest.mark.parametrize("name", CASES)
def test_inputs_equal_the_stored_reference(name):
    case = MANIFEST["cases"][name]
    got, audio = ours(case)
    check(got, case["expected"])
    assert got.media_kinds == (True, audio is not None)


def test_the_cases_cover_interleaving_chunks_and_both_resize_directions():
    exp = {n: c["expected"] for n, c in MANIFEST["cases"].items()}
    assert exp["chunks"]["video_grid_thw"][0] >= 5  # several 2 s chunks of video and audio interleaved
    first, last = exp["chunks"]["positions"][0][0], max(exp["chunks"]["positions"][0])
    assert last - first > 4 * 50  # temporal positions run at 25 per second over the 9 s clip
    # 120x160 scaled down, 40x56 scaled up to the budget
    assert exp["interleaved"]["video_grid_thw"][1] * 14 < 120
    assert exp["chunks"]["video_grid_thw"][1] * 14 * exp["chunks"]["video_grid_thw"][2] * 14 >= MANIFEST["min_pixels"]


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None or importlib.util.find_spec("qwen_omni_utils") is None
                    or importlib.util.find_spec("decord") is None,
                    reason="the live reference needs torchvision, decord and qwen-omni-utils (not in the CPU lock)")
@pytest.mark.parametrize("name", CASES)
def test_inputs_equal_the_reference_pipeline_live(name, monkeypatch):
    monkeypatch.setenv("FORCE_QWENVL_VIDEO_READER", "decord")
    case = MANIFEST["cases"][name]
    tok = AutoTokenizer.from_pretrained(str(HERE / "tokenizer"))
    check(ours(case)[0], reference_case(case, HERE, tok))


def test_frame_count_follows_the_fps_rule():
    spec = VideoSpec()
    assert video_frame_count(100, 25.0, spec) == 8  # 4 s at 2 fps
    assert video_frame_count(12, 8.0, spec) == 4  # 1.5 s: the 4-frame minimum
    assert video_frame_count(7, 25.0, spec) == 4
    assert video_frame_count(3, 25.0, spec) == 2  # fewer frames than the minimum: all, rounded to even
    assert video_frame_count(100_000, 25.0, spec) == 768
    with pytest.raises(MediaError, match="at least 2"):
        video_frame_count(1, 25.0, spec)
    assert video_frame_indices(100, 8) == [0, 14, 28, 42, 57, 71, 85, 99]


def test_audio_token_count_matches_the_tower():
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    for frames in (1, 2, 3, 99, 100, 101, 3000):
        assert audio_token_count(frames) == int(Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths(
            None, torch.tensor(frames))[1])


def test_a_prompt_over_the_token_budget_is_a_named_media_error():
    case = MANIFEST["cases"]["interleaved"]
    proc = processor(True)
    proc.max_prompt_tokens = 50
    rec = OmniRecord(id="r", video=str(HERE / case["clip"]), audio=str(HERE / case["clip"]),
                     question=MANIFEST["question"], label="happy", solution="")
    with pytest.raises(MediaError, match=r"talk_4s.mp4.*-token prompt, over model.max_prompt_tokens=50"):
        proc.process(rec)


def test_an_extreme_aspect_ratio_is_a_named_media_error(tmp_path: Path):
    import numpy as np

    from r1omni_ray.tiny.synthetic import write_mp4

    clip = write_mp4(tmp_path / "strip.mp4", np.zeros((8, 2, 1000, 3), dtype=np.uint8), fps=4)
    rec = OmniRecord(id="r", video=str(clip), audio=None, question="q", label="happy", solution="")
    with pytest.raises(MediaError, match="strip.mp4.*cannot be resized"):
        processor(True).process(rec, use_audio=False)
