"""Bucketed weight broadcast from learner rank 0 to rollout workers over a dedicated process group.

The group is "stateless" (its own TCPStore, not the default torch.distributed group) so it can span
processes that already belong to other groups (the learners' data-parallel group) and be rebuilt when a
rollout worker is replaced. Tensors travel in flat per-dtype buckets: a few large collectives instead of
one per parameter.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A broadcast/collective failed or timed out; the message names the group member."""


@dataclass(frozen=True)
class ParamMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"; strings pickle cleanly across Ray

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()


def param_metas(named: Iterable[tuple[str, torch.Tensor]]) -> list[ParamMeta]:
    return [ParamMeta(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in named]


def plan_buckets(metas: Sequence[ParamMeta], bucket_bytes: int) -> list[list[int]]:
    """Group parameter indices into buckets of one dtype and at most bucket_bytes (a larger tensor
    gets a bucket of its own)."""
    if bucket_bytes <= 0:
        return [[i] for i in range(len(metas))]  # one collective per tensor (for benchmarks)
    buckets: list[list[int]] = []
    open_by_dtype: dict[str, tuple[list[int], int]] = {}
    for i, m in enumerate(metas):
        cur, size = open_by_dtype.get(m.dtype, ([], 0))
        if cur and size + m.nbytes > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(i)
        open_by_dtype[m.dtype] = (cur, size + m.nbytes)
    buckets.extend(cur for cur, _ in open_by_dtype.values() if cur)
    return buckets


def unflatten(flat: torch.Tensor, metas: Sequence[ParamMeta]) -> list[torch.Tensor]:
    out, off = [], 0
    for m in metas:
        out.append(flat[off : off + m.numel].view(m.shape))
        off += m.numel
    return out


class BroadcastGroup:
    """A process group of its own (learner rank 0 = rank 0, rollout worker i = rank i + 1)."""

    def __init__(
        self, backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: float, name: str
    ) -> None:
        self.rank, self.world_size, self.name, self.backend = rank, world_size, name, backend
        self.buffers: dict[tuple[torch.dtype, str], torch.Tensor] = {}
        self.timeout = datetime.timedelta(seconds=timeout_s)
        try:
            store = dist.TCPStore(host, port, world_size, rank == 0, timeout=self.timeout)
            if backend == "gloo":
                self.pg = dist.ProcessGroupGloo(store, rank, world_size, self.timeout)
            elif backend == "nccl":
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = self.timeout
                self.pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
            else:
                raise ValueError(f"unknown broadcast backend {backend!r} (gloo or nccl)")
        except Exception as e:  # surface which member failed to join
            raise CollectiveError(f"{name}: joining weight-broadcast group {host}:{port} as rank {rank} failed: {e}") from e

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        try:
            self.pg.broadcast(tensor, src).wait(self.timeout)
        except Exception as e:
            raise CollectiveError(
                f"{self.name}: weight broadcast (rank {self.rank}/{self.world_size}) failed or timed out "
                f"after {self.timeout.total_seconds():.0f}s: {e}"
            ) from e


def _staging(group: BroadcastGroup, dtype: torch.dtype, numel: int, device: torch.device | str) -> torch.Tensor:
    """A flat staging buffer reused across buckets and broadcasts (one per dtype/device).

    Allocating a fresh multi-MB buffer per bucket costs new pages every time (large allocations bypass
    the allocator's free lists); bench.weight_broadcast measured 2.3 s -> 0.6 s for 0.5B with reuse.
    """
    key = (dtype, str(device))
    buf = group.buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        group.buffers[key] = buf
    return buf[:numel]


def send_buckets(
    group: BroadcastGroup,
    metas: Sequence[ParamMeta],
    buckets: Sequence[Sequence[int]],
    get_tensors: Callable[[Sequence[int]], Sequence[torch.Tensor]],
    device: torch.device | str = "cpu",
) -> int:
    """Rank 0 side. get_tensors(indices) returns the full tensors of one bucket (after a ZeRO-3 gather).
    Returns bytes sent."""
    sent = 0
    for b in buckets:
        ms = [metas[i] for i in b]
        flat = _staging(group, ms[0].torch_dtype, sum(m.numel for m in ms), device)
        for dst, t in zip(unflatten(flat, ms), get_tensors(b), strict=True):
            dst.copy_(t.detach())
        group.broadcast(flat, 0)
        sent += flat.numel() * flat.element_size()
    return sent


def receive_buckets(
    group: BroadcastGroup,
    metas: Sequence[ParamMeta],
    buckets: Sequence[Sequence[int]],
    apply: Callable[[list[tuple[str, torch.Tensor]]], None],
    device: torch.device | str = "cpu",
) -> int:
    """Worker side: receive each bucket and hand its (name, tensor) pairs to `apply`, which must copy them
    (copy_ into the model, or vLLM's load_weights) since the staging buffer is reused."""
    received = 0
    for b in buckets:
        ms = [metas[i] for i in b]
        flat = _staging(group, ms[0].torch_dtype, sum(m.numel for m in ms), device)
        group.broadcast(flat, 0)
        apply([(m.name, t) for m, t in zip(ms, unflatten(flat, ms), strict=True)])
        received += flat.numel() * flat.element_size()
    return received
