"""The rollout workers as one group: placement, balanced dispatch, and replacement of a dead worker with
re-issue of exactly its prompts. Weight sync is not this group's business: whoever owns it registers
``after_replace`` to bring new workers to the current weights."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import ray
from ray.exceptions import RayActorError, RayTaskError

from actors.calls import ActorCallError, Attempt, retry_replacing
from actors.placement import (
    actor_options,
    bundles,
    create_placement_group,
    in_bundle,
    release,
    rollout_gpus_per_worker,
)
from actors.rollout import PromptSamples, RolloutWorker
from r1omni_ray.config import RunConfig
from r1omni_ray.data.sampler import split_even
from r1omni_ray.engines.base import SamplingParams
from r1omni_ray.tracking import progress

log = logging.getLogger("r1omni_ray")


class PendingRollout(NamedTuple):
    """One in-flight rollout call: its worker, its items, the ref of its PromptSamples list, and one media
    ref per item."""

    worker_index: int
    items: list[tuple[int, Any]]
    ref: Any
    media_refs: list[Any]


class RolloutGroup:
    def __init__(self, cfg: RunConfig, ckpt_dir: str) -> None:
        self.cfg, self.ckpt_dir = cfg, ckpt_dir
        rc = cfg.rollout
        self.gpus_per_worker = rollout_gpus_per_worker(cfg)
        self.pg = create_placement_group(
            bundles(rc.num_workers, rc.num_cpus_per_worker, self.gpus_per_worker, rc.node_resource), cfg,
            "rollout group (rollout.num_workers x num_cpus/gpus_per_worker)")
        self.workers = [self._make(i) for i in range(rc.num_workers)]
        self.restarts = 0
        self.reissued = 0
        self.after_replace: Callable[[list[int]], None] | None = None
        self._sent_to: dict[str, Any] = {}  # rollout ref (hex) -> worker handle it went to

    def _make(self, i: int) -> Any:
        rc = self.cfg.rollout
        return RolloutWorker.options(**actor_options(
            self.cfg, num_cpus=rc.num_cpus_per_worker, num_gpus=self.gpus_per_worker,
            scheduling_strategy=in_bundle(self.pg, i))).remote(i, self.ckpt_dir, self.cfg.to_dict())

    def names(self) -> list[str]:
        return [f"rollout-worker-{i}" for i in range(len(self.workers))]

    def submit(self, items: list[tuple[int, Any]], params: SamplingParams, use_video: bool = True,
               use_audio: bool = True, next_items: list[tuple[int, Any]] | None = None) -> list[PendingRollout]:
        """next_items: the next call's items (the next step's), split the same way: each worker decodes its
        share of them while it generates this call's (rollout.prefetch_media)."""
        out = []
        split = split_even(len(items), len(self.workers))
        ahead = split_even(len(next_items), len(self.workers)) if next_items and self.cfg.rollout.prefetch_media else None
        for wi, part in enumerate(split):
            if len(part):
                sub = [items[j] for j in part]
                w = self.workers[wi]
                pre = [next_items[j][1] for j in ahead[wi]] if ahead is not None else None
                refs = w.rollout.options(num_returns=1 + len(sub)).remote(sub, params, use_video, use_audio, pre)
                self._sent_to[refs[0].hex()] = w  # hex, not the ref: the dict must not pin results
                out.append(PendingRollout(wi, sub, refs[0], list(refs[1:])))
        return out

    def collect(self, pending: list[PendingRollout], params: SamplingParams, use_video: bool = True,
                use_audio: bool = True) -> list[PromptSamples]:
        """Gather results. A dead worker's whole share is lost: the worker is replaced (and brought to the
        current weights by ``after_replace``), and exactly those prompts are re-issued, so every uid ends up
        in one PromptSamples."""
        got: dict[int, PromptSamples] = {}
        todo = {"pending": pending}

        def attempt() -> Attempt:
            lost: list[tuple[int, Any]] = []
            dead: set[int] = set()
            for wi, items, ref, media_refs in todo["pending"]:
                sent_to = self._sent_to.pop(ref.hex(), None)
                try:
                    samples = ray.get(ref)
                except RayActorError as e:
                    log.warning("rollout worker %d died (%s); re-issuing its %d prompts", wi, type(e).__name__,
                                len(items))
                    lost.extend(items)
                    # It may already have been replaced (e.g. it died during a weight broadcast).
                    if sent_to is None or self.workers[wi] is sent_to:
                        dead.add(wi)
                    continue
                except RayTaskError as e:  # a bug, not bad data (that comes back as PromptSamples.error)
                    raise ActorCallError(f"rollout-worker-{wi}", "rollout", e) from e
                for s, mref in zip(samples, media_refs, strict=True):
                    if s.uid in got:
                        raise RuntimeError(f"rollout returned prompt uid {s.uid} twice")
                    s.media_ref = mref if s.error is None else None
                    got[s.uid] = s
            if lost:  # re-issued after the dead workers are replaced (retry_replacing calls replace first)
                todo["lost"] = lost
            return Attempt(not lost, sorted(dead))

        def replace_and_reissue(dead: list[int]) -> None:
            if dead:
                self.replace(dead)
            lost = todo.pop("lost", [])
            self.reissued += len(lost)
            todo["pending"] = self.submit(lost, params, use_video, use_audio)

        retry_replacing(attempt, replace_and_reissue, self.cfg.rollout.max_restarts, "rollout")
        return [got[u] for u in sorted(got)]

    def replace(self, indices: Sequence[int], resync: bool = True) -> None:
        """New actors in the dead workers' placement-group slots, then (resync) ``after_replace``."""
        for wi in indices:
            try:
                ray.kill(self.workers[wi], no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
            self.workers[wi] = self._make(wi)
            self.restarts += 1
        if resync and self.after_replace is not None:
            self.after_replace(list(indices))

    def shutdown(self) -> None:
        release(self.workers, self.pg)


def wait_with_progress(pending: list[PendingRollout] | None, desc: str) -> None:
    """Advance a progress bar as rollout shards finish; results and failures are then gathered by
    RolloutGroup.collect. A no-op when the bar is disabled (non-interactive logs)."""
    if not pending:
        return
    if not all(isinstance(p.ref, ray.ObjectRef) for p in pending):
        return
    bar = progress(total=sum(len(p.items) for p in pending), desc=desc, unit="prompt")
    if bar.disable:
        return
    sizes = {p.ref: len(p.items) for p in pending}
    waiting = list(sizes)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        bar.update(sum(sizes[r] for r in done))
    bar.close()
