"""Actor pools and their wiring: placement groups, the learners' DP group, the weight-broadcast group,
balanced rollout dispatch with worker replacement, and reward scoring with failure accounting."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.common import free_port
from actors.learner import LearnerActor, TrainBatch
from actors.reward import RewardActor
from actors.rollout import RolloutGroup, RolloutWorker
from r1omni_ray.config import RunConfig
from r1omni_ray.data.sampler import shared_micro_batches, split_even
from r1omni_ray.engines.base import SamplingParams
from r1omni_ray.rewards import RewardBatch, RewardSpec, check_reward_specs, score_completions

log = logging.getLogger("r1omni_ray")


def _bundles(n: int, cpus: float, gpus: float, node_resource: str | None = None) -> list[dict[str, float]]:
    b: dict[str, float] = {"CPU": cpus}
    if gpus > 0:
        b["GPU"] = gpus
    if node_resource:
        b[node_resource] = 0.001
    return [dict(b) for _ in range(n)]


class ActorCallError(RuntimeError):
    """A call on a pool actor failed (the actor died, raised, or timed out in a collective); names it."""

    def __init__(self, actor: str, method: str, cause: BaseException) -> None:
        self.actor, self.method = actor, method
        inner = getattr(cause, "cause", None) or cause  # RayTaskError wraps the actor-side exception
        self.cause = inner
        super().__init__(f"{actor}.{method} failed: {type(inner).__name__}: {inner}")


class PendingRollout(NamedTuple):
    """One in-flight rollout call (unpacks as (worker_index, items, ref))."""

    worker_index: int
    items: list[tuple[int, Any]]
    ref: Any


def _settle(calls: Sequence[tuple[str, str, Any]]) -> list[Any]:
    """Wait for every call; results in order, with exceptions as values."""
    out: list[Any] = []
    for _name, _method, ref in calls:
        try:
            out.append(ray.get(ref))
        except Exception as e:  # noqa: BLE001 - classified by the caller
            out.append(e)
    return out


def _raise_first_error(calls: Sequence[tuple[str, str, Any]], results: Sequence[Any]) -> None:
    for (name, method, _ref), r in zip(calls, results, strict=True):
        if isinstance(r, Exception):
            raise ActorCallError(name, method, r) from r


def wait_named(calls: Sequence[tuple[str, str, Any]]) -> list[Any]:
    """Results of (actor name, method, ref) calls; the first failure to arrive is raised at once as an
    ActorCallError naming its actor (its peers may be stuck in a collective until their timeout)."""
    by_ref = {ref: (name, method) for name, method, ref in calls}
    remaining = list(by_ref)
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=1)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as e:
                name, method = by_ref[ref]
                raise ActorCallError(name, method, e) from e
    return ray.get([ref for _n, _m, ref in calls])


@dataclass
class PoolStats:
    worker_restarts: int = 0
    reissued_prompts: int = 0
    reward_errors: int = 0
    reward_actor_restarts: int = 0


class ActorPools:
    def __init__(self, cfg: RunConfig, ckpt_dir: str, work_dir: str, label_set: Sequence[str] | None) -> None:
        self.cfg, self.ckpt_dir, self.work_dir = cfg, ckpt_dir, work_dir
        self.label_set = list(label_set) if label_set else None
        self.stats = PoolStats()
        self._sent_to: dict[str, Any] = {}  # rollout ref (hex) -> worker handle it went to
        # Before any actor exists: an unknown reward name is a config error, not a mid-run actor crash.
        check_reward_specs([RewardSpec(r.name, r.weight) for r in cfg.reward.rewards], cfg.reward.modules)
        lc, rc = cfg.learner, cfg.rollout
        strategy = cfg.ray.placement_strategy
        self.learner_pg = placement_group(
            _bundles(lc.num_learners, lc.num_cpus_per_learner, lc.num_gpus_per_learner, lc.node_resource),
            strategy=strategy
        )
        gpus_per_worker = rc.num_gpus_per_worker or (float(rc.tensor_parallel_size) if rc.engine == "vllm" else 0.0)
        self.rollout_pg = placement_group(
            _bundles(rc.num_workers, rc.num_cpus_per_worker, gpus_per_worker, rc.node_resource), strategy=strategy
        )
        _wait_placement([self.learner_pg, self.rollout_pg], cfg)
        self._worker_gpus = gpus_per_worker
        self.learners = self._make_learners()
        self.workers = [self._make_worker(i) for i in range(rc.num_workers)]
        self.reward_actors = [self._make_reward_actor() for _ in range(max(0, cfg.reward.num_actors))]
        self.metas = ray.get(self.learners[0].sync_metas.remote())
        from r1omni_ray.weight_sync import plan_buckets

        self.bucket_bytes = int(lc.broadcast_bucket_mb * 2**20)
        self.buckets = plan_buckets(self.metas, self.bucket_bytes)
        self.version = 0
        self.init_sync_group()

    # ---- construction ----
    def _make_learners(self) -> list[Any]:
        return create_learners(self.cfg, self.ckpt_dir, self.learner_pg)

    def _make_worker(self, i: int) -> Any:
        rc = self.cfg.rollout
        return RolloutWorker.options(
            num_cpus=rc.num_cpus_per_worker, num_gpus=self._worker_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.rollout_pg, placement_group_bundle_index=i),
        ).remote(i, self.ckpt_dir, self.cfg.to_dict(), self.work_dir)

    def _make_reward_actor(self) -> Any:
        specs = [(r.name, r.weight) for r in self.cfg.reward.rewards]
        return RewardActor.options(num_cpus=self.cfg.reward.num_cpus_per_actor).remote(
            specs, self.label_set, list(self.cfg.reward.modules))

    # ---- weight broadcast ----
    def init_sync_group(self) -> None:
        """(Re)build the broadcast group: learner rank 0 is rank 0, worker i is rank i + 1. Workers are
        pinged first (a new one is still loading its model; a dead one would stall the rendezvous until
        the timeout): dead ones are replaced before anyone joins."""
        backend = "nccl" if self.cfg.learner.num_gpus_per_learner > 0 and self._worker_gpus > 0 else "gloo"
        host = ray.get(self.learners[0].info.remote())["node_ip"]
        t = self.cfg.learner.dist_timeout_s
        last: BaseException | None = None
        for attempt in range(self.cfg.rollout.max_restarts + 1):
            pings = [(f"rollout-worker-{i}", "info", w.info.remote()) for i, w in enumerate(self.workers)]
            results = _settle(pings)
            dead = [i for i, r in enumerate(results) if isinstance(r, RayActorError)]
            if not dead:
                _raise_first_error(pings, results)
                port = free_port()
                world = len(self.workers) + 1
                calls = [("learner-0", "init_sync_group",
                          self.learners[0].init_sync_group.remote(backend, host, port, world, t))]
                calls += [(f"rollout-worker-{i}", "init_sync_group",
                           w.init_sync_group.remote(backend, host, port, i + 1, world, t))
                          for i, w in enumerate(self.workers)]
                results = _settle(calls)
                dead = [i for i, r in enumerate(results[1:]) if isinstance(r, RayActorError)]
                if not dead:
                    _raise_first_error(calls, results)
                    return
            last = next(r for r in results if isinstance(r, RayActorError))
            if attempt == self.cfg.rollout.max_restarts:
                break
            log.warning("rollout workers %s are dead; replacing them before building the broadcast group", dead)
            self._replace(dead)
        raise ActorCallError("rollout-workers", "init_sync_group", RuntimeError(
            f"workers kept dying after rollout.max_restarts={self.cfg.rollout.max_restarts} replacements; "
            f"last: {last}"))

    def broadcast(self, version: int) -> dict[str, float]:
        """Send the learners' weights to every worker. A worker that dies meanwhile is replaced and the
        broadcast redone for the new group; any other failure (a hung collective) is raised, naming the actor."""
        t0 = time.perf_counter()
        for attempt in range(self.cfg.rollout.max_restarts + 1):
            calls = [(f"learner-{r}", "broadcast_weights", lr.broadcast_weights.remote(version, self.bucket_bytes))
                     for r, lr in enumerate(self.learners)]
            calls += [(f"rollout-worker-{i}", "receive_weights", w.receive_weights.remote(version, self.metas, self.buckets))
                      for i, w in enumerate(self.workers)]
            results = _settle(calls)
            wres = results[len(self.learners):]
            dead = [i for i, r in enumerate(wres) if isinstance(r, RayActorError)]
            if not dead:
                _raise_first_error(calls, results)
                if any(v != version for v in wres):
                    raise RuntimeError(f"weight version mismatch after broadcast: {wres} != {version}")
                self.version = version
                out = dict(results[0])
                out["broadcast_wall_s"] = time.perf_counter() - t0
                return out
            if attempt == self.cfg.rollout.max_restarts:
                break
            # Peers of the dead worker failed or timed out in the collective: rebuild the group and redo.
            log.warning("rollout workers %s died during the weight broadcast; replacing them", dead)
            self._replace(dead)
            self.init_sync_group()
        raise ActorCallError("pool", "broadcast", RuntimeError(
            f"rollout workers kept dying after rollout.max_restarts={self.cfg.rollout.max_restarts} replacements"))

    # ---- rollout with fault handling ----
    def submit_rollout(self, items: list[tuple[int, Any]], params: SamplingParams, use_video: bool = True,
                       use_audio: bool = True) -> list[PendingRollout]:
        parts = split_even(len(items), len(self.workers))
        out = []
        for wi, part in enumerate(parts):
            if len(part):
                sub = [items[j] for j in part]
                w = self.workers[wi]
                ref = w.rollout.remote(sub, params, use_video, use_audio)
                self._sent_to[ref.hex()] = w  # hex, not the ref: the dict must not pin results
                out.append(PendingRollout(wi, sub, ref))
        return out

    def collect_rollout(self, pending: list[PendingRollout], params: SamplingParams,
                        use_video: bool = True, use_audio: bool = True) -> list[RolloutGroup]:
        """Gather results. A dead worker's whole share is lost: the worker is replaced, gets the current
        weights, and exactly those prompts are re-issued, so every uid ends up in one group."""
        groups: dict[int, RolloutGroup] = {}
        for attempt in range(self.cfg.rollout.max_restarts + 1):
            lost: list[tuple[int, Any]] = []
            dead: set[int] = set()
            for wi, items, ref in pending:
                sent_to = self._sent_to.pop(ref.hex(), None)
                try:
                    got = ray.get(ref)
                except RayActorError as e:
                    log.warning("rollout worker %d died (%s); re-issuing its %d prompts", wi, type(e).__name__,
                                len(items))
                    lost.extend(items)
                    # It may already have been replaced (e.g. it died during a weight broadcast).
                    if sent_to is None or self.workers[wi] is sent_to:
                        dead.add(wi)
                    continue
                except RayTaskError as e:  # a bug, not bad data (that comes back as RolloutGroup.error)
                    raise ActorCallError(f"rollout-worker-{wi}", "rollout", e) from e
                for g in got:
                    if g.uid in groups:
                        raise RuntimeError(f"rollout returned prompt uid {g.uid} twice")
                    groups[g.uid] = g
            if not lost:
                return [groups[u] for u in sorted(groups)]
            if attempt == self.cfg.rollout.max_restarts:
                break
            if dead:
                self.replace_workers(sorted(dead))
            self.stats.reissued_prompts += len(lost)
            pending = self.submit_rollout(lost, params, use_video, use_audio)
        raise RuntimeError(f"rollout failed after rollout.max_restarts={self.cfg.rollout.max_restarts} worker replacements")

    def _replace(self, indices: Sequence[int]) -> None:
        """New actors in the dead workers' slots (same placement-group bundles); no weight sync."""
        for wi in indices:
            try:
                ray.kill(self.workers[wi], no_restart=True)
            except Exception:
                pass
            self.workers[wi] = self._make_worker(wi)
            self.stats.worker_restarts += 1

    def replace_workers(self, indices: Sequence[int]) -> None:
        """Replace workers and bring them to the learners' current weights."""
        self._replace(indices)
        if not self.learners:  # an eval-only pool: workers load their checkpoint themselves
            return
        # A gloo group has a fixed membership: rebuild it, then resend the current weights (also at
        # version 0: the learners may hold weights restored from a checkpoint, not the initial ones).
        self.init_sync_group()
        self.broadcast(self.version)

    # ---- rewards ----
    def score(self, texts: list[str], solutions: list[str]) -> RewardBatch:
        specs = [RewardSpec(r.name, r.weight) for r in self.cfg.reward.rewards]
        if not self.reward_actors:
            return score_completions(texts, solutions, specs, label_set=self.label_set)
        parts = split_even(len(texts), len(self.reward_actors))
        refs = [
            (i, part, self.reward_actors[i].score.remote([texts[j] for j in part], [solutions[j] for j in part]))
            for i, part in enumerate(parts) if len(part)
        ]
        results: list[tuple[range, RewardBatch]] = []
        deadline = time.monotonic() + self.cfg.reward.timeout_s
        for i, part, ref in refs:
            try:
                results.append((part, ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))))
            except (RayActorError, RayTaskError, GetTimeoutError) as e:
                # The step goes on: these samples score 0 and the failure is counted.
                log.warning("reward actor %d failed (%s); %d samples score 0", i, type(e).__name__, len(part))
                self.stats.reward_errors += len(part)
                if isinstance(e, GetTimeoutError):  # a hung reward function: the actor is replaced
                    ray.kill(self.reward_actors[i], no_restart=True)
                if isinstance(e, RayActorError | GetTimeoutError):
                    self.reward_actors[i] = self._make_reward_actor()
                    self.stats.reward_actor_restarts += 1
                zero = {s.name: [0.0] * len(part) for s in specs}
                what = f"{type(e).__name__}: {str(getattr(e, 'cause', None) or e)[:200]}"
                results.append((part, RewardBatch(total=[0.0] * len(part), per_reward=zero,
                                                  errors={"reward_actor_failed": len(part)}, diagnostics={},
                                                  error_examples={"reward_actor_failed": what})))
        return _merge_reward_batches(results, len(texts), specs)

    # ---- learners ----
    def learner_call(self, method: str, shards: list[Any], *args: Any) -> list[Any]:
        """Call `method` on every learner rank with its shard. The first failure to arrive is raised at
        once, naming the rank (the other ranks may sit in a collective until their timeout)."""
        calls = [(f"learner-{r}", method, getattr(lr, method).remote(s, *args))
                 for r, (lr, s) in enumerate(zip(self.learners, shards, strict=True))]
        return wait_named(calls)

    def shutdown(self) -> None:
        for a in self.learners + self.workers + self.reward_actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        for pg in (self.learner_pg, self.rollout_pg):
            try:
                remove_placement_group(pg)
            except Exception:
                pass


def learner_placement_group(cfg: RunConfig) -> Any:
    lc = cfg.learner
    pg = placement_group(_bundles(lc.num_learners, lc.num_cpus_per_learner, lc.num_gpus_per_learner, lc.node_resource),
                         strategy=cfg.ray.placement_strategy)
    _wait_placement([pg], cfg)
    return pg


def required_cpus(cfg: RunConfig) -> float:
    return (cfg.learner.num_learners * cfg.learner.num_cpus_per_learner
            + cfg.rollout.num_workers * cfg.rollout.num_cpus_per_worker
            + cfg.reward.num_actors * cfg.reward.num_cpus_per_actor)


def _wait_placement(pgs: list[Any], cfg: RunConfig) -> None:
    try:
        ray.get([pg.ready() for pg in pgs], timeout=cfg.ray.placement_timeout_s)
    except GetTimeoutError:
        raise RuntimeError(
            f"placement groups not schedulable within {cfg.ray.placement_timeout_s:.0f}s: the run needs "
            f"{required_cpus(cfg):g} CPUs (learner.num_learners x num_cpus_per_learner + rollout.num_workers x "
            f"num_cpus_per_worker + reward actors) and GPUs as configured; cluster has {ray.cluster_resources()}"
        ) from None


def create_learners(cfg: RunConfig, ckpt_dir: str, pg: Any) -> list[Any]:
    """N DeepSpeed learner ranks, one per placement-group bundle, rendezvous at rank 0's node."""
    lc = cfg.learner
    master_addr = ray.get(_node_ip_in_bundle.options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0), num_cpus=0,
    ).remote())
    master_port = free_port()
    learners = [
        LearnerActor.options(
            num_cpus=lc.num_cpus_per_learner, num_gpus=lc.num_gpus_per_learner,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
        ).remote(r, lc.num_learners, master_addr, master_port, cfg.to_dict(), ckpt_dir, 1)
        for r in range(lc.num_learners)
    ]
    ray.get([lr.info.remote() for lr in learners])
    return learners


@ray.remote(num_cpus=0)
def _node_ip_in_bundle() -> str:
    return ray.util.get_node_ip_address()


def _merge_reward_batches(results: list[tuple[range, RewardBatch]], n: int, specs: list[RewardSpec]) -> RewardBatch:
    total = [0.0] * n
    per = {s.name: [0.0] * n for s in specs}
    errors: dict[str, int] = {}
    diag: dict[str, int] = {}
    examples: dict[str, str] = {}
    for part, rb in results:
        examples = rb.error_examples | examples
        for k, j in enumerate(part):
            total[j] = rb.total[k]
            for name in per:
                per[name][j] = rb.per_reward.get(name, [0.0] * len(part))[k]
        for k, v in rb.errors.items():
            errors[k] = errors.get(k, 0) + v
        for k, v in rb.diagnostics.items():
            diag[k] = diag.get(k, 0) + v
    return RewardBatch(total=total, per_reward=per, errors=errors, diagnostics=diag, error_examples=examples)


def shard_for_learners(groups: list[RolloutGroup], advantages: list[float], n_learners: int,
                       micro: int) -> tuple[list[TrainBatch], int]:
    """Split all samples evenly across learners (sample granularity, so every rank runs the same number
    of micro-batches — required for ZeRO-3's collective forward). Returns (batches, micro-batches)."""
    flat = [(gi, c) for gi, g in enumerate(groups) for c in g.completions]
    parts = split_even(len(flat), n_learners)
    if min(len(p) for p in parts) == 0:
        raise ValueError(f"{len(flat)} samples cannot feed {n_learners} learners")
    num_micro = shared_micro_batches(parts, micro)
    batches = []
    for part in parts:
        used: dict[int, int] = {}
        prompts, pidx, comps, adv = [], [], [], []
        for j in part:
            gi, c = flat[j]
            if gi not in used:
                used[gi] = len(prompts)
                prompts.append(groups[gi].inputs)
            pidx.append(used[gi])
            comps.append(c.token_ids)
            adv.append(advantages[j])
        batches.append(TrainBatch(prompts, pidx, comps, adv))
    return batches, num_micro


class RolloutPool(ActorPools):
    """Rollout workers only (evaluation): no learners, no reward actors, no broadcast group. The workers
    load the evaluated checkpoint themselves; submit_rollout / collect_rollout (and worker replacement,
    which reloads that checkpoint) are inherited from ActorPools."""

    def __init__(self, cfg: RunConfig, ckpt_dir: str, work_dir: str, label_set: Sequence[str] | None) -> None:
        self.cfg, self.ckpt_dir, self.work_dir = cfg, ckpt_dir, work_dir
        self.label_set = list(label_set) if label_set else None
        self.stats = PoolStats()
        self._sent_to: dict[str, Any] = {}  # rollout ref (hex) -> worker handle it went to
        rc = cfg.rollout
        gpus_per_worker = rc.num_gpus_per_worker or (float(rc.tensor_parallel_size) if rc.engine == "vllm" else 0.0)
        self.learner_pg = None
        self.rollout_pg = placement_group(
            _bundles(rc.num_workers, rc.num_cpus_per_worker, gpus_per_worker, rc.node_resource),
            strategy=cfg.ray.placement_strategy,
        )
        _wait_placement([self.rollout_pg], cfg)
        self._worker_gpus = gpus_per_worker
        self.learners: list[Any] = []
        self.reward_actors: list[Any] = []
        self.workers = [self._make_worker(i) for i in range(rc.num_workers)]
        self.metas, self.buckets, self.bucket_bytes = [], [], 0
        self.version = 0

    def init_sync_group(self) -> None:
        """Nothing to sync: every worker holds the checkpoint it was built from."""

    def broadcast(self, version: int) -> dict[str, float]:
        raise RuntimeError("a RolloutPool has no learners to broadcast from")
