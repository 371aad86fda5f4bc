"""Every registered policy loss x advantage estimator (a user's own module's included, tests/custom_recipes.py)
trains the tiny task through the real actors: rollout worker, reward scoring, DeepSpeed learner, broadcast.
The loss is the learners' (one actor set per loss); the advantages are the driver's (its config per run)."""

import dataclasses
import math
from pathlib import Path

import pytest

from actors.groups import RLVRGroups
from launch.train_rlvr import RLVRTrainer
from r1omni_ray.advantages import ADVANTAGES
from r1omni_ray.data.records import load_records
from r1omni_ray.policy_losses import POLICY_LOSSES
from r1omni_ray.tracking import RunLogger
from tests.system.test_rlvr_system import LABELS, small_cfg

pytestmark = pytest.mark.slow
MODULES = ["tests.custom_recipes"]


def test_each_policy_loss_with_each_advantage_trains(local_ray, tiny_ckpt, synth_data, tmp_path):
    import tests.custom_recipes  # noqa: F401 - the registries below include the user's recipes

    recs = load_records(synth_data / "train.json").records
    losses, advantages = sorted(POLICY_LOSSES), sorted(ADVANTAGES)
    assert {"ppo_clip", "gspo", "gspo_token", "test_vanilla_pg"} <= set(losses)
    assert {"grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "test_centered"} <= set(advantages)
    for loss in losses:
        cfg = small_cfg(tmp_path / loss, zero=2, rollout={"num_workers": 1}, learner={"num_learners": 1, "lr": 1e-2},
                        # a reward that varies within a group on a random model: every advantage is non-zero somewhere
                        reward={"num_actors": 0, "modules": ["tests.fault_rewards"],
                                "rewards": [{"name": "test_parity", "weight": 1.0}]},
                        train={"steps": 1, "prompts_per_step": 2},
                        grpo={"policy_loss": loss, "modules": MODULES})
        groups = RLVRGroups.build(cfg, str(tiny_ckpt), LABELS)
        try:
            sums = groups.learners.checksums()
            for adv in advantages:
                run_cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, advantage=adv))
                out = Path(cfg.train.output_dir) / adv
                tr = RLVRTrainer(run_cfg, groups, recs, None, LABELS, RunLogger(out, cfg.wandb, {}))
                (h,) = tr.fit()
                assert h["samples"] == 2 * cfg.rollout.group_size, (loss, adv)
                assert all(math.isfinite(h[k]) for k in ("learner/loss", "learner/policy_loss", "adv/mean", "adv/std")), (
                    loss, adv, h)
                assert h["learner/skipped_update"] == 0.0 and h["adv/std"] > 0, (loss, adv)
            assert groups.learners.checksums() != sums, f"{loss}: no update moved the weights"
        finally:
            groups.shutdown()
