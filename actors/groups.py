"""The role groups of an RLVR run, composed: learners, rollout workers, reward actors and the weight sync
between the first two. Evaluation and SFT build only the groups they need."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from actors.learner_group import LearnerGroup
from actors.reward_group import RewardGroup
from actors.rollout_group import RolloutGroup
from actors.weight_sync import WeightSync
from r1omni_ray.config import RunConfig


@dataclass
class RLVRGroups:
    cfg: RunConfig
    learners: LearnerGroup
    rollout: RolloutGroup
    rewards: RewardGroup
    sync: WeightSync

    @classmethod
    def build(cls, cfg: RunConfig, ckpt_dir: str, label_set: Sequence[str] | None) -> RLVRGroups:
        # Rewards first: RewardGroup checks the reward names before any actor exists (an unknown one is a
        # config error, not a mid-run crash), and its actors are the cheapest to start.
        rewards = RewardGroup(cfg, label_set)
        learners = LearnerGroup(cfg, ckpt_dir)
        rollout = RolloutGroup(cfg, ckpt_dir)
        return cls(cfg, learners, rollout, rewards, WeightSync(cfg, learners, rollout))

    def shutdown(self) -> None:
        self.rewards.shutdown()
        self.rollout.shutdown()
        self.learners.shutdown()
