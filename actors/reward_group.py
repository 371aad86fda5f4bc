"""The reward actors as one group: scoring spread over them; a dead actor replaced and its call re-run, a
raising or hung reward function's samples scored 0 and counted (a hung actor replaced)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.placement import bundles, create_placement_group, in_bundle, release
from actors.reward import RewardActor
from r1omni_ray.config import RunConfig
from r1omni_ray.data.sampler import split_even
from r1omni_ray.rewards import RewardBatch, RewardSpec, SampleContext, check_reward_specs, score_completions

log = logging.getLogger("r1omni_ray")


class RewardGroup:
    def __init__(self, cfg: RunConfig, label_set: Sequence[str] | None) -> None:
        self.cfg = cfg
        self.label_set = list(label_set) if label_set else None
        self.specs = [RewardSpec(r.name, r.weight, dict(r.args)) for r in cfg.reward.rewards]
        # Before any actor exists: an unknown reward name is a config error, not a mid-run actor crash.
        check_reward_specs(self.specs, cfg.reward.modules)
        self.restarts = 0
        n = max(0, cfg.reward.num_actors)
        # In a placement group like every other role: an actor that cannot be scheduled fails the run at
        # start instead of leaving every step to wait out reward.timeout_s and score 0.
        self.pg = create_placement_group(bundles(n, cfg.reward.num_cpus_per_actor, 0.0), cfg,
                                         "reward group (reward.num_actors x num_cpus_per_actor)") if n else None
        self.actors = [self._make(i) for i in range(n)]

    def _make(self, i: int) -> Any:
        return RewardActor.options(num_cpus=self.cfg.reward.num_cpus_per_actor,
                                   scheduling_strategy=in_bundle(self.pg, i)).remote(
            self.specs, self.label_set, list(self.cfg.reward.modules))

    def score(self, texts: list[str], solutions: Sequence[str | SampleContext]) -> RewardBatch:
        """Rewards of every completion, in order; solutions: each sample's SampleContext (or bare solution).
        With no reward actors the driver scores them itself."""
        if not self.actors:
            return score_completions(texts, solutions, self.specs, label_set=self.label_set)
        parts = [p for p in split_even(len(texts), len(self.actors))]
        calls = [(i, [texts[j] for j in part], [solutions[j] for j in part]) for i, part in enumerate(parts) if len(part)]
        refs = [self.actors[i].score.remote(t, s) for i, t, s in calls]
        deadline = time.monotonic() + self.cfg.reward.timeout_s
        # Parts are contiguous and in order: concatenation keeps sample order.
        batches = [self._result(i, t, s, ref, deadline) for (i, t, s), ref in zip(calls, refs, strict=True)]
        out = batches[0]
        for b in batches[1:]:
            out = out.merge(b)
        return out

    def _result(self, i: int, texts: list[str], solutions: list[str], ref: Any, deadline: float) -> RewardBatch:
        """One actor's part. Reward functions are pure, so an actor that died (killed, OOM, node lost) is
        replaced and the same call re-run on its replacement, each try with a fresh reward.timeout_s: a crash
        costs time, not the step's signal. Only a reward function that raises or times out scores 0."""
        for attempt in range(self.cfg.reward.max_restarts + 1):
            try:
                return ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except RayActorError as e:
                self._replace(i)
                if attempt == self.cfg.reward.max_restarts:
                    return self._failed(i, len(texts), e)
                log.warning("reward actor %d died (%s); re-running its %d samples on a replacement", i,
                            type(e).__name__, len(texts))
                ref = self.actors[i].score.remote(texts, solutions)
                deadline = time.monotonic() + self.cfg.reward.timeout_s
            except GetTimeoutError as e:  # a hung reward function: its actor cannot be trusted to return
                ray.kill(self.actors[i], no_restart=True)
                self._replace(i)
                return self._failed(i, len(texts), e)
            except RayTaskError as e:  # the reward code itself raised
                return self._failed(i, len(texts), e)
        raise AssertionError("unreachable")

    def _replace(self, i: int) -> None:
        self.actors[i] = self._make(i)
        self.restarts += 1

    def _failed(self, i: int, n: int, e: BaseException) -> RewardBatch:
        """The step goes on: these samples score 0 and the failure is counted."""
        log.warning("reward actor %d failed (%s); %d samples score 0", i, type(e).__name__, n)
        what = f"{type(e).__name__}: {str(getattr(e, 'cause', None) or e)[:200]}"
        return RewardBatch(total=[0.0] * n, per_reward={s.name: [0.0] * n for s in self.specs},
                           errors={"reward_actor_failed": n}, diagnostics={},
                           error_examples={"reward_actor_failed": what})

    def shutdown(self) -> None:
        release(self.actors, self.pg)
