"""Off-policy training on real Ray + DeepSpeed (CPU, gloo): samples really drawn by older weights are weighted by
proximal/behaviour (the bug this replaces: with vLLM the "old" log-probs were recomputed with the learners'
current weights, so the ratio was exactly 1 and stale samples were trained on as if on-policy), and a run with
train.max_staleness=2 keeps every sample within two versions, with the correction applied."""

import dataclasses
from pathlib import Path

import pytest
import torch

from actors.groups import RLVRGroups
from actors.learner_group import shard_for_learners
from launch.train_rlvr import RLVRTrainer
from r1omni_ray.data.records import load_records
from r1omni_ray.engines.base import SamplingParams
from r1omni_ray.learner.grpo_update import StepSpec
from r1omni_ray.learner.old_logprobs import LogprobPlan, old_logprob_source
from r1omni_ray.step_metrics import learner_metrics
from r1omni_ray.tracking import RunLogger
from tests.system.test_rlvr_system import LABELS, small_cfg

pytestmark = pytest.mark.slow
CAP = 1.02  # small enough that one lr=1e-2 update truncates some tokens


def _spec(shards, num_micro, plan=LogprobPlan()) -> StepSpec:
    lens = [len(c) for s in shards for c in s.completions]
    return StepSpec(num_micro, sum(lens), len(lens), 12, plan)


def test_samples_drawn_one_version_back_are_weighted_proximal_over_behaviour(local_ray, tiny_ckpt, synth_data,
                                                                              tmp_path):
    cfg = small_cfg(tmp_path, zero=2, grpo={"beta": 0.0}, learner={"lr": 1e-2, "correction_cap": CAP},
                    rollout={"num_workers": 1})
    groups = RLVRGroups.build(cfg, str(tiny_ckpt), LABELS)
    try:
        recs = load_records(synth_data / "train.json").records
        params = SamplingParams(n=4, max_new_tokens=12, seed=0, logprobs=True)
        samples = groups.rollout.collect(groups.rollout.submit(list(enumerate(recs[:3])), params), params)
        assert all(g.weight_version == 0 for g in samples)
        adv = [1.0, 0.5, -0.5, -1.0] * len(samples)
        shards, num_micro = shard_for_learners(samples, adv, 2, cfg.learner.micro_batch_size)
        # The behaviour log-probs are the sampling weights' (version 0): equal to the learners' before the update.
        v0 = [lp for rank in groups.learners.logprobs(shards, num_micro) for lp in rank]
        behaviour = [lp for s in shards for lp in s.sampling_logprobs]
        for a, b in zip(v0, behaviour, strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-4)
        groups.learners.train(shards, _spec(shards, num_micro))  # on-policy update: learners now at version 1
        groups.sync.broadcast(1)

        # The same samples, now one version stale. The decision for the vLLM engine (where the bug lived) and
        # for hf alike: proximal = the learners' current weights, corrected towards the behaviour's.
        for engine in ("vllm", "hf"):
            ecfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, engine=engine))
            plan = old_logprob_source(ecfg, [g.weight_version for g in samples], groups.sync.version, True)
            assert plan == LogprobPlan("forward", "tis", behaviour=True), (engine, plan)
        v1 = [lp for rank in groups.learners.logprobs(shards, num_micro) for lp in rank]
        rho = torch.cat([torch.tensor(p, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
                         for p, b in zip(v1, behaviour, strict=True)]).exp()
        assert (rho - 1).abs().max() > 1e-3, "the update did not move the policy: the test would prove nothing"
        m = learner_metrics(groups.learners.train(shards, _spec(shards, num_micro, plan)))
        # The applied weights are exactly proximal/behaviour (truncated at the cap), not 1.
        assert m["learner/corrected_step"] == 1.0
        assert m["offpolicy/is_ratio_mean"] == pytest.approx(float(rho.mean()), rel=1e-4)
        assert m["offpolicy/is_ratio_max"] == pytest.approx(float(rho.max()), rel=1e-4)
        assert m["offpolicy/is_weight_mean"] == pytest.approx(float(rho.clamp(max=CAP).mean()), rel=1e-4)
        assert m["offpolicy/corrected_frac"] == pytest.approx(float((rho > CAP).double().mean()), abs=1e-9)
        assert 0 < m["offpolicy/corrected_frac"] < 1
        assert m["offpolicy/mismatch_kl"] == pytest.approx(float((rho - 1 - rho.log()).mean()), rel=1e-3)
        assert m["offpolicy/mismatch_kl/video_audio"] == m["offpolicy/mismatch_kl"]  # every prompt has both
    finally:
        groups.shutdown()


def test_a_run_at_max_staleness_two_trains_within_the_window_with_the_correction(local_ray, tiny_ckpt, synth_data,
                                                                                tmp_path):
    steps = 6
    cfg = small_cfg(tmp_path, zero=2, rollout={"num_workers": 1}, learner={"num_learners": 1},
                    train={"steps": steps, "max_staleness": 2, "prompts_per_step": 2},
                    reward={"num_actors": 0})
    groups = RLVRGroups.build(cfg, str(tiny_ckpt), LABELS)
    try:
        recs = load_records(synth_data / "train.json").records
        tr = RLVRTrainer(cfg, groups, recs, None, LABELS, RunLogger(Path(cfg.train.output_dir), cfg.wandb, {}))
        hist = tr.fit()
        assert len(hist) == steps and groups.sync.version == steps
        assert all(h["staleness/max"] <= 2 for h in hist)
        assert max(h["staleness/max"] for h in hist) >= 1, "no step was off-policy"
        for h in hist:
            assert h["samples"] == 2 * cfg.rollout.group_size and h["async/stale_redrawn"] == 0
            # The behaviour log-probs are recorded on every step of an async run, so every step is corrected
            # (on-policy ones with ratio 1 on the hf engine, whose kernels are the learners').
            assert h["learner/corrected_step"] == 1.0 and h["offpolicy/is_weight_mean"] > 0
            if h["staleness/max"] == 0:
                assert h["offpolicy/is_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
        assert not tr.pipeline.in_flight()  # the window ends with the run
    finally:
        groups.shutdown()


def test_a_learner_lost_at_max_staleness_two_is_restored_and_the_queued_rollouts_redrawn(local_ray, tiny_ckpt,
                                                                                          synth_data, tmp_path):
    """k=2 with an in-job learner restart: the rollouts queued ahead were drawn by weights that the restore
    rolls back; they are discarded and redrawn from the checkpoint's weights, and the run ends with every step
    once, each within the staleness bound."""
    import json

    from launch.common import Prepared
    from launch.train_rlvr import run_rlvr
    from tests.system.test_elastic import kill_a_learner_at_checkpoint

    out = tmp_path / "run"
    cfg = small_cfg(out, zero=2, rollout={"num_workers": 1}, reward={"num_actors": 0},
                    train={"steps": 8, "prompts_per_step": 2, "max_staleness": 2}, checkpoint={"every": 2})
    box: dict[str, int] = {}
    killer = kill_a_learner_at_checkpoint(out, 2, box, or_later=True)  # steps are fast: any checkpoint before the end
    res = run_rlvr(cfg, Prepared(str(tiny_ckpt), str(synth_data / "train.json"), None, None, LABELS))
    killer.join(timeout=5)
    assert "pid" in box and res["learner_restarts"] == 1 and res["weight_version"] == 8
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward/' in x]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["staleness/max"] <= 2 and r["learner/corrected_step"] == 1.0 for r in rows)
    assert rows[-1]["faults/learner_restarts"] == 1.0


def test_streamed_groups_train_within_the_window_and_resume_without_repeating_a_prompt(local_ray, tiny_ckpt,
                                                                                       synth_data, tmp_path):
    """train.stream_groups on two real workers: every step trains prompts_per_step groups within the window;
    a checkpoint keeps the positions still ahead, and a run resumed from it draws those first, so no prompt is
    trained twice or skipped (16 records, 8 trained: all within one epoch)."""
    from launch.common import Prepared
    from launch.train_rlvr import run_rlvr
    from r1omni_ray.checkpointing import read_state

    out = tmp_path / "run"
    prep = Prepared(str(tiny_ckpt), str(synth_data / "train.json"), None, None, LABELS)

    def cfg(steps):
        return small_cfg(out, zero=2, learner={"num_learners": 1}, reward={"num_actors": 0},
                         rollout={"num_workers": 2, "stream_calls_per_worker": 1},
                         train={"steps": steps, "prompts_per_step": 2, "max_staleness": 2, "stream_groups": True},
                         checkpoint={"every": 1, "keep_last": 4})

    first = run_rlvr(cfg(4), prep)
    ck = out / "checkpoints" / "step_2"
    state = read_state(ck)
    assert state.step == 2 and state.pipeline is not None and state.pipeline["next"] >= 4
    resumed = run_rlvr(cfg(4), prep, resume=str(ck))
    batches = {k: v for k, v in first["batches"].items() if k < 2} | resumed["batches"]
    assert sorted(batches) == [0, 1, 2, 3]
    trained = [r for ids in batches.values() for r in ids]
    assert len(trained) == len(set(trained)) == 8
    # the positions ahead at the checkpoint went first in the resumed run (none skipped)
    from r1omni_ray.data.sampler import batch_indices

    recs = load_records(synth_data / "train.json").records
    ahead = [recs[batch_indices(len(recs), 2, p // 2, 0)[p % 2]].id for p in state.pipeline["redo"]]
    assert 0 < len(ahead) <= 4 and set(ahead) <= {r for s in (2, 3) for r in batches[s]}
    for h in first["history"] + resumed["history"]:
        assert h["samples"] == 2 * 4 and h["staleness/max"] <= 2 and h["async/stale_redrawn"] == 0
        assert h["learner/corrected_step"] == 1.0
