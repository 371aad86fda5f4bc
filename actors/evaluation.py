"""Greedy evaluation on the rollout workers: predictions -> WAR / UAR / confusion (the RLVR driver's periodic and
final evaluations, and launch/evaluate.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.rollout_group import RolloutGroup, wait_with_progress
from r1omni_ray.completions import split_reasoning
from r1omni_ray.emotion_metrics import EmotionMetrics, emotion_metrics
from r1omni_ray.engines.base import SamplingParams
from r1omni_ray.rewards import extract_answer, matches_format

EVAL_PROMPTS_PER_CALL = 32  # per worker and submission: big enough for engine batching


@dataclass
class EvalResult:
    metrics: EmotionMetrics
    rows: list[dict[str, Any]]  # one per record: id, label, prediction, completion, format_ok, error
    format_rate: float


def evaluate_records(
    rollout: RolloutGroup, records: list[Any], labels: list[str], max_new_tokens: int,
    use_video: bool = True, use_audio: bool = True, desc: str = "eval",
) -> EvalResult:
    params = SamplingParams(n=1, greedy=True, max_new_tokens=max_new_tokens)
    items = list(enumerate(records))
    # Several submissions per worker (queued on the actors) so progress is visible while it runs.
    n_workers = max(1, len(rollout.workers))
    chunk = max(n_workers, min(len(items), n_workers * EVAL_PROMPTS_PER_CALL))
    pending = []
    for start in range(0, len(items), chunk):
        pending += rollout.submit(items[start : start + chunk], params, use_video, use_audio)
    wait_with_progress(pending, desc)
    groups = rollout.collect(pending, params, use_video, use_audio)
    rows, preds, golds = [], [], []
    fmt = 0.0
    for g in groups:
        rec = records[g.uid]
        text = g.completions[0].text if g.completions else ""
        pred = extract_answer(text) if g.error is None else None
        f = float(matches_format(text)) if g.error is None else 0.0  # the output format, whatever the rewards
        fmt += f
        rows.append({"id": rec.id, "label": rec.label, "prediction": pred,
                     "reasoning": split_reasoning(text).reasoning, "completion": text,
                     "format_ok": bool(f), "error": g.error})
        preds.append(pred)
        golds.append(rec.label)
    m = emotion_metrics(preds, golds, labels)
    return EvalResult(m, rows, fmt / max(len(groups), 1))
