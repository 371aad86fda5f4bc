"""Weight sync from the learners to the rollout workers: the broadcast process groups (ACTORS: learner rank 0
and the rollout actors; with vLLM also ENGINES: learner rank 0 and every vLLM worker process; ranks follow
rank_offsets), the route plan (which buckets go to which group), and the weight version the workers hold."""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.exceptions import RayActorError

from actors.calls import ActorCallError, Attempt, raise_first_error, retry_replacing, settle
from actors.learner_group import LearnerGroup
from actors.rollout_group import RolloutGroup
from r1omni_ray.config import RunConfig
from r1omni_ray.engines.base import sync_destinations
from r1omni_ray.weight_broadcast import ACTORS, ENGINES, plan_routes, route_bytes


def rank_offsets(ranks_per_worker: list[int]) -> tuple[list[int], int]:
    """(first rank of each rollout worker, world size) in one group: learner rank 0 is rank 0, then each
    worker's ranks in that group (its actor, or its vLLM worker processes) in worker order."""
    first, nxt = [], 1
    for n in ranks_per_worker:
        first.append(nxt)
        nxt += n
    return first, nxt


def choose_backend(setting: str, learner_gpus: tuple[str, list[str]],
                   worker_gpus: list[tuple[str, list[str]]]) -> str:
    """The broadcast groups' backend (learner.broadcast_backend). Each end is (node id, the GPU ids Ray gave
    it). auto: nccl when learner-0 and every worker have GPUs and none of them shares learner-0's (NCCL refuses
    two ranks on one device: fractional GPUs, one-GPU boxes), else gloo."""
    if setting != "auto":
        return setting
    node, gpus = learner_gpus
    if not gpus or any(not ids for _, ids in worker_gpus):
        return "gloo"
    if any(n == node and set(ids) & set(gpus) for n, ids in worker_gpus):
        return "gloo"
    return "nccl"


class WeightSync:
    def __init__(self, cfg: RunConfig, learners: LearnerGroup, rollout: RolloutGroup) -> None:
        self.cfg, self.learners, self.rollout = cfg, learners, rollout
        self.metas = ray.get(learners.actors[0].sync_metas.remote())
        self.bucket_bytes = int(cfg.learner.broadcast_bucket_mb * 2**20)
        engine = cfg.rollout.engine
        self.routes = plan_routes(self.metas, self.bucket_bytes, lambda name: sync_destinations(name, engine))
        # Per update: learner-0 sends "sent" bytes; each rollout actor receives route_bytes[ACTORS], each
        # vLLM worker route_bytes[ENGINES].
        self.bytes = route_bytes(self.metas, self.routes)
        self.version = 0
        rollout.on_join = self.resync
        self.init_group()

    def _dead_ids(self, results: list[Any], offset: int = 0) -> list[int]:
        """Ids of the active workers whose results (in member order, after ``offset`` others) say they died."""
        ids = [s.id for s in self.rollout.active]
        return [ids[i] for i, r in enumerate(results[offset:]) if isinstance(r, RayActorError)]

    def init_group(self) -> None:
        """(Re)build the broadcast groups for the current members (ranks follow their order). Workers are
        pinged first (a dead one would stall the rendezvous until the timeout): dead ones are dropped before
        anyone joins. With no worker left there is no group: ``broadcast`` then only advances the version."""
        lc = self.cfg.learner
        learner0 = self.learners.actors[0]
        info0 = ray.get(learner0.info.remote())
        host = info0["node_ip"]
        workers = self.rollout

        def attempt() -> Attempt:
            if not workers.active:
                return Attempt(True, [])
            pings = [(n, "sync_ranks", w.sync_ranks.remote()) for n, w in zip(workers.names(), workers.workers, strict=True)]
            results = settle(pings)
            if dead := self._dead_ids(results):
                return Attempt(False, dead)
            raise_first_error(pings, results)
            # Where Ray placed each end decides the backend (the rollout actor and its vLLM worker share a GPU
            # but never a group).
            asks = [(n, "info", w.info.remote()) for n, w in zip(workers.names(), workers.workers, strict=True)]
            infos = settle(asks)
            if dead := self._dead_ids(infos):
                return Attempt(False, dead)
            raise_first_error(asks, infos)
            backend = choose_backend(lc.broadcast_backend, (info0["node_id"], info0.get("gpu_ids", [])),
                                     [(i["node_id"], i.get("gpu_ids", [])) for i in infos])
            dests = sorted({d for r in results for d in r})
            # Ports are chosen on learner-0's node, which binds them (within ray.port_range if set).
            ports = ray.get(learner0.free_ports.remote(len(dests), self.cfg.ray.port_range))
            groups, joins = {}, [{} for _ in results]
            for dest, port in zip(dests, ports, strict=True):
                first, world = rank_offsets([r.get(dest, 0) for r in results])
                groups[dest] = (backend, host, port, world)
                for i, r in enumerate(results):
                    if r.get(dest, 0):
                        joins[i][dest] = (backend, host, port, first[i], world)
            timeout = lc.broadcast_timeout()
            calls = [("learner-0", "init_sync_group", learner0.init_sync_group.remote(groups, timeout))]
            calls += [(n, "init_sync_group", w.init_sync_group.remote(joins[i], timeout))
                      for i, (n, w) in enumerate(zip(workers.names(), workers.workers, strict=True))]
            results = settle(calls)
            if dead := self._dead_ids(results, 1):
                return Attempt(False, dead)
            raise_first_error(calls, results)
            return Attempt(True, [])

        retry_replacing(attempt, workers.drop, self.cfg.rollout.max_restarts, "init_sync_group")
        workers.changed = False

    def broadcast(self, version: int) -> dict[str, float]:
        """Send the learners' weights to every worker, re-forming the group first if the membership moved.
        A worker that dies meanwhile is dropped and the broadcast redone for the smaller group; any other
        failure (a hung collective) is raised, naming the actor."""
        t0 = time.perf_counter()
        learners, workers = self.learners, self.rollout
        if workers.changed:
            self.init_group()

        def attempt() -> Attempt:
            if not workers.active:  # all gone: the replacements get these weights when they join
                return Attempt(True, [], {})
            # A worker that died while idle would leave the collective waiting for learner.broadcast_timeout_s:
            # ask every member first (a dead actor answers at once) and drop the dead before starting.
            if dead := self._dead_ids(settle([(n, "info", w.info.remote())
                                          for n, w in zip(workers.names(), workers.workers, strict=True)])):
                return Attempt(False, dead)
            # Every worker ends the generate call under way first (rollouts queued behind it wait), so no rank
            # of the collective waits inside it for another's generation.
            pauses = [(n, "pause_for_weights", w.pause_for_weights.remote())
                      for n, w in zip(workers.names(), workers.workers, strict=True)]
            results = settle(pauses)
            if dead := self._dead_ids(results):
                return Attempt(False, dead)
            raise_first_error(pauses, results)
            calls = [(f"learner-{r}", "broadcast_weights", lr.broadcast_weights.remote(version, self.routes))
                     for r, lr in enumerate(learners.actors)]
            calls += [(n, "receive_weights", w.receive_weights.remote(version, self.metas, self.routes))
                      for n, w in zip(workers.names(), workers.workers, strict=True)]
            results = settle(calls)
            if dead := self._dead_ids(results, len(learners.actors)):
                return Attempt(False, dead)
            raise_first_error(calls, results)
            got = results[len(learners.actors):]
            if any(v != version for v in got):
                raise ActorCallError("rollout-workers", "receive_weights",
                                     RuntimeError(f"weight version mismatch after broadcast: {got} != {version}"))
            return Attempt(True, [], dict(results[0]))

        def replace(dead: list[int]) -> None:
            # Peers of the dead worker failed or timed out in the collective: rebuild the group and redo.
            workers.drop(dead)
            self.init_group()

        out = retry_replacing(attempt, replace, self.cfg.rollout.max_restarts, "broadcast")
        self.version = version
        out["broadcast_wall_s"] = time.perf_counter() - t0
        return out

    def byte_metrics(self) -> dict[str, float]:
        """What one update moves: learner-0's sends, and what each rollout actor and each vLLM worker receives."""
        names = {"sent": "broadcast/sent_bytes", ACTORS: "broadcast/actor_bytes", ENGINES: "broadcast/engine_bytes"}
        return {names[k]: float(v) for k, v in self.bytes.items()}

    def resync(self) -> None:
        """Workers that joined mid-call hold their checkpoint's weights: rebuild the group and resend the
        current weights (also at version 0: the learners may hold weights restored from a checkpoint)."""
        self.init_group()
        self.broadcast(self.version)

    def attach(self, learners: LearnerGroup) -> None:
        """A rebuilt learner group (after a learner was lost): the groups are re-formed around its rank 0."""
        self.learners = learners
        self.init_group()
