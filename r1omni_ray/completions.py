"""Splitting a completion into its reasoning and its answer (sample tables, eval rows, inference)."""

from __future__ import annotations

from dataclasses import dataclass

from r1omni_ray.rewards import extract_answer

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class ParsedCompletion:
    reasoning: str  # inside <think>…</think>; the text before <answer> when there is no think tag
    answer: str | None  # first one-line <answer>…</answer>, stripped; None when there is none


def split_reasoning(text: str) -> ParsedCompletion:
    answer = extract_answer(text)
    start = text.find(_THINK_OPEN)
    if start >= 0:
        start += len(_THINK_OPEN)
        end = text.find(_THINK_CLOSE, start)
        reasoning = text[start:] if end < 0 else text[start:end]
    else:
        cut = text.find("<answer>")
        reasoning = text if cut < 0 else text[:cut]
    return ParsedCompletion(reasoning.strip(), answer)
