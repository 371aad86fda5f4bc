"""A tiny synthetic omni-modal emotion dataset with real media files.

Every sample is an H.264 ``.mp4`` (PyAV) with an AAC audio track muxed in, optionally plus a
separate ``.wav`` referenced by the record's "audio" key, and a record in R1-Omni JSON format.

The label is recoverable *only* from the media content:

* the **video** is dominated by one colour of :data:`COLOURS` (per-pixel noise, a brightness
  jitter and a darker square moving across the frame make every frame different);
* the **audio** is a sine tone at a ``"low"`` (~300 Hz) or ``"high"`` (~1200 Hz) pitch of
  :data:`PITCHES` (+-3 % jitter), amplitude-modulated by a slow or fast beat (the "rhythm",
  2-5 Hz, not label relevant) plus a little noise.

Labels are laid out row-major on the colour x pitch grid by :func:`cue_table`: label ``i`` gets
``(COLOURS[i // 2], PITCHES[i % 2])``.  For the default labels this gives :data:`SYNTHETIC_CUES`::

    colour \\ pitch   low      high
    red              happy    sad
    green            angry    neutral

so *every* default label needs both modalities: the colour alone (or the pitch alone) narrows
the answer down to two labels, i.e. a single-modality model is capped at 50 % accuracy.  With
an odd number of labels the last one is identifiable from the colour alone; with exactly two
labels an XOR layout over two colours is used (each label gets two cells) so that neither
modality alone determines a label.  At most ``len(COLOURS) * len(PITCHES)`` = 12 labels.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np

from r1omni_ray.labels import EMOTION_QUESTION, LABEL_SETS

DEFAULT_LABELS: tuple[str, ...] = ("happy", "sad", "angry", "neutral")
SAMPLE_RATE = 16000

# Dominant colours (RGB uint8), in grid-row order.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 70, 220),
    "yellow": (220, 210, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 200, 210),
}
# Tone frequencies in Hz, in grid-column order.
PITCHES: dict[str, float] = {"low": 300.0, "high": 1200.0}
# Beat rate ranges (Hz) described as the rhythm in reasoning texts; not label-relevant.
RHYTHMS: dict[str, tuple[float, float]] = {"slow": (2.0, 3.0), "fast": (4.0, 5.0)}


class Cue(NamedTuple):
    colour: str
    pitch: str


def cue_table(labels: Sequence[str] = DEFAULT_LABELS) -> dict[str, tuple[Cue, ...]]:
    """The (colour, pitch) cells of each label (see the module docstring for the layout)."""
    labels = tuple(labels)
    colours, pitches = list(COLOURS), list(PITCHES)
    if len(labels) < 2:
        raise ValueError("the synthetic dataset needs at least 2 labels")
    if len(labels) > len(colours) * len(pitches):
        raise ValueError(f"at most {len(colours) * len(pitches)} labels are supported, got {len(labels)}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate labels in {labels}")
    if len(labels) == 2:  # XOR: neither modality alone determines the label
        a, b = labels
        return {
            a: (Cue(colours[0], pitches[0]), Cue(colours[1], pitches[1])),
            b: (Cue(colours[0], pitches[1]), Cue(colours[1], pitches[0])),
        }
    return {lab: (Cue(colours[i // 2], pitches[i % 2]),) for i, lab in enumerate(labels)}


#: The documented label -> cue mapping for DEFAULT_LABELS.
SYNTHETIC_CUES: dict[str, tuple[Cue, ...]] = cue_table(DEFAULT_LABELS)


# ----------------------------------------------------------------------------------------------
# reasoning texts
# ----------------------------------------------------------------------------------------------

REASONING_TEMPLATES: tuple[str, ...] = (
    "The video is dominated by a {colour} colour, with a darker patch moving across the frame. "
    "The audio carries a {pitch} pitched tone with a {rhythm} rhythm. "
    "A {colour} scene combined with a {pitch} pitch indicates that the emotion is {label}.",
    "Visually, the frames are mostly {colour}. Acoustically, I hear a {pitch} tone pulsing at a "
    "{rhythm} pace. Together, {colour} and a {pitch} pitch point to {label}.",
    "I observe {colour} frames and a {pitch} pitched sound with a {rhythm} beat, so the character "
    "most likely feels {label}.",
)

_FIELD_RE = re.compile(r"\{\w+\}")


def _vocab_texts() -> list[str]:
    texts = [_FIELD_RE.sub(" ", t) for t in REASONING_TEMPLATES]
    texts += list(COLOURS) + list(PITCHES) + list(RHYTHMS)
    labels = {lab for labs in LABEL_SETS.values() for lab in labs} | set(DEFAULT_LABELS)
    texts += sorted(labels)
    return texts


#: Every word the synthetic reasoning responses can contain (feed to the tiny tokenizer).
SYNTHETIC_VOCAB_TEXTS: list[str] = _vocab_texts()


def reasoning_response(colour: str, pitch: str, rhythm: str, label: str, variant: int = 0) -> str:
    """``"<think>...</think>\\n<answer>label</answer>"`` describing the observed cues."""
    text = REASONING_TEMPLATES[variant % len(REASONING_TEMPLATES)].format(
        colour=colour, pitch=pitch, rhythm=rhythm, label=label
    )
    return f"<think>{text}</think>\n<answer>{label}</answer>"


# ----------------------------------------------------------------------------------------------
# media synthesis
# ----------------------------------------------------------------------------------------------


def synth_frames(colour: str, rng: np.random.Generator, num_frames: int = 8, size: int = 32) -> np.ndarray:
    """``[T, size, size, 3]`` uint8 frames dominated by ``colour`` (noise + moving darker square)."""
    base = np.asarray(COLOURS[colour], dtype=np.float32) * rng.uniform(0.85, 1.1)
    frames = np.empty((num_frames, size, size, 3), dtype=np.float32)
    frames[...] = base
    frames += rng.normal(0.0, 10.0, size=frames.shape).astype(np.float32)
    side = max(2, size // 4)
    pos = rng.uniform(0, size - side, size=2)
    vel = rng.uniform(-1.0, 1.0, size=2)
    vel *= max(1.0, size / 16) / max(np.linalg.norm(vel), 1e-3)
    for t in range(num_frames):
        y, x = (int(v) for v in pos)
        frames[t, y : y + side, x : x + side] *= 0.55
        pos = pos + vel
        for k in range(2):  # bounce off the borders
            if pos[k] < 0 or pos[k] > size - side:
                vel[k] = -vel[k]
                pos[k] = float(np.clip(pos[k], 0, size - side))
    return np.clip(frames, 0, 255).astype(np.uint8)


def synth_wave(
    pitch: str, rng: np.random.Generator, seconds: float = 1.0, sample_rate: int = SAMPLE_RATE
) -> tuple[np.ndarray, float, str]:
    """A tone at ``pitch`` with a beat envelope; returns ``(wave float32, frequency, rhythm)``."""
    n = max(1, int(round(seconds * sample_rate)))
    t = np.arange(n, dtype=np.float64) / sample_rate
    freq = PITCHES[pitch] * rng.uniform(0.97, 1.03)
    rhythm = "slow" if rng.random() < 0.5 else "fast"
    beat = rng.uniform(*RHYTHMS[rhythm])
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * beat * t + rng.uniform(0, 2 * np.pi))
    wave = 0.4 * envelope * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    wave += rng.normal(0.0, 0.005, size=n)
    fade = min(n // 2, int(0.01 * sample_rate))
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade)
        wave[:fade] *= ramp
        wave[-fade:] *= ramp[::-1]
    return wave.astype(np.float32), float(freq), rhythm


def write_mp4(
    path: str | os.PathLike,
    frames: np.ndarray | None,
    wave: np.ndarray | None = None,
    fps: int = 8,
    sample_rate: int = SAMPLE_RATE,
    faststart: bool = False,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    container_format: str = "mp4",
    options: dict[str, str] | None = None,
) -> Path:
    """Write an H.264 (yuv420p) .mp4 from ``[T, H, W, 3]`` uint8 frames, with an AAC mono track
    from ``wave`` when given.  ``frames=None`` writes an audio-only container. ``faststart``: the index
    (moov) before the media, as streamed files have it. ``codec``, ``pix_fmt``, ``container_format`` and the
    encoder's ``options`` (None: x264 ultrafast, crf 18, one thread) make other kinds of clip
    (tests/reference/decoder/make_reference.py)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames is None and wave is None:
        raise ValueError("need frames and/or wave")
    mux_options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", format=container_format, options=mux_options) as container:
        vstream = astream = None
        if frames is not None:
            frames = np.asarray(frames, dtype=np.uint8)
            if frames.ndim != 4 or frames.shape[-1] != 3:
                raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
            h, w = frames.shape[1:3]
            if h % 2 or w % 2:
                raise ValueError(f"chroma-subsampled video needs even frame sizes, got {h}x{w}")
            vstream = container.add_stream(codec, rate=Fraction(fps))
            vstream.width, vstream.height, vstream.pix_fmt = w, h, pix_fmt
            vstream.options = {"preset": "ultrafast", "crf": "18", "threads": "1"} if options is None else options
        if wave is not None:
            astream = container.add_stream("aac", rate=sample_rate)
            astream.layout = "mono"
        if vstream is not None:
            for i, img in enumerate(frames):
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                vf.pts = i
                for packet in vstream.encode(vf):
                    container.mux(packet)
            for packet in vstream.encode():
                container.mux(packet)
        if astream is not None:
            samples = np.ascontiguousarray(np.asarray(wave, dtype=np.float32).reshape(1, -1))
            af = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            af.sample_rate = sample_rate
            af.pts = 0
            for packet in astream.encode(af):
                container.mux(packet)
            for packet in astream.encode(None):
                container.mux(packet)
    return path


def write_wav(path: str | os.PathLike, wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.asarray(wave, dtype=np.float32), sample_rate, subtype="PCM_16")
    return path


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_samples: int,
    labels: Sequence[str] = DEFAULT_LABELS,
    seed: int = 0,
    num_video_frames: int = 8,
    fps: int = 8,
    size: int = 32,
    audio_seconds: float = 1.0,
    separate_audio: bool | float = 0.5,
    with_reasoning: bool = False,
    prefix: str = "train",
) -> Path:
    """Write ``num_samples`` synthetic samples under ``out_dir`` and return ``out_dir/{prefix}.json``.

    Layout: ``videos/{prefix}_{i:05d}.mp4`` (always with an AAC track), ``audios/{prefix}_{i:05d}.wav``
    for the records that use a separate audio file (``separate_audio``: True = all, False = none, a
    float = that probability per record; the wav holds the same waveform as the mp4's track).
    Labels are class-balanced and shuffled.  Each record also carries a ``"cues"`` dict (colour,
    pitch, frequency, rhythm) for tests/debugging; the loader ignores it.  Deterministic per seed.
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    table = cue_table(labels)
    labels = tuple(labels)
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    frac = float(separate_audio) if not isinstance(separate_audio, bool) else (1.0 if separate_audio else 0.0)

    rng = np.random.default_rng(seed)
    sample_labels = [labels[i % len(labels)] for i in range(num_samples)]
    rng.shuffle(sample_labels)
    human = "<video>\n<audio>\n" + EMOTION_QUESTION
    records = []
    for i, label in enumerate(sample_labels):
        srng = np.random.default_rng([seed, i])
        cells = table[label]
        colour, pitch = cells[int(srng.integers(len(cells)))]
        frames = synth_frames(colour, srng, num_video_frames, size)
        wave, freq, rhythm = synth_wave(pitch, srng, audio_seconds)
        name = f"{prefix}_{i:05d}"
        write_mp4(out / "videos" / f"{name}.mp4", frames, wave, fps=fps)
        rec: dict = {"id": name, "video": f"videos/{name}.mp4"}
        if srng.random() < frac:
            write_wav(out / "audios" / f"{name}.wav", wave)
            rec["audio"] = f"audios/{name}.wav"
        if with_reasoning:
            answer = reasoning_response(colour, pitch, rhythm, label, variant=int(srng.integers(1 << 16)))
        else:
            answer = label
        rec["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
        rec["cues"] = {"colour": colour, "pitch": pitch, "frequency": round(freq, 2), "rhythm": rhythm}
        records.append(rec)

    json_path = out / f"{prefix}.json"
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    return json_path


def make_corrupt_media(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Bad inputs for tests.

    Keys: ``truncated_mp4`` (first half of a valid mp4; the moov atom is lost), ``cut_short_mp4`` (the first
    40% of an audio-only mp4 written index-first: it opens, and decodes to 0.8 of its 2 s), ``no_audio_mp4``
    (valid video, no audio track), ``no_video_mp4`` (audio-only container), ``zero_length_wav``
    (valid WAV header, 0 samples), ``empty_file_wav`` (0 bytes), ``garbage_mp4`` (random bytes).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    frames = synth_frames("red", rng, 16, 32)
    wave, _, _ = synth_wave("low", rng, 2.0)
    paths: dict[str, Path] = {}

    full = write_mp4(out / "_full.mp4", frames, wave)
    data = full.read_bytes()
    full.unlink()
    paths["truncated_mp4"] = out / "truncated.mp4"
    paths["truncated_mp4"].write_bytes(data[: len(data) // 2])

    # A partly downloaded streamed mp4: its index (first in the file) survives, most of its media does not.
    streamed = write_mp4(out / "_streamed.mp4", None, wave, faststart=True).read_bytes()
    (out / "_streamed.mp4").unlink()
    paths["cut_short_mp4"] = out / "cut_short.mp4"
    paths["cut_short_mp4"].write_bytes(streamed[: int(len(streamed) * 0.4)])

    paths["no_audio_mp4"] = write_mp4(out / "no_audio.mp4", frames, None)
    paths["no_video_mp4"] = write_mp4(out / "no_video.mp4", None, wave)
    paths["zero_length_wav"] = write_wav(out / "zero_length.wav", np.zeros(0, dtype=np.float32))
    paths["empty_file_wav"] = out / "empty_file.wav"
    paths["empty_file_wav"].write_bytes(b"")
    paths["garbage_mp4"] = out / "garbage.mp4"
    paths["garbage_mp4"].write_bytes(rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    return paths
