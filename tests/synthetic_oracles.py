"""Checks of the synthetic task (r1omni_ray/tiny/synthetic.py) that only tests use: which cells encode a
label and back, and recovering a clip's colour and pitch from its decoded media."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from r1omni_ray.tiny.synthetic import COLOURS, DEFAULT_LABELS, PITCHES, SAMPLE_RATE, Cue, cue_table


def expected_cues(label: str, labels: Sequence[str] = DEFAULT_LABELS) -> tuple[Cue, ...]:
    """All (colour, pitch) cells that encode ``label`` (a single cell unless len(labels) == 2)."""
    table = cue_table(labels)
    if label not in table:
        raise KeyError(f"label {label!r} not in {tuple(labels)}")
    return table[label]


def label_for_cues(colour: str, pitch: str, labels: Sequence[str] = DEFAULT_LABELS) -> str | None:
    """Inverse of :func:`cue_table`; None for an unused cell."""
    for lab, cells in cue_table(labels).items():
        if Cue(colour, pitch) in cells:
            return lab
    return None


def classify_colour(mean_rgb: Sequence[float]) -> str:
    """Nearest colour of :data:`COLOURS` to a mean RGB (0-255), by chromaticity."""
    v = np.asarray(mean_rgb, dtype=np.float64)
    v = v / max(np.linalg.norm(v), 1e-6)
    best, best_d = "", np.inf
    for name, rgb in COLOURS.items():
        c = np.asarray(rgb, dtype=np.float64)
        d = np.linalg.norm(v - c / np.linalg.norm(c))
        if d < best_d:
            best, best_d = name, d
    return best


def classify_pitch(freq_hz: float) -> str:
    """Nearest pitch of :data:`PITCHES` (on a log-frequency scale)."""
    return min(PITCHES, key=lambda p: abs(np.log(max(freq_hz, 1.0)) - np.log(PITCHES[p])))


def dominant_frequency(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Frequency (Hz) of the largest FFT magnitude (DC excluded)."""
    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    spec = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    spec[0] = 0.0
    return float(np.argmax(spec) * sample_rate / wave.size)
