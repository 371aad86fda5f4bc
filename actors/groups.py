"""The role groups of an RLVR run, composed: learners, rollout workers, reward actors and the weight sync
between the first two. Evaluation and SFT build only the groups they need."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from actors.learner_group import LearnerGroup
from actors.reward_group import RewardGroup
from actors.rollout_group import RolloutGroup
from actors.weight_broadcast import WeightSync
from r1omni_ray.config import RunConfig
from r1omni_ray.rewards import RewardSpec, check_reward_specs


@dataclass
class RLVRGroups:
    cfg: RunConfig
    learners: LearnerGroup
    rollout: RolloutGroup
    rewards: RewardGroup
    sync: WeightSync

    @classmethod
    def build(cls, cfg: RunConfig, ckpt_dir: str, work_dir: str, label_set: Sequence[str] | None) -> RLVRGroups:
        # Before any actor exists: an unknown reward name is a config error, not a mid-run actor crash.
        check_reward_specs([RewardSpec(r.name, r.weight) for r in cfg.reward.rewards], cfg.reward.modules)
        learners = LearnerGroup(cfg, ckpt_dir)
        rollout = RolloutGroup(cfg, ckpt_dir, work_dir)
        rewards = RewardGroup(cfg, label_set)
        return cls(cfg, learners, rollout, rewards, WeightSync(cfg, learners, rollout))

    def shutdown(self) -> None:
        self.rewards.shutdown()
        self.rollout.shutdown()
        self.learners.shutdown()
