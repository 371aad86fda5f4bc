"""Deterministic, resumable data order: step s always gets the same prompts for a given seed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the step's batch: epochs are concatenated reshuffles, so the order depends only on
    (n, batch_size, step, seed) and a resumed run sees exactly the same batches."""
    if n <= 0:
        raise ValueError("empty dataset")
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        out.append(int(epoch_permutation(n, seed, epoch)[pos]))
    return out


def refill_indices(n: int, count: int, step: int, round_: int, seed: int) -> list[int]:
    """Indices of a dynamic-sampling refill (train.filter_groups): ``count`` records drawn for round ``round_``
    (1, 2, ...) of step ``step``, a pure function of its arguments so a resumed run refills alike."""
    if n <= 0:
        raise ValueError("empty dataset")
    rng = np.random.default_rng([seed, step, round_, 0x5EED])
    return [int(i) for i in rng.choice(n, size=count, replace=count > n)]


def split_even(n_items: int, n_parts: int) -> list[range]:
    """Contiguous, balanced split (sizes differ by at most one): prompts over rollout workers, samples
    over learners, a learner's samples over its micro-batches."""
    base, extra = divmod(n_items, n_parts)
    out, start = [], 0
    for i in range(n_parts):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def split_by_groups(keys: Sequence[Any], n_parts: int, min_size: int = 1, max_size: int | None = None) -> list[range]:
    """Contiguous split into exactly ``n_parts`` parts of ``min_size`` to ``max_size`` items (widened only where
    no split could meet them) whose boundaries fall where ``keys`` changes (between prompt groups, so a prompt
    is embedded and run once per part) when one lies within a quarter of a balanced part of the balanced
    boundary and keeps the sizes in bounds; else the balanced boundary, moved into bounds."""
    n = len(keys)
    if not 0 < n_parts <= n:
        raise ValueError(f"cannot split {n} items into {n_parts} non-empty parts")
    lo_size = max(1, min(min_size, n // n_parts))
    hi_size = max(max_size if max_size is not None else n, -(-n // n_parts))
    changes = [i for i in range(1, n) if keys[i] != keys[i - 1]]
    slack = n / n_parts / 4
    bounds = [0]
    for k, r in enumerate(split_even(n, n_parts)[1:], start=1):
        left = n_parts - k  # parts after this boundary: each needs lo_size..hi_size items
        lo = max(bounds[-1] + lo_size, n - left * hi_size)
        hi = min(bounds[-1] + hi_size, n - left * lo_size)
        near = [c for c in changes if lo <= c <= hi and abs(c - r.start) <= slack]
        bounds.append(min(near, key=lambda c: (abs(c - r.start), c)) if near else min(max(r.start, lo), hi))
    bounds.append(n)
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def plan_learner_shards(keys: Sequence[Any], n_learners: int, micro_batch_size: int) -> tuple[list[range], int]:
    """(each learner's contiguous share, micro-batches per learner). Shares are cut between prompt groups
    where one is near, but only within the sizes a balanced split would allow: no share needs more
    micro-batches, and none is so small that the shared micro-batch count drops, so micro-batches never
    exceed ``micro_batch_size`` where a balanced split's would not (it is the memory knob)."""
    even = split_even(len(keys), n_learners)
    num_micro = shared_micro_batches(even, micro_batch_size)
    parts = split_by_groups(keys, n_learners, min_size=num_micro, max_size=num_micro * micro_batch_size)
    return parts, shared_micro_batches(parts, micro_batch_size)


def shared_micro_batches(parts: list[range], micro_batch_size: int) -> int:
    """One micro-batch count for every data-parallel rank (ZeRO-3 forwards are collective): enough for the
    largest share at micro_batch_size, but never more than the smallest share has samples."""
    return min(-(-max(len(p) for p in parts) // micro_batch_size), min(len(p) for p in parts))
