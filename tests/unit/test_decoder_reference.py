"""The media decoders against the reference pipeline's decord 0.6.0, bit for bit, on clips stored in the repo
(tests/reference/decoder: made by make_reference.py, with decord's own arrays), so the check runs on every
supported Python, decord installed or not; and decord's stride bug widths decoded with known content."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from r1omni_ray.data.audio import load_audio
from r1omni_ray.data.processor import siglip_image_processor_class
from r1omni_ray.data.video import _preprocess, decode_frames, load_video_frames, sample_frame_indices
from r1omni_ray.tiny.synthetic import write_mp4

REF = Path(__file__).resolve().parents[1] / "reference" / "decoder"
CLIPS = json.loads((REF / "manifest.json").read_text())["clips"]
VIDEOS = sorted(n for n, e in CLIPS.items() if "frames" in e)
AUDIO = sorted(n for n, e in CLIPS.items() if "audio_samples" in e)


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(REF / "expected.npz") as z:
        return {k: z[k] for k in z.files}


def test_the_reference_covers_the_cases_that_matter():
    names = set(CLIPS)
    assert {"rot90.mp4", "rot270.mp4", "gop4_bframes.mp4", "short5.mp4", "fullrange.mp4", "vp9.webm"} <= names
    assert {"stereo_44k.wav", "stereo_48k_pcm16.wav", "aac_44k.m4a", "w100_aac.mp4"} <= set(AUDIO)
    assert CLIPS["short5.mp4"]["indices"] == [0, 1, 1, 2, 2, 3, 3, 4]  # short clips repeat frames


@pytest.mark.parametrize("name", VIDEOS)
def test_frames_equal_decord_06(name, expected):
    """Frame count, sampled indices, frame order (B-frames, keyframe seeks), rotation and RGB pixels."""
    frames = decode_frames(REF / name, 8)
    ref = expected[f"{name}:frames"]
    assert frames.dtype == np.uint8 and frames.shape == ref.shape
    assert np.array_equal(frames, ref)


@pytest.mark.parametrize("name", ["w100_aac.mp4", "rot90.mp4"])
@pytest.mark.parametrize("pad", [True, False])
def test_siglip_pixels_equal_the_reference_pipeline(name, pad, expected):
    proc = siglip_image_processor_class()(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ours = load_video_frames(REF / name, 8, proc, pad=pad)
    ref = _preprocess(expected[f"{name}:frames"], proc, pad)
    assert ours.shape == (8, 3, 32, 32) and ours.dtype == ref.dtype
    assert np.array_equal(ours.numpy(), ref.numpy())


@pytest.mark.parametrize("name", AUDIO)
def test_audio_equals_decord_06(name, expected):
    """16 kHz mono from an mp4's AAC track, a 44.1 kHz float and a 48 kHz PCM16 stereo wav, an m4a."""
    wave = load_audio(REF / name, 16000)
    ref = expected[f"{name}:audio"]
    assert wave.dtype == np.float32 and wave.shape == ref.shape
    assert np.array_equal(wave, ref)


def _colour(t: int) -> tuple[int, int, int]:
    return 10 * t, 200 - 5 * t, 60 + 4 * t


def _known(width: int, height: int = 36, n: int = 24) -> np.ndarray:
    """Frame t: a flat colour that encodes t, with a white bar whose position encodes t as well."""
    frames = np.zeros((n, height, width, 3), np.uint8)
    for t in range(n):
        frames[t] = _colour(t)
        bar = (t * width) // n
        frames[t, :, bar : bar + 2] = 255
    return frames


@pytest.mark.parametrize("width", [16, 24, 48, 72, 100, 202])
def test_decord_stride_bug_widths_decode_with_their_content(tmp_path, width):
    """decord 0.6 fails (or garbles) 16/24/48/72-px-wide clips: its RGB rows carry padding that is a multiple
    of the width, and it then takes the padding for channels. These decode here, each frame the one asked for."""
    src = _known(width)
    path = write_mp4(tmp_path / f"w{width}.mp4", src, fps=8)
    frames = decode_frames(path, 8)
    idx = sample_frame_indices(len(src), 8)
    assert frames.shape == (8, 36, width, 3)
    for k, t in enumerate(idx):
        bar = (t * width) // 24
        body = np.delete(frames[k].astype(int), np.s_[max(0, bar - 3) : bar + 5], axis=1)
        assert np.abs(body.reshape(-1, 3).mean(0) - _colour(t)).max() < 4, (width, t)  # its colour: frame t's
        brightness = frames[k].astype(int).mean(axis=(0, 2))
        assert abs(int(np.argmax(brightness)) - bar) <= 1, (width, t)  # and its bar where frame t has it


def test_decord_06_still_has_the_stride_bug(tmp_path):
    """Why the video path left decord: the failure this module's stride test decodes (where decord installs)."""
    decord = pytest.importorskip("decord")
    path = write_mp4(tmp_path / "w48.mp4", _known(48), fps=8)
    with pytest.raises(Exception, match="size must exactly match"):
        decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1).get_batch([0, 3]).asnumpy()


@pytest.mark.parametrize("width,height", [(32, 40), (98, 54), (202, 40), (64, 64)])
def test_frames_equal_live_decord_on_fresh_clips(tmp_path, width, height):
    """Beyond the stored clips, where decord 0.6 installs: clips this PyAV encodes, decoded by both."""
    decord = pytest.importorskip("decord")
    rng = np.random.default_rng(width)
    src = _known(width, height, n=17)
    src = np.clip(src.astype(int) + rng.integers(-20, 20, src.shape), 0, 255).astype(np.uint8)
    path = write_mp4(tmp_path / "clip.mp4", src, fps=8)
    ours = decode_frames(path, 8)
    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    ref = vr.get_batch(sample_frame_indices(len(vr), 8)).asnumpy()
    assert np.array_equal(ours, ref)
