"""Emotion label sets and the R1-Omni prompt text (one place for both)."""

from __future__ import annotations

DFEW_LABELS: tuple[str, ...] = ("happy", "surprise", "neutral", "angry", "disgust", "sad", "fear")
MAFW_LABELS: tuple[str, ...] = DFEW_LABELS + ("contemptuous", "disappointed", "helpless", "anxious")
RAVDESS_LABELS: tuple[str, ...] = (
    "neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised",
)

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "dfew": DFEW_LABELS,
    "mafw": MAFW_LABELS,
    "ravdess": RAVDESS_LABELS,
}

# R1-Omni's RAVDESS evaluation maps these onto the DFEW/MAFW vocabulary.
RAVDESS_TO_CANONICAL: dict[str, str] = {"fearful": "fear", "surprised": "surprise"}

# Multimodal placeholders as they appear in the prompt text (HumanOmni constants).
VIDEO_TOKEN = "<video>"
AUDIO_TOKEN = "<audio>"
VI_START, VI_END = "<vi_start>", "<vi_end>"
AU_START, AU_END = "<au_start>", "<au_end>"
# HumanOmni replaces the placeholders with these negative ids before splicing features in.
VIDEO_TOKEN_INDEX = -201
AUDIO_TOKEN_INDEX = -202

EMOTION_QUESTION = (
    "As an emotional recognition expert; throughout the video, which emotion conveyed by the "
    "characters is the most obvious to you?"
)
THINK_ANSWER_SUFFIX = (
    "Output the thinking process in <think> </think> and final emotion in <answer> </answer> tags."
)
SYSTEM_PROMPT = "You are a helpful assistant."


def label_set(name: str) -> tuple[str, ...]:
    try:
        return LABEL_SETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown label set {name!r}; known: {sorted(LABEL_SETS)}") from None


def canonical_label(label: str) -> str:
    """Normalise a label the way R1-Omni's evaluation does (strip, lower, RAVDESS aliases)."""
    lab = label.strip().lower()
    return RAVDESS_TO_CANONICAL.get(lab, lab)
