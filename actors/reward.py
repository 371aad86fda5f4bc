"""Reward actor: scores completions with the reward registry (pure code in r1omni_ray.rewards)."""

from __future__ import annotations

from collections.abc import Sequence

import ray

from r1omni_ray.rewards import RewardBatch, RewardSpec, check_reward_specs, score_completions


@ray.remote
class RewardActor:
    def __init__(self, specs: list[tuple[str, float]], label_set: Sequence[str] | None = None,
                 modules: Sequence[str] = ()) -> None:
        self.specs = [RewardSpec(n, w) for n, w in specs]
        self.label_set = list(label_set) if label_set else None
        check_reward_specs(self.specs, modules)  # custom rewards register themselves in this process too

    def score(self, completions: list[str], solutions: list[str]) -> RewardBatch:
        return score_completions(completions, solutions, self.specs, label_set=self.label_set)
