"""Deterministic, resumable data order: step s always gets the same prompts for a given seed."""

from __future__ import annotations

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


def shared_micro_batches(parts: list[range], micro_batch_size: int) -> int:
    """One micro-batch count for every data-parallel rank (ZeRO-3 forwards are collective): enough for the
    largest share at micro_batch_size, but never more than the smallest share has samples."""
    return min(-(-max(len(p) for p in parts) // micro_batch_size), min(len(p) for p in parts))
