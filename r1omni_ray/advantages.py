"""Advantage estimators for outcome rewards, by name (``grpo.advantage``): each maps a step's flat,
group-contiguous rewards ``[B*G]`` to one advantage per sample ``[B*G]``. A new one is a decorated function
(``register_advantage``), and the config's choices are this registry's keys; a user's own estimators live in a
module named in ``grpo.modules`` (imported, and its names checked, before Ray starts).

* ``grpo``: group-relative, ``(r - mean_g) / (std_g + eps)`` (GRPO, DeepSeekMath), with ``grpo.advantage_scale``
  ``batch`` (one std over the batch) or ``none`` (Dr. GRPO: no std).
* ``rloo``: leave-one-out baseline, ``r_i - mean_{j != i} r_j`` (Ahmadian et al. 2024, "Back to Basics").
* ``reinforce_pp``: REINFORCE++ (Hu 2025) for an outcome reward with the KL as a loss term: the rewards
  whitened over the whole batch, ``(r - mean_B) / (std_B + eps)``; no group baseline.
* ``reinforce_pp_baseline``: REINFORCE++-baseline: the group mean subtracted first, then whitened over the batch.

Samples are weighted equally in the batch statistics (verl whitens over tokens, so a long completion counts
more there). Groups with equal rewards get exactly 0 from the group-relative estimators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from r1omni_ray.grpo import flat_groups, group_advantages


@dataclass(frozen=True)
class AdvantageArgs:
    """What every estimator may read besides the rewards."""

    group_size: int
    scale: str = "group"  # grpo only: group | batch | none
    eps: float = 1e-4


AdvantageFn = Callable[[Tensor, AdvantageArgs], Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register ``fn(rewards [B*G], args) -> advantages [B*G]`` under ``name`` (a name is registered once)."""

    def deco(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGES and ADVANTAGES[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGES[name] = fn
        return fn

    return deco


def compute_advantages(name: str, rewards: Tensor, args: AdvantageArgs) -> Tensor:
    """The named estimator on checked rewards (flat, finite, a whole number of groups)."""
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; registered: {sorted(ADVANTAGES)}")
    if rewards.dim() != 1 or rewards.numel() % args.group_size:
        raise ValueError(f"rewards must be flat [B*G] with G={args.group_size}, got shape {tuple(rewards.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf")
    if rewards.numel() == 0:
        return torch.zeros_like(rewards, dtype=torch.get_default_dtype())
    if not torch.is_floating_point(rewards):
        rewards = rewards.to(torch.get_default_dtype())
    return ADVANTAGES[name](rewards, args)


def _whiten(x: Tensor, eps: float) -> Tensor:
    if x.numel() < 2:
        return torch.zeros_like(x)
    return (x - x.mean()) / (x.std() + eps)


@register_advantage("grpo")
def grpo_advantage(rewards: Tensor, args: AdvantageArgs) -> Tensor:
    return group_advantages(rewards, args.group_size, scale=args.scale, eps=args.eps)


@register_advantage("rloo")
def rloo_advantage(rewards: Tensor, args: AdvantageArgs) -> Tensor:
    G = args.group_size
    if G == 1:
        return torch.zeros_like(rewards)
    grouped = rewards.view(-1, G)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (G - 1)
    return (grouped - others).masked_fill(flat_groups(rewards, G)[:, None], 0.0).reshape(-1)


@register_advantage("reinforce_pp")
def reinforce_pp_advantage(rewards: Tensor, args: AdvantageArgs) -> Tensor:
    return _whiten(rewards, args.eps)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline_advantage(rewards: Tensor, args: AdvantageArgs) -> Tensor:
    grouped = rewards.view(-1, args.group_size)
    centered = (grouped - grouped.mean(dim=1, keepdim=True)).masked_fill(
        flat_groups(rewards, args.group_size)[:, None], 0.0).reshape(-1)
    return _whiten(centered, args.eps)
