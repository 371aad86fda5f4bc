"""Audio loading + Whisper features. Every input, a video's own track or a separate audio file, is decoded and
resampled by decord (ffmpeg), as the reference's ``process_audio`` does: resamplers differ (librosa's soxr
moved a 44.1 kHz file's log-mels by up to 0.93 in the review,
0.55 on tests/unit/test_media.py's file), and the checkpoint learned ffmpeg's. librosa reads only
files that decord cannot open, with a warning.

decord 0.6 stays the audio decoder because nothing else gives its samples: a newer ffmpeg (PyAV's, decord2's)
decodes AAC differently in the last bit (1.2e-7) and resamples differently (up to 1.0 on a 44.1 kHz wav:
decord flushes the resampler after every frame); tests/unit/test_decoder_reference.py holds decord 0.6's
output. Video frames are PyAV's (video.py), which match decord 0.6 exactly.

Unlike HumanOmni, a missing / silent-by-absence audio track is an error (MediaError), never a
zero waveform: silently substituting zeros would teach the model that "no audio" is a cue.
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import torch

from r1omni_ray.data.errors import MediaError, media_cause

log = logging.getLogger("r1omni_ray")

VIDEO_CONTAINER_EXTS = frozenset({".mp4", ".mkv", ".avi", ".webm", ".mov", ".m4v", ".flv", ".mpg", ".mpeg"})


def _load_with_decord(path: str, sample_rate: int, container: bool) -> np.ndarray:
    import decord

    try:
        reader = decord.AudioReader(path, ctx=decord.cpu(0), sample_rate=sample_rate, mono=True)
    except Exception as e:
        msg = media_cause(e, path)
        if container and "find audio stream" in msg.lower():
            raise MediaError("video container has no audio track", file=path) from None
        if not container:
            return _load_with_librosa(path, sample_rate, why=msg)
        raise MediaError(f"cannot open audio track: {msg}", file=path) from None
    try:
        if reader.shape[1] == 0:
            raise MediaError("audio track is empty (0 samples)", file=path)
        wave = reader[:].asnumpy()
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"cannot decode audio track: {media_cause(e, path)}", file=path) from None
    wave = np.asarray(wave, dtype=np.float32)
    return wave.reshape(-1) if wave.ndim == 1 or wave.shape[0] == 1 else wave.mean(axis=0)


def _load_with_librosa(path: str, sample_rate: int, why: str) -> np.ndarray:
    import librosa

    try:
        with warnings.catch_warnings():
            # librosa warns "PySoundFile failed. Trying audioread instead." before its fallback
            warnings.simplefilter("ignore")
            wave, _ = librosa.load(path, sr=sample_rate, mono=True)
    except Exception as e:
        raise MediaError(f"not an audio file any decoder reads (decord: {why}; librosa: {media_cause(e, path)})",
                         file=path) from None
    log.warning("decord cannot open %s (%s); read it with librosa, whose resampler is not the reference's",
                path, why)
    return np.asarray(wave, dtype=np.float32)


def declared_seconds(path: str) -> float | None:
    """The audio stream's duration as the file's headers declare it (None where they don't, e.g. many webm/mkv):
    what a complete file decodes to, give or take the codec's priming and padding."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            # the audio stream's own duration only: a container's (its longest stream's) may rightly exceed a
            # shorter audio track
            return float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
    except (av.error.FFmpegError, OSError, ValueError):
        return None


def check_complete(path: str, decoded_seconds: float) -> None:
    """A cut-short file (a partly downloaded mp4 whose index survived) decodes without an error to less audio
    than its headers declare: name the mismatch. The slack covers AAC priming/padding (~1024 samples)."""
    declared = declared_seconds(path)
    if declared is not None and decoded_seconds < declared - max(0.1, 0.02 * declared):
        raise MediaError(f"audio decodes to {decoded_seconds:.2f} s but the file declares {declared:.2f} s "
                         "(cut short: a partial download or copy?)", file=path)


def load_audio(path: str | os.PathLike, sample_rate: int = 16000, max_seconds: float | None = None) -> np.ndarray:
    """Load a mono float32 waveform at ``sample_rate``.

    Audio files (.wav/.flac/...) and video containers (.mp4/.mkv/.avi/.webm/..., their own track) are read
    and resampled with ``decord.AudioReader``, as the reference does.  ``max_seconds``
    truncates.  Missing, corrupt, zero-length, cut-short (less audio than the headers declare) or track-less
    inputs raise :class:`MediaError`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MediaError("audio file not found", file=path)
    if os.path.getsize(path) == 0:
        raise MediaError("audio file is empty (0 bytes)", file=path)
    ext = os.path.splitext(path)[1].lower()
    wave = _load_with_decord(path, sample_rate, container=ext in VIDEO_CONTAINER_EXTS)
    if wave.size == 0:
        raise MediaError("audio is zero-length (0 samples)", file=path)
    check_complete(path, wave.size / sample_rate)
    if not np.all(np.isfinite(wave)):
        raise MediaError("audio contains NaN/inf samples", file=path)
    if max_seconds is not None:
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds}")
        wave = wave[: int(round(max_seconds * sample_rate))]
    return np.ascontiguousarray(wave, dtype=np.float32)


def audio_features(wave: np.ndarray, feature_extractor, device: str = "cpu") -> torch.Tensor:
    """Whisper log-mel features ``[n_mels, n_frames]`` (padded / truncated to the extractor's
    ``chunk_length``; e.g. ``[128, 3000]`` for Whisper-large-v3).  ``wave`` must already be at the
    extractor's ``sampling_rate``. ``device``: where the extractor's torch STFT runs ("cuda" on a rollout
    GPU); the features come back on the CPU either way."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.size == 0:
        raise ValueError("cannot compute features of an empty waveform")
    out = feature_extractor(
        wave, sampling_rate=feature_extractor.sampling_rate, return_tensors="pt", return_attention_mask=False,
        device=device,
    )
    feats = out["input_features"]
    if not isinstance(feats, torch.Tensor):
        feats = torch.as_tensor(np.asarray(feats))
    return feats[0].to(torch.float32)


def load_audio_features(
    path: str | os.PathLike, feature_extractor, max_seconds: float | None = None, device: str = "cpu"
) -> torch.Tensor:
    """``audio_features(load_audio(path, feature_extractor.sampling_rate, max_seconds), device=device)``."""
    wave = load_audio(path, sample_rate=feature_extractor.sampling_rate, max_seconds=max_seconds)
    return audio_features(wave, feature_extractor, device)
