"""Several optimizer steps per batch (grpo.num_iterations, grpo.mini_batches) on real DeepSpeed learners, ZeRO-3
over two ranks: the proximal log-probs are fixed by a pass before the first step, so the ratio moves and the clip
bites on-policy; every mini-batch ends on an optimizer step even as the micro-batch count changes between and
within updates (DeepSpeed's running micro-step count used to put the boundary mid-step then); the ranks stay in
step (the rollout workers receive exactly the learners' weights)."""

from pathlib import Path

import pytest

from actors.groups import RLVRGroups
from actors.learner_group import shard_for_learners
from launch.train_rlvr import RLVRTrainer
from r1omni_ray.data.records import load_records
from r1omni_ray.engines.base import SamplingParams
from r1omni_ray.learner.grpo_update import StepSpec, mini_batch_counts
from r1omni_ray.learner.old_logprobs import LogprobPlan, old_logprob_source
from r1omni_ray.step_metrics import learner_metrics
from r1omni_ray.tracking import RunLogger
from tests.system.test_rlvr_system import LABELS, assert_workers_match_learners, small_cfg

pytestmark = pytest.mark.slow


def test_two_passes_of_two_mini_batches_move_the_ratio_and_keep_zero3_ranks_in_step(local_ray, tiny_ckpt,
                                                                                    synth_data, tmp_path):
    cfg = small_cfg(tmp_path, zero=3, rollout={"num_workers": 1}, reward={"num_actors": 0},
                    learner={"lr": 5e-2, "micro_batch_size": 2}, grpo={"num_iterations": 2, "mini_batches": 2})
    groups = RLVRGroups.build(cfg, str(tiny_ckpt), LABELS)
    try:
        recs = load_records(synth_data / "train.json").records
        params = SamplingParams(n=4, max_new_tokens=12, seed=0)
        samples = groups.rollout.collect(groups.rollout.submit(list(enumerate(recs[:4])), params), params)
        adv = [1.0, 0.5, -0.5, -1.0] * len(samples)
        plan = old_logprob_source(cfg, [g.weight_version for g in samples], groups.sync.version, False)
        assert plan == LogprobPlan("recompute")
        # 8 completions per rank: micro-batch sizes 4 (2 micro-batches), 2 (4) and 3 (3: mini-batches of 2 and 1)
        for micro, want_micro in ((4, 2), (2, 4), (3, 3)):
            shards, num_micro = shard_for_learners(samples, adv, 2, micro)
            assert num_micro == want_micro
            lens = [len(c) for s in shards for c in s.completions]
            minis = mini_batch_counts(shards, num_micro, cfg.learner.micro_batch_size, 2)
            assert sum(t for t, _ in minis) == sum(lens) and sum(n for _, n in minis) == len(lens)
            m = learner_metrics(groups.learners.train(shards, StepSpec(num_micro, sum(lens), len(lens), 12, plan,
                                                                       minis)))
            assert m["learner/optimizer_steps"] == 4 and m["learner/recomputed_old_logprobs"] == 1
            assert m["learner/skipped_update"] == 0
            # the proximal log-probs stay those before the first step: later steps see ratios off 1, and clip
            assert m["learner/ratio_max"] > 1.01 and m["learner/clip_frac"] > 0, m
        groups.sync.broadcast(groups.sync.version + 1)
        assert_workers_match_learners(groups)
    finally:
        groups.shutdown()


def test_a_run_with_several_updates_per_step_trains_and_logs_them(local_ray, tiny_ckpt, synth_data, tmp_path):
    cfg = small_cfg(tmp_path, zero=2, rollout={"num_workers": 1}, reward={"num_actors": 0},
                    learner={"num_learners": 1, "micro_batch_size": 2}, train={"steps": 2, "prompts_per_step": 2},
                    grpo={"num_iterations": 2, "mini_batches": 2})
    groups = RLVRGroups.build(cfg, str(tiny_ckpt), LABELS)
    try:
        recs = load_records(synth_data / "train.json").records
        tr = RLVRTrainer(cfg, groups, recs, None, LABELS, RunLogger(Path(cfg.train.output_dir), cfg.wandb, {}))
        for h in tr.fit():
            assert h["learner/optimizer_steps"] == 4 and h["learner/recomputed_old_logprobs"] == 1
            assert h["weight_version"] == h["step"]  # still one weight version per step (step is 1-based)
    finally:
        groups.shutdown()
