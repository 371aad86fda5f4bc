"""Video / audio loading on real (tiny) media files and corrupt inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from r1omni_ray.data.audio import audio_features, load_audio, load_audio_features
from r1omni_ray.data.errors import DataError, MediaError
from r1omni_ray.data.processor import siglip_image_processor_class
from r1omni_ray.data.video import background_colour, load_video_frames, pad_to_square, sample_frame_indices
from r1omni_ray.tiny.synthetic import (
    PITCHES,
    SAMPLE_RATE,
    make_corrupt_media,
    make_synthetic_dataset,
    write_mp4,
    write_wav,
)
from tests.synthetic_oracles import classify_pitch, dominant_frequency


@pytest.fixture(scope="module")
def image_processor():
    return siglip_image_processor_class()(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.fixture(scope="module")
def feature_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=16, chunk_length=2, sampling_rate=16000)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("media")
    path = make_synthetic_dataset(out, 2, separate_audio=True, num_video_frames=8, size=32, audio_seconds=1.0)
    return out, json.loads(path.read_text())


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> dict[str, Path]:
    return make_corrupt_media(tmp_path_factory.mktemp("corrupt"))


def test_sample_frame_indices_follow_humanomni():
    # humanomni/mm_utils.py frame_sample(mode="uniform") (v1): seg_size = (duration - 1) / num_frames, the
    # midpoint of each segment, np.round(ids + 1e-6).
    assert sample_frame_indices(100, 8) == [6, 19, 31, 43, 56, 68, 80, 93]  # seg 12.375
    assert sample_frame_indices(16, 8) == [1, 3, 5, 7, 8, 10, 12, 14]  # seg 1.875
    assert sample_frame_indices(8, 8) == list(range(8))  # seg 0.875
    assert sample_frame_indices(17, 4) == [2, 6, 10, 14]  # seg 4: exact midpoints
    # seg 1: every midpoint is an exact half; the reference's +1e-6 rounds them up, not to even.
    assert sample_frame_indices(9, 8) == [1, 2, 3, 4, 5, 6, 7, 8]
    # Shorter than num_frames: process_video still gets num_frames indices, so frames repeat (its
    # zero-frame padding loop never runs for a decoded video).
    assert sample_frame_indices(3, 8) == [0, 0, 1, 1, 1, 1, 2, 2]
    assert sample_frame_indices(1, 8) == [0] * 8
    assert sample_frame_indices(0, 4) == []


def test_load_video_frames_shape_and_content(dataset, image_processor):
    root, recs = dataset
    video = root / recs[0]["video"]
    px = load_video_frames(video, 4, image_processor)
    assert px.shape == (4, 3, 32, 32) and px.dtype == torch.float32
    assert px.min() >= -1.0 and px.max() <= 1.0
    assert not torch.equal(px[0], px[1])  # noise + motion: frames differ
    full = load_video_frames(str(video), 8, image_processor)
    assert full.shape == (8, 3, 32, 32)
    # Same decoder and processor in one process: exact. 4 of 8 frames: seg 1.75 -> 1, 3, 4, 6.
    assert torch.equal(full[[1, 3, 4, 6]], px)


def test_short_video_repeats_frames_as_the_reference_does(tmp_path, image_processor):
    frames = np.stack([np.full((32, 32, 3), 200, np.uint8), np.full((32, 32, 3), 40, np.uint8)])
    path = write_mp4(tmp_path / "short.mp4", frames, None, fps=4)
    px = load_video_frames(path, 5, image_processor)
    assert px.shape == (5, 3, 32, 32)
    # 2 frames, 5 wanted: indices 0, 0, 1, 1, 1 (seg 0.2; midpoint 0.5 rounds up)
    assert torch.equal(px[0], px[1]) and torch.equal(px[2], px[3]) and torch.equal(px[3], px[4])
    assert px[0].mean() > 0.3 and px[2].mean() < -0.3  # 200 and 40 of 255 after SigLIP normalisation


def test_non_square_frames_padded_with_mean_colour(tmp_path, image_processor):
    frames = np.zeros((1, 16, 32, 3), dtype=np.uint8)  # black, wide
    frames[..., 0] = 250
    px = load_video_frames(write_mp4(tmp_path / "wide.mp4", frames), 1, image_processor)[0]
    # rows 0..7 / 24..31 are the padding: HumanOmni's expand2square colour int(0.5 * 255) = 127
    assert background_colour(image_processor) == (127, 127, 127)
    assert px[:, :6].abs().max() < 0.05 and px[:, -6:].abs().max() < 0.05
    assert px[0, 12:20].mean() > 0.8 and px[1, 12:20].mean() < -0.8
    assert pad_to_square(np.zeros((2, 4, 3), np.uint8), (1, 2, 3)).shape == (4, 4, 3)
    # R1-Omni's inference path (aspect_ratio=None) does not pad: the frame is stretched, no grey rows.
    stretched = load_video_frames(write_mp4(tmp_path / "wide2.mp4", frames), 1, image_processor, pad=False)[0]
    assert stretched[0].mean() > 0.8 and stretched[1].mean() < -0.8


def test_load_audio_wav_and_video_track(dataset):
    root, recs = dataset
    rec = recs[0]
    wav = load_audio(root / rec["audio"])
    assert wav.dtype == np.float32 and wav.ndim == 1 and wav.shape[0] == SAMPLE_RATE
    track = load_audio(root / rec["video"])  # the mp4's own AAC track (decord)
    assert track.dtype == np.float32 and track.ndim == 1 and abs(track.shape[0] - SAMPLE_RATE) < 2048
    for w in (wav, track):
        f = dominant_frequency(w)
        assert abs(f - rec["cues"]["frequency"]) < 0.05 * PITCHES[rec["cues"]["pitch"]]
        assert classify_pitch(f) == rec["cues"]["pitch"]
    assert load_audio(root / rec["audio"], max_seconds=0.25).shape == (4000,)
    assert load_audio(root / rec["audio"], sample_rate=8000).shape == (8000,)


def test_audio_features_shape(dataset, feature_extractor):
    root, recs = dataset
    feats = load_audio_features(root / recs[1]["video"], feature_extractor)
    assert feats.shape == (16, 200) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    # longer than chunk_length -> truncated to the same shape
    assert audio_features(np.zeros(3 * 16000, np.float32) + 0.1, feature_extractor).shape == (16, 200)


def test_whisper_large_shape():
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128)  # whisper-large-v3: 128 mels, 30 s
    assert audio_features(np.zeros(1600, np.float32), fe).shape == (128, 3000)


@pytest.mark.parametrize("case", ["truncated_mp4", "garbage_mp4", "no_video_mp4"])
def test_corrupt_video_raises_media_error(corrupt, image_processor, case):
    path = corrupt[case]
    with pytest.raises(MediaError) as ei:
        load_video_frames(path, 4, image_processor)
    assert str(path) in str(ei.value) and ei.value.file == str(path)


@pytest.mark.parametrize(
    ("case", "what"),
    [
        ("truncated_mp4", "cannot open"),
        ("garbage_mp4", "cannot open"),
        ("no_audio_mp4", "no audio track"),
        ("zero_length_wav", "zero-length"),
        ("empty_file_wav", "empty"),
    ],
)
def test_corrupt_audio_raises_media_error(corrupt, case, what):
    path = corrupt[case]
    with pytest.raises(MediaError) as ei:
        load_audio(path)
    assert str(path) in str(ei.value) and what in str(ei.value)


def test_missing_and_garbage_files(tmp_path, image_processor):
    with pytest.raises(MediaError, match="not found"):
        load_video_frames(tmp_path / "nope.mp4", 4, image_processor)
    with pytest.raises(MediaError, match="nope.wav.*not found"):
        load_audio(tmp_path / "nope.wav")
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"RIFF" + bytes(range(200)))
    with pytest.raises(MediaError, match="noise.wav"):
        load_audio(bad)
    nan = write_wav(tmp_path / "ok.wav", np.zeros(100, np.float32))
    assert load_audio(nan).shape == (100,)
    assert issubclass(MediaError, DataError)


def test_no_audio_video_still_loads_frames(corrupt, image_processor):
    assert load_video_frames(corrupt["no_audio_mp4"], 4, image_processor).shape == (4, 3, 32, 32)


def test_audio_file_at_another_rate_is_resampled_as_the_reference_does(tmp_path, feature_extractor):
    """HumanOmni's process_audio reads any path with decord.AudioReader(sample_rate=16000) (ffmpeg's resampler);
    librosa's soxr gave log-mels off by up to 0.93 on a 44.1 kHz file."""
    import decord
    import soundfile as sf

    rng = np.random.default_rng(0)
    t = np.arange(int(1.5 * 44100)) / 44100
    stereo = np.stack([0.4 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 1250 * t)], axis=1)
    stereo += 0.05 * rng.standard_normal(stereo.shape)
    path = tmp_path / "clip_44k.wav"
    sf.write(path, stereo.astype(np.float32), 44100)

    ours = load_audio_features(path, feature_extractor)
    # The reference's lines (humanomni/mm_utils.py process_audio): decord at 16 kHz, channel mean, the extractor.
    ref_wave = torch.from_numpy(decord.AudioReader(str(path), ctx=decord.cpu(0), sample_rate=16000)._array)
    if ref_wave.ndim > 1:
        ref_wave = ref_wave.mean(dim=0)
    ref = feature_extractor(ref_wave.numpy(), sampling_rate=16000, return_tensors="pt")["input_features"][0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)  # the same decoder and resampler: fp32 equality

    from r1omni_ray.data.audio import _load_with_librosa

    other = audio_features(_load_with_librosa(str(path), 16000, why="test"), feature_extractor)
    assert (other - ref).abs().max() > 0.05  # why the reference's resampler matters


def test_cut_short_audio_track_is_named(corrupt):
    """A partly downloaded streamed mp4 opens and decodes (decord says nothing) to 0.7 of its declared 2 s."""
    with pytest.raises(MediaError, match=r"cut_short.mp4: audio decodes to 0\.\d\d s but the file declares 2\.00 s"):
        load_audio(corrupt["cut_short_mp4"])


def test_complete_files_pass_the_length_check(dataset, tmp_path):
    """AAC priming/padding and resampling stay inside the check's slack."""
    root, records = dataset
    for rec in records:
        load_audio(root / rec["video"])
        load_audio(root / rec["audio"])
    for rate in (8000, 22050, 44100, 48000):
        tt = np.arange(int(0.37 * rate)) / rate
        path = write_mp4(tmp_path / f"a{rate}.mp4", None, (0.3 * np.sin(2 * np.pi * 300 * tt)).astype(np.float32),
                         sample_rate=rate)
        assert abs(load_audio(path).size / 16000 - 0.37) < 0.1


def test_decoder_messages_keep_the_cause_and_drop_the_noise(tmp_path, corrupt):
    """No decord timestamps, C++ source paths, stack traces or repeated paths; a bare library exception type
    (librosa's NoBackendError) becomes what it means."""
    text = tmp_path / "notes.wav"
    text.write_bytes(b"RIFF" + bytes(range(200)))
    for path in (text, corrupt["garbage_mp4"], corrupt["truncated_mp4"]):
        with pytest.raises(MediaError) as ei:
            load_audio(path)
        msg = str(ei.value)
        assert msg.startswith(f"{path}: ") and msg.count(str(path)) == 1, msg
        assert ".cc:" not in msg and "Stack trace" not in msg and "[bt]" not in msg, msg
        assert not re.search(r"\[\d\d:\d\d:\d\d\]", msg) and "NoBackendError" not in msg, msg
        assert "\n" not in msg
    with pytest.raises(MediaError, match="notes.wav: not an audio file any decoder reads") as ei:
        load_audio(text)
    # librosa 0.11 (3.11 lock) raises a bare NoBackendError here, librosa 1.0 (3.12/3.13) soundfile's words
    assert "no audio backend recognises the file" in str(ei.value) or "Format not recognised" in str(ei.value)
