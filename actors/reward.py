"""Reward actor: scores completions with the reward registry (pure code in r1omni_ray.rewards)."""

from __future__ import annotations

from collections.abc import Sequence

import ray

from r1omni_ray.rewards import RewardBatch, RewardSpec, SampleContext, check_reward_specs, score_completions


@ray.remote
class RewardActor:
    def __init__(self, specs: Sequence[RewardSpec | tuple[str, float]], label_set: Sequence[str] | None = None,
                 modules: Sequence[str] = ()) -> None:
        self.specs = [s if isinstance(s, RewardSpec) else RewardSpec(*s) for s in specs]
        self.label_set = list(label_set) if label_set else None
        check_reward_specs(self.specs, modules)  # custom rewards register themselves in this process too

    def score(self, completions: list[str], contexts: list[SampleContext]) -> RewardBatch:
        return score_completions(completions, contexts, self.specs, label_set=self.label_set)
