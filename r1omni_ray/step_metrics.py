"""Step metrics as pure functions of what a step produced (rewards, advantages, completions, the learners'
per-rank outputs). The driver logs them; nothing here talks to Ray."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import torch

from r1omni_ray.grpo import flat_groups
from r1omni_ray.rollout_correction import MAX_KEYS, SUM_PREFIX, correction_means

# Learner outputs already divided by global token/sequence counts: summing over ranks gives the batch
# value. Every other learner output is a per-rank mean, averaged over ranks.
GLOBALLY_NORMALISED = frozenset({"loss", "policy_loss", "kl_loss"})


def reward_metrics(total: Sequence[float], per_reward: Mapping[str, Sequence[float]], group_size: int,
                   errors: Mapping[str, int], diagnostics: Mapping[str, int]) -> dict[str, float]:
    rewards = torch.tensor(list(total), dtype=torch.float32)
    m = {"reward/total_mean": float(rewards.mean())}
    for name, vals in per_reward.items():
        m[f"reward/{name}_mean"] = statistics.fmean(vals) if vals else 0.0
    # Short names for the emotion task's two rewards, only where the run has them (a recipe may not).
    for short, name in (("accuracy", "accuracy"), ("format_rate", "format")):
        if f"reward/{name}_mean" in m:
            m[short] = m[f"reward/{name}_mean"]
    grouped = rewards.view(-1, group_size)
    std = grouped.std(dim=1, unbiased=True) if group_size > 1 else torch.zeros(grouped.shape[0])
    m["reward/group_std_mean"] = float(std.mean())
    m["reward/zero_std_group_frac"] = float(flat_groups(rewards, group_size).float().mean())
    m["reward/errors"] = float(sum(errors.values()))
    for k, v in diagnostics.items():
        m[f"reward/diag_{k}"] = float(v)
    return m


def advantage_metrics(adv: torch.Tensor) -> dict[str, float]:
    return {"adv/mean": float(adv.mean()), "adv/std": float(adv.std()) if adv.numel() > 1 else 0.0,
            "adv/min": float(adv.min()), "adv/max": float(adv.max())}


def response_metrics(lengths: Sequence[int], finish_reasons: Sequence[str]) -> dict[str, float]:
    return {
        "response/length_mean": statistics.fmean(lengths),
        "response/length_max": float(max(lengths)),
        "response/clipped_frac": sum(r == "length" for r in finish_reasons) / len(lengths),
        "samples": float(len(lengths)),
    }


def reduce_learner_metrics(per_rank: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One value per key over the data-parallel ranks: sums for GLOBALLY_NORMALISED terms and the off-policy
    token sums, maxima for MAX_KEYS, means for the rest."""
    out: dict[str, float] = {}
    for k in per_rank[0]:
        vals = [float(o[k]) for o in per_rank]
        if k in GLOBALLY_NORMALISED or k.startswith(SUM_PREFIX):
            out[k] = sum(vals)
        elif k in MAX_KEYS:
            out[k] = max(vals)
        else:
            out[k] = statistics.fmean(vals)
    return out


def learner_metrics(reduced: Mapping[str, float]) -> dict[str, float]:
    """The reduced learner outputs as logged: ``learner/<key>``, and the off-policy correction's token sums
    turned into ``offpolicy/...`` means (overall and per prompt modality)."""
    out = {f"learner/{k}": v for k, v in reduced.items() if not k.startswith(SUM_PREFIX) and k not in MAX_KEYS}
    out |= correction_means({k: v for k, v in reduced.items() if k.startswith(SUM_PREFIX)})
    out |= {k: v for k, v in reduced.items() if k in MAX_KEYS}
    return out


def staleness_metrics(learner_version: int, sample_versions: Sequence[int], tags: Sequence[str]) -> dict[str, float]:
    """Weight versions between each prompt's sampling weights and the learners', overall and per modality."""
    lags = [learner_version - v for v in sample_versions]
    m = {"staleness/mean": statistics.fmean(lags), "staleness/max": float(max(lags))}
    for tag in sorted(set(tags)):
        sel = [x for x, t in zip(lags, tags, strict=True) if t == tag]
        m[f"staleness/mean/{tag}"] = statistics.fmean(sel)
    return m
