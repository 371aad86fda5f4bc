"""The rollout workers as one elastic group: one placement group per worker, workers that join at step
boundaries once placed and loaded, a target moved by the scale command, balanced dispatch, and dead workers
dropped with exactly their prompts re-issued to the survivors. Weight sync is not this group's business:
whoever owns it registers ``on_join`` to bring workers admitted mid-call to the current weights, and
re-forms its group when ``changed`` says the membership moved."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group

from actors import load_progress
from actors.calls import ActorCallError, Attempt, retry_replacing
from actors.placement import (
    CapacityError,
    actor_options,
    bundles,
    in_bundle,
    request_capacity,
    rollout_gpus_per_worker,
    shortfall,
    unschedulable,
)
from actors.rollout import PromptSamples, RolloutWorker
from actors.scale_control import ScaleRefused
from r1omni_ray.config import ConfigError, RunConfig
from r1omni_ray.data.sampler import split_even
from r1omni_ray.engines.base import SamplingParams
from r1omni_ray.tracking import progress

log = logging.getLogger("r1omni_ray")


class WorkerLoadTimeout(ConfigError):
    """A rollout worker took longer than rollout.load_timeout_s to load (placement was not the problem): the
    run stops at start with the phase it was in."""


class PendingRollout(NamedTuple):
    """One in-flight rollout call: its worker's id, its items, the ref of its PromptSamples list, and one
    media ref per item."""

    worker_id: int
    items: list[tuple[int, Any]]
    ref: Any
    media_refs: list[Any]


@dataclass
class WorkerSlot:
    """One rollout worker: its own placement group (placed when the cluster has room), then its actor
    (loaded once its ``info`` answers)."""

    id: int
    pg: Any
    placed: Any  # ObjectRef of pg.ready()
    actor: Any = None
    loaded: Any = None  # ObjectRef of actor.info()
    started: float | None = None  # time.monotonic() when its actor was started (loading since)
    warned: bool = False  # told the log it is past rollout.load_timeout_s

    @property
    def name(self) -> str:
        return f"rollout-worker-{self.id}"


def _kill(slot: WorkerSlot) -> None:
    load_progress.forget(slot.name)  # its load report, if it was still loading
    if slot.actor is not None:
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
    try:
        remove_placement_group(slot.pg)
    except Exception:  # noqa: BLE001 - already gone with the cluster
        pass


class RolloutGroup:
    def __init__(self, cfg: RunConfig, ckpt_dir: str) -> None:
        """Starts once rollout.min_workers workers are loaded; the rest of rollout.num_workers join at later
        step boundaries. Placement is timed by ray.placement_timeout_s (a PlacementError), each worker's load
        by rollout.load_timeout_s (a WorkerLoadTimeout naming the phase it is in)."""
        self.cfg, self.ckpt_dir = cfg, ckpt_dir
        rc = cfg.rollout
        self.gpus_per_worker = rollout_gpus_per_worker(cfg)
        self.bundle = bundles(1, rc.num_cpus_per_worker, self.gpus_per_worker, rc.node_resource)[0]
        self.min_workers, self.max_workers = rc.worker_bounds()
        self.target = rc.num_workers
        self.active: list[WorkerSlot] = []  # the broadcast group's members, which take rollouts
        self.pending: list[WorkerSlot] = []  # placing or loading
        self._next_id = 0
        self.restarts = 0  # replacements requested for workers that died
        self.reissued = 0
        self.events = {"joined": 0, "left": 0, "lost": 0}  # since the last step's metrics
        self.changed = False  # membership moved since the broadcast group was formed
        self.on_join: Callable[[], None] | None = None
        self._load_failures = 0  # in a row: a worker that cannot load (a bug, a bad checkpoint) is not retried forever
        self._fill()
        try:
            self._wait_for(self.min_workers, cfg.ray.placement_timeout_s, "ray.placement_timeout_s")
        except BaseException:  # nothing placed or started may outlive a group that failed to start
            self.shutdown()
            raise
        self.events["joined"] = 0  # the starting members are not join events

    # ---- membership ----
    @property
    def workers(self) -> list[Any]:
        return [s.actor for s in self.active]

    def names(self) -> list[str]:
        return [s.name for s in self.active]

    def _fill(self) -> None:
        """Request placement groups until active + pending reaches the target (pending ones wait for room)."""
        while len(self.active) + len(self.pending) < self.target:
            pg = placement_group([self.bundle], strategy="PACK")
            self.pending.append(WorkerSlot(self._next_id, pg, pg.ready()))
            self._next_id += 1
        if self.cfg.rollout.autoscale:
            request_capacity(self.run_bundles())

    def run_bundles(self) -> list[dict[str, float]]:
        """Every bundle the run needs at its current target: what the autoscaler is asked to make room for."""
        c = self.cfg
        lc, wc = c.learner, c.reward
        out = bundles(lc.num_learners, lc.num_cpus_per_learner, lc.num_gpus_per_learner, lc.node_resource)
        out += bundles(wc.num_actors, wc.num_cpus_per_actor, 0.0)
        return out + [dict(self.bundle) for _ in range(self.target)]

    def _make(self, slot: WorkerSlot) -> Any:
        rc = self.cfg.rollout
        return RolloutWorker.options(**actor_options(
            self.cfg, num_cpus=rc.num_cpus_per_worker, num_gpus=self.gpus_per_worker,
            scheduling_strategy=in_bundle(slot.pg, 0))).remote(slot.id, self.ckpt_dir, self.cfg.to_dict())

    def poll(self) -> list[WorkerSlot]:
        """Advance the pending workers without waiting: start an actor in each newly placed group; return
        those whose actor has loaded. One that died while loading is replaced by a new request."""
        loaded = []
        for s in list(self.pending):
            if s.actor is None:
                if not ray.wait([s.placed], timeout=0)[0]:
                    continue
                s.actor = self._make(s)
                s.loaded = s.actor.info.remote()
                s.started = time.monotonic()
            if not ray.wait([s.loaded], timeout=0)[0]:
                self._check_load(s)
                continue
            try:
                info = ray.get(s.loaded)
            except Exception as e:  # noqa: BLE001 - its node went, or it failed to load
                self.pending.remove(s)
                _kill(s)
                self._load_failures += 1
                if self._load_failures > self.cfg.rollout.max_restarts:
                    raise ActorCallError(s.name, "__init__", e) from e
                log.warning("%s died while loading (%s); requesting another", s.name, type(e).__name__)
                self.restarts += 1
                self._fill()
                continue
            self._load_failures = 0
            load_progress.forget(s.name)
            phases = ", ".join(f"{k} {v:.0f} s" for k, v in (info.get("load_s") or {}).items())
            log.info("%s loaded in %.0f s (%s)", s.name, time.monotonic() - (s.started or time.monotonic()), phases)
            loaded.append(s)
        return loaded

    def _check_load(self, s: WorkerSlot) -> str | None:
        """A worker loading past rollout.load_timeout_s: the message (logged once) naming the phase it is in;
        _wait_for stops the run with it where the run cannot go on without that worker."""
        limit = self.cfg.rollout.load_timeout_s
        if s.started is None or time.monotonic() - s.started <= limit:
            return None
        where = load_progress.describe(load_progress.read(s.name))
        msg = (f"{s.name} has been loading for {time.monotonic() - s.started:.0f} s, over rollout.load_timeout_s="
               f"{limit:g} ({where}); a 7B start with vLLM (load, LM export, profile, compile, CUDA graphs) "
               "takes minutes: raise rollout.load_timeout_s if this phase is expected to take that long")
        if not s.warned:
            s.warned = True
            log.warning("%s", msg)
        return msg

    def admit(self) -> int:
        """Loaded workers join (up to the target). Their weights are not current: the caller re-forms the
        broadcast group and sends them (``changed`` is set)."""
        n = 0
        for s in self.poll():
            if len(self.active) >= self.target:
                break
            self.pending.remove(s)
            self.active.append(s)
            self.events["joined"] += 1
            self.changed = True
            n += 1
            log.info("%s joined: %d rollout workers (target %d, %d pending)", s.name, len(self.active),
                     self.target, len(self.pending))
        return n

    def leaving(self) -> bool:
        """Whether workers above the target leave at the next boundary (their rollouts must end first)."""
        return len(self.active) > self.target

    def at_boundary(self) -> bool:
        """A step boundary (no rollout in flight): workers above the target leave, loaded ones join.
        Returns whether the membership changed (the broadcast group must be re-formed)."""
        while len(self.active) > self.target:
            s = self.active.pop()  # the last to join leaves first
            _kill(s)
            self.events["left"] += 1
            self.changed = True
            log.info("%s left: %d rollout workers (target %d)", s.name, len(self.active), self.target)
        self.admit()
        return self.changed

    def drop(self, ids: list[int]) -> None:
        """Workers that died (with their node, or killed): out of the group at once, a replacement requested
        (it joins when the cluster can place it)."""
        for s in [s for s in self.active if s.id in ids]:
            self.active.remove(s)
            _kill(s)
            self.restarts += 1
            self.events["lost"] += 1
            self.changed = True
            log.warning("%s lost: %d rollout workers left (min %d); a replacement is requested", s.name,
                        len(self.active), self.min_workers)
        self._fill()

    def ensure_min(self) -> None:
        """Below rollout.min_workers: wait for capacity (rollout.capacity_timeout_s), bring the new workers
        to the current weights (``on_join``), or raise a PlacementError (the driver then checkpoints)."""
        need = max(self.min_workers, 1)
        if len(self.active) >= need:
            return
        log.warning("%d of rollout.min_workers=%d rollout workers: waiting up to %gs for capacity", len(self.active),
                    need, self.cfg.rollout.capacity_timeout_s)
        self._wait_for(need, self.cfg.rollout.capacity_timeout_s, "rollout.capacity_timeout_s")
        if self.on_join is not None:
            self.on_join()

    def _wait_for(self, n: int, timeout_s: float, knob: str) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.admit()
            if len(self.active) >= n:
                return
            left = deadline - time.monotonic()
            loading = [s for s in self.pending if s.actor is not None]
            overdue = [m for s in loading if (m := self._check_load(s))]
            if overdue and len(self.active) + len(loading) - len(overdue) < n:
                raise WorkerLoadTimeout(overdue[0]) if self.on_join is None else CapacityError(overdue[0])
            # the timeout is placement's: once enough workers are placed, their loading is timed on its own
            if left <= 0 and len(self.active) + len(loading) < n:
                err = unschedulable(self.cfg, f"rollout workers ({len(self.active)} of rollout.min_workers={n} up)",
                                    n - len(self.active), self.bundle, timeout_s, knob)
                raise err if self.on_join is None else CapacityError(str(err))  # at start / mid-run
            refs = [s.loaded if s.actor is not None else s.placed for s in self.pending]
            ray.wait(refs, num_returns=1, timeout=min(max(left, 0.0), 1.0) or 1.0)

    def resize(self, n: int) -> str:
        """Move the target to ``n`` workers: new ones are requested now and join at a step boundary once
        loaded; surplus pending requests are cancelled now, surplus active workers leave at the next
        boundary. Returns the state applied, or raises ScaleRefused with the one-line reason."""
        if not self.min_workers <= n <= self.max_workers:
            raise ScaleRefused(f"{n} rollout workers is outside [rollout.min_workers, rollout.max_workers] = "
                               f"[{self.min_workers}, {self.max_workers}]")
        placed = sum(1 for s in self.pending if ray.wait([s.placed], timeout=0)[0])  # hold their resources
        more = n - len(self.active) - placed
        if more > 0 and not self.cfg.rollout.autoscale and (why := shortfall(self.bundle, more)):
            raise ScaleRefused(f"{why} ({more} x {self.bundle} for {n} rollout workers; rollout.autoscale=true "
                               "waits for the autoscaler instead)")
        self.target = n
        while self.pending and len(self.active) + len(self.pending) > n:
            # unplaced requests go first, then the newest
            s = min(self.pending, key=lambda s: (s.actor is not None, -s.id))
            self.pending.remove(s)
            _kill(s)
        self._fill()
        return self.state_line()

    def state(self) -> dict[str, int]:
        return {"target": self.target, "active": len(self.active), "pending": len(self.pending),
                "min": self.min_workers, "max": self.max_workers}

    def state_line(self) -> str:
        st = self.state()
        return (f"rollout workers: target {st['target']}, active {st['active']}, pending {st['pending']} "
                f"(bounds [{st['min']}, {st['max']}])")

    def metrics(self) -> dict[str, float]:
        """Per-step membership metrics; the join/leave/loss counts since the last call."""
        m = {"rollout/num_workers": float(len(self.active)), "rollout/pending_workers": float(len(self.pending)),
             "rollout/target_workers": float(self.target)}
        m |= {f"rollout/{k}": float(v) for k, v in self.events.items()}
        self.events = dict.fromkeys(self.events, 0)
        return m

    # ---- rollouts ----
    def submit(self, items: list[tuple[int, Any]], params: SamplingParams, use_video: bool = True,
               use_audio: bool = True, next_items: list[tuple[int, Any]] | None = None) -> list[PendingRollout]:
        """Split ``items`` evenly over the active workers. next_items: the next call's items (the next
        step's), split the same way: each worker decodes its share of them while it generates this call's
        (rollout.prefetch_media)."""
        self.ensure_min()
        out = []
        n = len(self.active)
        split = split_even(len(items), n)
        ahead = split_even(len(next_items), n) if next_items and self.cfg.rollout.prefetch_media else None
        for k, part in enumerate(split):
            if len(part):
                sub = [items[j] for j in part]
                s = self.active[k]
                pre = [next_items[j][1] for j in ahead[k]] if ahead is not None else None
                refs = s.actor.rollout.options(num_returns=1 + len(sub)).remote(sub, params, use_video, use_audio, pre)
                out.append(PendingRollout(s.id, sub, refs[0], list(refs[1:])))
        return out

    def worker_ids(self) -> list[int]:
        """The active workers' ids (what submit_to takes), in join order."""
        return [s.id for s in self.active]

    def submit_to(self, worker_id: int, items: list[tuple[int, Any]], params: SamplingParams, use_video: bool = True,
                  use_audio: bool = True) -> PendingRollout:
        """One rollout call of ``items`` on one active worker (streamed dispatch: the caller picks a free one)."""
        s = next(s for s in self.active if s.id == worker_id)
        refs = s.actor.rollout.options(num_returns=1 + len(items)).remote(items, params, use_video, use_audio, None)
        return PendingRollout(s.id, items, refs[0], list(refs[1:]))

    @staticmethod
    def wait_any(pending: list[PendingRollout]) -> tuple[list[PendingRollout], list[PendingRollout]]:
        """Blocks until at least one call has ended (returned, raised or lost its worker): (ended, running)."""
        done, _ = ray.wait([p.ref for p in pending], num_returns=1, fetch_local=False)
        ended = set(done)
        return [p for p in pending if p.ref in ended], [p for p in pending if p.ref not in ended]

    def collect(self, pending: list[PendingRollout], params: SamplingParams, use_video: bool = True,
                use_audio: bool = True) -> list[PromptSamples]:
        """Gather results. A dead worker's whole share is lost: the worker is dropped (a replacement is
        requested), and exactly those prompts are re-issued to the survivors (after waiting for capacity
        below rollout.min_workers), so every uid ends up in one PromptSamples."""
        got: dict[int, PromptSamples] = {}
        todo = {"pending": pending}

        def attempt() -> Attempt:
            lost: list[tuple[int, Any]] = []
            dead: set[int] = set()
            for wid, items, ref, media_refs in todo["pending"]:
                try:
                    samples = ray.get(ref)
                except (RayActorError, ObjectLostError) as e:
                    # ObjectLostError: the worker finished, then its node (holding the result) went.
                    log.warning("rollout-worker-%d: its rollout was lost (%s); re-issuing its %d prompts", wid,
                                type(e).__name__, len(items))
                    lost.extend(items)
                    # Ids are never reused: one no longer active was already dropped (e.g. by a broadcast).
                    if any(s.id == wid for s in self.active):
                        dead.add(wid)
                    continue
                except RayTaskError as e:  # a bug, not bad data (that comes back as PromptSamples.error)
                    raise ActorCallError(f"rollout-worker-{wid}", "rollout", e) from e
                for s, mref in zip(samples, media_refs, strict=True):
                    if s.uid in got:
                        raise RuntimeError(f"rollout returned prompt uid {s.uid} twice")
                    s.media_ref = mref if s.error is None else None
                    got[s.uid] = s
            if lost:  # re-issued after the dead workers are dropped (retry_replacing calls that first)
                todo["lost"] = lost
            return Attempt(not lost, sorted(dead))

        def drop_and_reissue(dead: list[int]) -> None:
            if dead:
                self.drop(dead)
            lost = todo.pop("lost", [])
            self.reissued += len(lost)
            todo["pending"] = self.submit(lost, params, use_video, use_audio)  # waits below min_workers

        retry_replacing(attempt, drop_and_reissue, self.cfg.rollout.max_restarts, "rollout")
        return [got[u] for u in sorted(got)]

    def shutdown(self) -> None:
        for s in self.active + self.pending:
            _kill(s)
        self.active, self.pending = [], []


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
