"""Greedy evaluation on a pool of rollout workers: predictions -> WAR / UAR / confusion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.pools import ActorPools
from r1omni_ray.engines.base import SamplingParams
from r1omni_ray.metrics import EmotionMetrics, emotion_metrics
from r1omni_ray.rewards import extract_answer, format_reward


@dataclass
class EvalResult:
    metrics: EmotionMetrics
    rows: list[dict[str, Any]]  # one per record: id, label, prediction, completion, format_ok, error
    format_rate: float


def evaluate_records(
    pools: ActorPools, records: list[Any], labels: list[str], max_new_tokens: int,
    use_video: bool = True, use_audio: bool = True,
) -> EvalResult:
    params = SamplingParams(n=1, greedy=True, max_new_tokens=max_new_tokens)
    items = list(enumerate(records))
    pending = pools.submit_rollout(items, params, use_video, use_audio)
    groups = pools.collect_rollout(pending, params, use_video, use_audio)
    rows, preds, golds = [], [], []
    fmt = 0.0
    for g in groups:
        rec = records[g.uid]
        text = g.completions[0].text if g.completions else ""
        pred = extract_answer(text) if g.error is None else None
        f = format_reward(text, rec.solution) if g.error is None else 0.0
        fmt += f
        rows.append({"id": rec.id, "label": rec.label, "prediction": pred, "completion": text,
                     "format_ok": bool(f), "error": g.error})
        preds.append(pred)
        golds.append(rec.label)
    m = emotion_metrics(preds, golds, labels)
    return EvalResult(m, rows, fmt / max(len(groups), 1))
