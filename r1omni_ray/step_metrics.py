"""Step metrics as pure functions of what a step produced (rewards, advantages, completions, the learners'
per-rank outputs). The driver logs them; nothing here talks to Ray."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import torch

# Learner outputs already divided by global token/sequence counts: summing over ranks gives the batch
# value. Every other learner output is a per-rank mean, averaged over ranks.
GLOBALLY_NORMALISED = frozenset({"loss", "policy_loss", "kl_loss"})


def reward_metrics(total: Sequence[float], per_reward: Mapping[str, Sequence[float]], group_size: int,
                   errors: Mapping[str, int], diagnostics: Mapping[str, int]) -> dict[str, float]:
    rewards = torch.tensor(list(total), dtype=torch.float32)
    m = {"reward/total_mean": float(rewards.mean())}
    for name, vals in per_reward.items():
        m[f"reward/{name}_mean"] = statistics.fmean(vals) if vals else 0.0
    m["accuracy"] = m.get("reward/accuracy_mean", 0.0)
    m["format_rate"] = m.get("reward/format_mean", 0.0)
    grouped = rewards.view(-1, group_size)
    std = grouped.std(dim=1, unbiased=True) if group_size > 1 else torch.zeros(grouped.shape[0])
    m["reward/group_std_mean"] = float(std.mean())
    m["reward/zero_std_group_frac"] = float((std < 1e-6).float().mean())
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
    """One value per key over the data-parallel ranks (sum or mean, see GLOBALLY_NORMALISED)."""
    out: dict[str, float] = {}
    for k in per_rank[0]:
        vals = [float(o[k]) for o in per_rank]
        out[k] = sum(vals) if k in GLOBALLY_NORMALISED else statistics.fmean(vals)
    return out
