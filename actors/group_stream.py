"""Streamed prompt groups (train.stream_groups): the rollout side of an asynchronous run as one stream of prompts
instead of one call per step and worker.

The stream: position p is prompt p % N of the (seed, p // N) batch, with that block's sampling seed, so what
is drawn at a position is a pure function of (seed, p) and the weights. Prompts go out in order,
rollout.stream_chunk at a time (one block per call), to whichever active worker has fewest calls queued (at
most rollout.stream_calls_per_worker; by default what the window holds), while fewer than
(max_staleness + 1) * N groups are ahead of the learners. Each call's groups are scored as it ends. A step
takes the first N groups to complete, in completion order, so one slow worker or one long completion holds
only its own group, which a later step takes. A group drawn more than max_staleness versions back is put back in the stream and drawn again; with
train.filter_groups a group with equal rewards is dropped and the stream goes on.

What was ahead at a checkpoint (in flight, completed but not taken, put back) is saved as positions
(``state``): a resumed or rolled-back run draws those again before the new ones, so no prompt is trained
twice or skipped; which step trains which prompt depends on timing.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

import torch

from actors.groups import RLVRGroups
from actors.rollout import PromptSamples, usable_samples
from actors.rollout_group import PendingRollout
from r1omni_ray.config import RunConfig
from r1omni_ray.data.errors import DataError
from r1omni_ray.data.sampler import batch_indices
from r1omni_ray.engines.base import SamplingParams
from r1omni_ray.grpo import flat_groups
from r1omni_ray.rewards import RewardBatch
from r1omni_ray.timing import PhaseTimer

log = logging.getLogger("r1omni_ray")


@dataclass
class Arrived:
    """A completed group: its samples, and its rewards (None for a record that failed to load). A call's
    reward-failure counters ride on its first group only, so merged batches count each failure once."""

    group: PromptSamples
    rewards: RewardBatch | None


@dataclass
class Taken:
    """What a step took from the stream: its groups (by position) with their rewards, the records that failed
    to load, every group's rewards scored for it (dropped ones included) and its counters."""

    groups: list[PromptSamples]
    rewards: RewardBatch | None
    skipped: list[PromptSamples]
    scored: RewardBatch | None
    counters: dict[str, float] = field(default_factory=dict)


def _merge(batches: list[RewardBatch]) -> RewardBatch | None:
    return functools.reduce(RewardBatch.merge, batches) if batches else None


def _is_flat(rb: RewardBatch) -> bool:
    return bool(flat_groups(torch.tensor(rb.total), len(rb.total))[0])


class GroupStream:
    def __init__(self, cfg: RunConfig, groups: RLVRGroups, records: list[Any],
                 params_for: Callable[[int], SamplingParams], score: Callable[[list[PromptSamples]], RewardBatch],
                 timer: PhaseTimer, bad: Container[str] = frozenset()) -> None:
        """params_for(block): the sampling parameters (seed) of the block's prompts; score: the reward call;
        bad: ids of records known not to decode, whose positions pass without a call."""
        self.cfg, self.groups, self.records = cfg, groups, records
        self.bad = bad
        self.params_for, self.score, self.timer = params_for, score, timer
        self.n = cfg.train.prompts_per_step
        self.next_pos = 0  # the first position never sent
        self.redo: list[int] = []  # positions to draw (again) before next_pos, ascending
        self.in_flight: list[PendingRollout] = []
        self.pool: deque[Arrived] = deque()  # completed and scored, not taken yet; in completion order
        self.stale_dropped = 0
        self.total = cfg.train.steps

    # ---- positions ----
    @functools.lru_cache(maxsize=64)  # noqa: B019 - one stream per run; a block is a permutation of the records
    def _block(self, block: int) -> list[int]:
        return batch_indices(len(self.records), self.n, block, self.cfg.train.seed)

    def item(self, pos: int) -> tuple[int, Any]:
        """(uid, record) of a position: the uid is the position, so every sample's seed is its own."""
        return pos, self.records[self._block(pos // self.n)[pos % self.n]]

    def _next_chunk(self, most: int) -> list[int]:
        """Up to ``most`` positions of one block: those to draw again first, then new ones."""
        src = self.redo
        if src:
            block = src[0] // self.n
            out = [p for p in src[:most] if p // self.n == block]
            del src[: len(out)]
            return out
        block = self.next_pos // self.n
        end = min(self.next_pos + most, (block + 1) * self.n)
        out = list(range(self.next_pos, end))
        self.next_pos = end
        return out

    def ahead(self) -> int:
        """Groups sent or completed that no step has taken yet."""
        return sum(len(p.items) for p in self.in_flight) + len(self.pool)

    # ---- sending ----
    def fill(self, learner_step: int, total: int) -> None:
        """With the learners at ``learner_step`` updates: keep (max_staleness + 1) steps of groups ahead, no more
        than the run's remaining steps need."""
        self.total = total
        k = self.cfg.train.max_staleness
        self.dispatch(min((k + 1) * self.n, max(0, total - learner_step) * self.n))

    def dispatch(self, limit: int) -> None:
        """Send calls to the least-loaded workers while fewer than ``limit`` groups are ahead."""
        rc, d = self.cfg.rollout, self.cfg.data
        rollout = self.groups.rollout
        if self.ahead() >= limit:
            return
        rollout.ensure_min()
        ids = rollout.worker_ids()
        per_worker = rc.stream_calls_per_worker or -(-limit // (len(ids) * rc.stream_chunk))
        passed = 0  # positions passed over in a row, their records known not to decode
        while (room := limit - self.ahead()) > 0:
            load = dict.fromkeys(ids, 0)
            for p in self.in_flight:
                if p.worker_id in load:
                    load[p.worker_id] += 1
            wid = min(ids, key=lambda w: load[w])
            if load[wid] >= per_worker:
                return
            chunk = self._next_chunk(min(rc.stream_chunk, room))
            items = [it for it in map(self.item, chunk) if it[1].id not in self.bad]
            if not items:  # known not to decode: nothing to send
                passed += len(chunk)
                if passed > 2 * len(self.records):
                    raise DataError(f"none of the {len(self.records)} training records decodes")
                continue
            passed = 0
            params = self.params_for(chunk[0] // self.n)
            self.in_flight.append(rollout.submit_to(wid, items, params, d.use_video, d.use_audio))

    # ---- receiving ----
    def receive(self) -> None:
        """Wait for a call to end; its groups join the pool, scored. A dead worker's prompts are drawn again on
        the survivors (RolloutGroup.collect)."""
        d = self.cfg.data
        with self.timer.phase("rollout"):
            ended, self.in_flight = self.groups.rollout.wait_any(self.in_flight)
        for p in ended:
            params = self.params_for(p.items[0][0] // self.n)
            with self.timer.phase("rollout"):
                got = self.groups.rollout.collect([p], params, d.use_video, d.use_audio)
            ok, bad = usable_samples(got, d.on_error)
            self.pool.extend(Arrived(g, None) for g in bad)
            if not ok:
                continue
            rb = self.score(ok)
            G = len(ok[0].completions)
            for j, g in enumerate(ok):
                part = rb.select(list(range(j * G, (j + 1) * G)))
                if j:  # the call's counters stay with its first group
                    part.errors, part.diagnostics, part.error_examples = {}, {}, {}
                self.pool.append(Arrived(g, part))

    def take(self, step: int, learner_version: int) -> Taken:
        """Step ``step``'s groups with the learners at ``learner_version``: the first N to complete within the
        staleness window (with the filter: the first N with differing rewards, looking at no more than
        (1 + filter_max_rounds) * N groups, then topped up with flat ones). Keeps the workers busy while it
        waits."""
        tc = self.cfg.train
        k, n = tc.max_staleness, self.n
        cap = n * (1 + (tc.filter_max_rounds if tc.filter_groups else 0))
        taken: list[Arrived] = []
        flat: list[Arrived] = []
        skipped: list[PromptSamples] = []
        scored: list[RewardBatch] = []
        examined = stale = 0
        while len(taken) < n and examined < cap:
            if not self.pool:
                need = n - len(taken)
                remaining = max(0, self.total - step) * n - len(taken)
                self.dispatch(max(need, min((k + 1) * n - len(taken), remaining)))
                self.receive()
                continue
            a = self.pool.popleft()
            g = a.group
            if a.rewards is None:
                skipped.append(g)
                examined += g.record_id not in self.bad  # one already known was in flight when found: no slot
                continue
            if learner_version - g.weight_version > k:  # never trained on: drawn again with newer weights
                stale += 1
                self.redo = sorted(self.redo + [g.uid])
                continue
            examined += 1
            scored.append(a.rewards)
            (flat if tc.filter_groups and _is_flat(a.rewards) else taken).append(a)
        informative = len(taken)
        if tc.filter_groups and len(taken) < n:
            taken += flat[len(flat) - min(len(flat), n - len(taken)):]  # the newest flat groups
        if stale:
            self.stale_dropped += stale
            log.warning("%d groups were drawn %d+ weight versions back (train.max_staleness=%d); drawing them again",
                        stale, k + 1, k)
        taken.sort(key=lambda a: a.group.uid)
        counters = {"async/stale_redrawn": float(stale), "async/stale_redrawn_total": float(self.stale_dropped),
                    "stream/ahead": float(self.ahead()),
                    "stream/other_step_groups": float(sum(a.group.uid // n != step for a in taken))}
        if tc.filter_groups:
            counters |= {"filter/rounds": float(max(0, -(-(examined - n) // n))),
                         "filter/informative_groups": float(informative),
                         "filter/flat_groups_seen": float(len(flat)),
                         "filter/short_steps": float(informative < n)}
        return Taken([a.group for a in taken], _merge([a.rewards for a in taken if a.rewards is not None]),
                     skipped, _merge(scored), counters)

    # ---- boundaries and checkpoints ----
    def positions_ahead(self) -> list[int]:
        return sorted(self.redo + [u for p in self.in_flight for u, _ in p.items] + [a.group.uid for a in self.pool])

    def state(self) -> dict[str, Any]:
        """What a checkpoint saves: the next new position and every position ahead (drawn again on resume)."""
        return {"next": self.next_pos, "redo": self.positions_ahead()}

    def restore(self, state: dict[str, Any] | None, step: int = 0) -> None:
        """Forget what is ahead (drawn by weights that no longer exist) and continue from a checkpoint's
        state; None: a checkpoint of a run that did not stream, or the start: block ``step`` onwards."""
        self.in_flight, self.pool = [], deque()
        if state is None:
            self.next_pos, self.redo = step * self.n, []
        else:
            self.next_pos, self.redo = int(state["next"]), sorted(int(p) for p in state["redo"])
