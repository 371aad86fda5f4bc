"""Fault injection on the real system (local Ray, DeepSpeed ZeRO-2 on CPU/gloo): a rollout worker or the
reward actor killed mid-run, a reward function that raises, bad media in a step, a non-finite loss or
gradient on one data-parallel rank, and hung collectives. One actor pool serves the module (building it is
the expensive part); the hung-collective test breaks its groups, so it runs last."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
import yaml

from actors.calls import ActorCallError, wait_named
from actors.groups import RLVRGroups
from actors.learner_group import shard_for_learners
from launch.common import Prepared
from launch.train_rlvr import RLVRTrainer, run_rlvr
from r1omni_ray.checkpointing import latest_checkpoint, read_state
from r1omni_ray.config import RunConfig, config_from_dict
from r1omni_ray.data.errors import DataError
from r1omni_ray.data.records import load_records
from r1omni_ray.learner.grpo_update import StepSpec
from r1omni_ray.model.loading import load_policy
from r1omni_ray.tiny.synthetic import make_corrupt_media
from r1omni_ray.tracking import RunLogger
from r1omni_ray.weight_broadcast import CollectiveError

pytestmark = pytest.mark.slow

LABELS = ["happy", "sad", "angry", "neutral"]
G = 4
TIMEOUT_S = 10.0  # learner.dist_timeout_s: how long a hung collective may take to surface


def fault_cfg(out: Path, **sections: dict[str, Any]) -> RunConfig:
    d: dict[str, Any] = {
        "rollout": {"num_workers": 2, "group_size": G, "max_new_tokens": 12, "num_cpus_per_worker": 0.5},
        "learner": {"num_learners": 2, "zero_stage": 2, "lr": 1e-3, "micro_batch_size": 4,
                    "num_cpus_per_learner": 0.5, "dist_timeout_s": TIMEOUT_S},
        # test_parity varies within a group (non-zero advantages, so weights really move);
        # test_always_raises fails on every sample (tests/fault_rewards.py, imported by the reward actor).
        "reward": {"num_actors": 1, "num_cpus_per_actor": 0.1, "modules": ["tests.fault_rewards"],
                   "rewards": [{"name": "test_parity"}, {"name": "test_always_raises"}]},
        "data": {"on_error": "skip"},
        "train": {"steps": 100, "prompts_per_step": 4, "output_dir": str(out), "log_samples": 0},
        "wandb": {"mode": "disabled"},
    }
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return config_from_dict(d)


@pytest.fixture(scope="module")
def ray_cluster():
    # address="local": always a fresh cluster of our own, even if another one runs on this machine.
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def groups(ray_cluster, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    p = RLVRGroups.build(fault_cfg(out), str(tiny_ckpt), LABELS)
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def records(synth_data):
    return load_records(synth_data / "train.json", label_set=LABELS).records


def make_trainer(groups: RLVRGroups, records: list[Any], cfg: RunConfig | None = None) -> RLVRTrainer:
    cfg = cfg or groups.cfg
    logger = RunLogger(Path(cfg.train.output_dir), cfg.wandb, {})
    return RLVRTrainer(cfg, groups, records, None, LABELS, logger)


def run_step(tr: RLVRTrainer, step: int) -> dict[str, float]:
    return tr.train_on(tr.pipeline.next_batch(step, tr.groups.sync.version))


def learner_states(groups: RLVRGroups) -> list[dict[str, torch.Tensor]]:
    return ray.get([lr.full_state.remote() for lr in groups.learners.actors])


def assert_workers_hold(groups: RLVRGroups, state: dict[str, torch.Tensor]) -> None:
    for i, w in enumerate(groups.rollout.workers):
        ws = ray.get(w.named_tensors.remote())
        for name, t in state.items():
            assert torch.equal(ws[name], t), f"rollout-worker-{i}: {name} differs from the learners'"
            assert torch.isfinite(ws[name]).all(), f"rollout-worker-{i}: {name} is not finite"


# ---------------------------------------------------------------------------------------------- rollout


def test_rollout_worker_killed_mid_step_is_replaced_resynced_and_reissued(groups, records, tiny_ckpt):
    tr = make_trainer(groups, records)
    m = run_step(tr, 0)  # a real update: the replacement must get these weights, not the checkpoint's
    assert m["learner/skipped_update"] == 0.0 and groups.sync.version >= 1
    restarts, reissued = groups.rollout.restarts, groups.rollout.reissued
    pid = ray.get(groups.rollout.workers[0].info.remote())["pid"]
    old = groups.rollout.workers[0]

    pending = tr.pipeline.submit(1)
    mine = [p for p in pending if p.worker_id == groups.rollout.active[0].id]
    assert mine and not ray.wait([mine[0].ref], timeout=0)[0], "worker 0's rollout should still be running"
    os.kill(pid, signal.SIGKILL)
    batch = tr.pipeline.next_batch(1, groups.sync.version)
    samples = batch.samples

    # Every prompt exactly once, each with its full G samples, all sampled with the current weights.
    assert [g.uid for g in samples] == list(range(groups.cfg.train.prompts_per_step))
    assert all(g.error is None and len(g.completions) == G for g in samples)
    assert all(g.weight_version == groups.sync.version for g in samples)
    assert groups.rollout.restarts == restarts + 1
    assert groups.rollout.reissued == reissued + len(mine[0].items)
    # rollout.min_workers=2 (the default: num_workers): the run waited for the replacement before re-issuing.
    assert old not in groups.rollout.workers and len(groups.rollout.workers) == 2
    assert pid not in [ray.get(w.info.remote())["pid"] for w in groups.rollout.workers]

    # The new worker joined the rebuilt gloo group and holds the learners' weights bit for bit ...
    state = learner_states(groups)[0]
    assert_workers_hold(groups, state)
    # ... which are not the initial checkpoint's (so the re-sync really happened).
    init = dict(load_policy(tiny_ckpt, "float32").named_parameters())
    assert any(not torch.equal(init[n].detach(), t) for n, t in state.items())

    m = tr.train_on(batch)  # and the step completes on the re-issued samples
    assert m["samples"] == groups.cfg.train.prompts_per_step * G


def test_worker_dead_between_steps_is_replaced_at_the_next_rollout(groups, records):
    tr = make_trainer(groups, records)
    restarts = groups.rollout.restarts
    ray.kill(groups.rollout.workers[1], no_restart=True)
    m = run_step(tr, 2)
    assert m["samples"] == groups.cfg.train.prompts_per_step * G
    assert groups.rollout.restarts == restarts + 1
    assert m["faults/worker_restarts"] == float(groups.rollout.restarts)
    assert_workers_hold(groups, learner_states(groups)[0])


def test_worker_killed_during_overlapped_rollout_and_broadcast(groups, records):
    """train.max_staleness=1: the next step's rollout is in flight while the learners update and broadcast.
    The worker dies then: the broadcast drops it (a replacement is requested) and redoes itself for the
    survivor; collecting the overlapped rollout later waits for the replacement (rollout.min_workers=2) and
    re-issues the lost share, without requesting another."""
    cfg = groups.cfg
    tr = make_trainer(groups, records, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_staleness=1)))
    restarts, reissued = groups.rollout.restarts, groups.rollout.reissued
    batch = tr.pipeline.next_batch(3, groups.sync.version)
    pid = ray.get(groups.rollout.workers[1].info.remote())["pid"]
    pending = tr.pipeline.submit(4)
    lost = sum(len(p.items) for p in pending if p.worker_id == groups.rollout.active[1].id)
    os.kill(pid, signal.SIGKILL)
    version = groups.sync.version
    m = tr.train_on(batch)
    assert groups.sync.version == version + 1 and m["samples"] == len(batch.samples) * G
    assert groups.rollout.restarts == restarts + 1
    nxt = tr.pipeline.next_batch(4, groups.sync.version).samples
    assert groups.rollout.restarts == restarts + 1  # not replaced twice
    assert groups.rollout.reissued == reissued + lost
    assert [g.uid for g in nxt] == list(range(groups.cfg.train.prompts_per_step))
    assert all(len(g.completions) == G for g in nxt)
    assert_workers_hold(groups, learner_states(groups)[0])


def test_idle_worker_killed_between_steps_is_found_before_the_broadcast(ray_cluster, tiny_ckpt, records, tmp_path):
    """A worker that dies after its rollout was collected: its media are still fetched by the learners (the
    driver owns them), and the broadcast finds the dead member before the collective starts instead of
    waiting out learner.dist_timeout_s."""
    timeout = 120.0
    cfg = fault_cfg(tmp_path, learner={"dist_timeout_s": timeout},
                    reward={"num_actors": 0, "rewards": [{"name": "test_parity"}]})
    groups = RLVRGroups.build(cfg, str(tiny_ckpt), LABELS)
    try:
        tr = make_trainer(groups, records)
        batch = tr.pipeline.next_batch(0, groups.sync.version)
        samples = batch.samples
        assert any(s.worker == 1 for s in samples)
        ray.kill(groups.rollout.workers[1], no_restart=True)
        t0 = time.monotonic()
        m = tr.train_on(batch)
        took = time.monotonic() - t0
        assert took < timeout / 10, f"the step took {took:.1f}s: the dead worker was found late"
        assert m["samples"] == len(samples) * G and groups.rollout.restarts == 1 and groups.sync.version == 1
        assert_workers_hold(groups, learner_states(groups)[0])
    finally:
        groups.shutdown()


def test_an_unschedulable_reward_actor_fails_the_run_at_start(ray_cluster, tmp_path):
    from actors.placement import PlacementError
    from actors.reward_group import RewardGroup

    cfg = fault_cfg(tmp_path, reward={"num_cpus_per_actor": 64.0}, ray={"placement_timeout_s": 2.0})
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=r"reward group .*'CPU': 64\.0.* not schedulable within 2s.*cluster has"):
        RewardGroup(cfg, LABELS)
    assert time.monotonic() - t0 < 30


# ---------------------------------------------------------------------------------------------- rewards


def test_reward_fn_raising_scores_zero_counted_and_a_killed_reward_actor_costs_no_signal(groups, records, caplog):
    tr = make_trainer(groups, records)
    n = groups.cfg.train.prompts_per_step * G
    with caplog.at_level("WARNING", logger="r1omni_ray"):
        m = run_step(tr, 5)
    # A registered reward that raises: 0 for every sample, counted, logged with the exception, step done.
    assert m["reward/test_always_raises_mean"] == 0.0 and m["reward/errors"] == n
    assert "injected reward failure" in caplog.text
    assert m["learner/skipped_update"] == 0.0

    restarts = groups.rewards.restarts
    ray.kill(groups.rewards.actors[0], no_restart=True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="r1omni_ray"):
        m = run_step(tr, 6)
    # The dead reward actor is replaced and its call re-run: the step keeps its signal (this step used to
    # score every sample 0); only the always-raising reward's errors are counted.
    assert m["reward/errors"] == n and m["samples"] == n and 0.0 < m["reward/test_parity_mean"] < 1.0
    assert "re-running its" in caplog.text and "reward actor 0 failed" not in caplog.text
    assert groups.rewards.restarts == restarts + 1


def test_reward_actor_killed_mid_call_is_rerun_on_a_replacement(groups):
    """Killed while scoring (a slow reward function): the same call runs again on the replacement."""
    import threading

    from actors.reward import RewardActor
    from r1omni_ray.rewards import score_completions

    slow = RewardActor.remote([("test_slow_parity", 1.0)], None, ["tests.fault_rewards"])
    ray.get(slow.__ray_ready__.remote())  # started: the kill lands inside the call
    old, groups.rewards.actors[0] = groups.rewards.actors[0], slow
    ray.kill(old, no_restart=True)
    restarts = groups.rewards.restarts
    texts, sols = ["<think>a</think><answer>sad</answer>", "<answer>x</answer>"] * 2, ["<answer>sad</answer>"] * 4
    killer = threading.Timer(1.0, lambda: ray.kill(slow, no_restart=True))
    killer.start()
    rb = groups.rewards.score(texts, sols)
    killer.join()
    assert "reward_actor_failed" not in rb.errors and groups.rewards.restarts == restarts + 1
    want = score_completions(texts, sols, groups.rewards.specs, label_set=groups.rewards.label_set)
    assert rb.total == want.total  # the replacement scores with the run's own rewards


def test_hung_reward_function_times_out_scores_zero_and_actor_is_replaced(groups):
    from actors.reward import RewardActor

    hung = RewardActor.remote([("test_hangs", 1.0)], None, ["tests.fault_rewards"])
    old, groups.rewards.actors[0] = groups.rewards.actors[0], hung
    ray.kill(old, no_restart=True)
    saved = groups.cfg.reward.timeout_s
    groups.cfg.reward.timeout_s = 3.0
    restarts = groups.rewards.restarts
    try:
        rb = groups.rewards.score(["<think>a</think><answer>sad</answer>"] * 4, ["<answer>sad</answer>"] * 4)
    finally:
        groups.cfg.reward.timeout_s = saved
    assert rb.total == [0.0] * 4 and rb.errors == {"reward_actor_failed": 4}
    assert "GetTimeoutError" in rb.error_examples["reward_actor_failed"]
    assert groups.rewards.restarts == restarts + 1 and groups.rewards.actors[0] is not hung
    rb = groups.rewards.score(["<think>a</think><answer>sad</answer>"] * 2, ["<answer>sad</answer>"] * 2)
    assert "reward_actor_failed" not in rb.errors  # the replacement actor scores again


# ---------------------------------------------------------------------------------------------- bad media


@pytest.fixture(scope="module")
def bad_media_records(synth_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("badmedia")
    bad = make_corrupt_media(d)
    good = json.loads((synth_data / "train.json").read_text())[:2]
    for r in good:
        r["video"], r["audio"] = str(synth_data / r["video"]), str(synth_data / r["audio"])
    conv = good[0]["conversations"]
    items = good + [
        {"id": "bad-truncated-video", "video": str(bad["truncated_mp4"]), "audio": good[0]["audio"], "conversations": conv},
        {"id": "bad-no-audio-track", "video": str(bad["no_audio_mp4"]), "conversations": conv},
        {"id": "bad-zero-length-wav", "video": good[0]["video"], "audio": str(bad["zero_length_wav"]), "conversations": conv},
        {"id": "bad-missing-file", "video": str(d / "missing.mp4"), "audio": good[0]["audio"], "conversations": conv},
    ]
    path = d / "mixed.json"
    path.write_text(json.dumps(items))
    # check_files=False: the missing file must be caught where media is read (the rollout worker) too.
    recs = load_records(path, label_set=LABELS, check_files=False).records
    return recs, bad


def test_bad_media_is_skipped_counted_and_never_reaches_the_learners(groups, bad_media_records, caplog):
    recs, bad = bad_media_records
    cfg = dataclasses.replace(groups.cfg, train=dataclasses.replace(groups.cfg.train, prompts_per_step=len(recs)))
    tr = make_trainer(groups, recs, cfg)
    with caplog.at_level("WARNING", logger="r1omni_ray"):
        batch = tr.pipeline.next_batch(0, groups.sync.version)
    errors = {g.record_id: g.error for g in batch.skipped}
    assert set(errors) == {r.id for r in recs if r.id.startswith("bad-")}
    assert str(bad["truncated_mp4"]) in errors["bad-truncated-video"]
    assert "no audio track" in errors["bad-no-audio-track"]
    assert str(bad["zero_length_wav"]) in errors["bad-zero-length-wav"]
    assert "missing.mp4" in errors["bad-missing-file"]

    m = tr.train_on(batch)
    assert m["data/skipped_records"] == 4.0
    assert m["samples"] == 2 * G  # only the two good records were trained on
    assert "bad-truncated-video" in caplog.text

    # Remembered for the run: listed with their reasons in the run dir, never sent (or counted) again, and
    # read back by a resumed trainer.
    listed = [json.loads(x) for x in (Path(cfg.train.output_dir) / "skipped_records.jsonl").read_text().splitlines()]
    assert {e["record"]: e["reason"] for e in listed} == errors and {e["step"] for e in listed} == {1}
    again = tr.pipeline.next_batch(1, groups.sync.version)
    assert again.skipped == [] and len(again.samples) == 2 and again.counters["data/known_bad_records"] == 4.0
    assert tr.train_on(again)["data/skipped_records"] == 0.0
    resumed = RLVRTrainer(cfg, groups, recs, None, LABELS, RunLogger(Path(cfg.train.output_dir), cfg.wandb, {}),
                          start_step=2)
    assert len(resumed.pipeline.bad) == 4 and not resumed.pipeline.next_batch(2, groups.sync.version).skipped

    # data.on_error=raise: the run stops with a DataError naming the record and the file, in the driver.
    rcfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, on_error="raise"))
    with pytest.raises(DataError) as ei:
        make_trainer(groups, recs, rcfg).pipeline.next_batch(0, groups.sync.version)
    files = {"bad-truncated-video": "truncated.mp4", "bad-no-audio-track": "no_audio.mp4",
             "bad-zero-length-wav": "zero_length.wav", "bad-missing-file": "missing.mp4"}
    rid = str(ei.value).split("'")[1]
    assert rid in files and files[rid] in str(ei.value), str(ei.value)


def test_step_whose_records_all_fail_is_skipped_not_fatal(groups, bad_media_records):
    recs, _ = bad_media_records
    bad_only = [r for r in recs if r.id.startswith("bad-")]
    cfg = dataclasses.replace(groups.cfg, train=dataclasses.replace(groups.cfg.train, prompts_per_step=2, steps=1))
    tr = make_trainer(groups, bad_only, cfg)
    version = groups.sync.version
    hist = tr.fit()
    assert hist[0]["data/skipped_records"] == 2.0 and hist[0]["data/skipped_steps"] == 1.0
    assert groups.sync.version == version  # no update, no broadcast


def test_sft_bad_media_keeps_its_slot_with_zero_weight(groups, bad_media_records, tiny_ckpt):
    """Cold-start SFT decodes media on the learners: a bad record must not crash a rank (or desync the
    ranks' micro-batches); it is skipped, counted and reported to the driver."""
    recs, _ = bad_media_records
    good = [r for r in recs if not r.id.startswith("bad-")]
    bad = [r for r in recs if r.id.startswith("bad-")]
    shards = [[good[0], bad[0]], [good[1], bad[1]]]
    outs = ray.get([lr.sft_batch.remote(sh, 1) for lr, sh in zip(groups.learners.actors, shards, strict=True)])
    assert [o["skipped_records"] for o in outs] == [1.0, 1.0]
    assert all(bad[r].id in outs[r]["skipped_reasons"][0] for r in range(2))
    assert all(math.isfinite(o["sft_loss"]) and o["sft_loss"] > 0 and o["skipped_update"] == 0.0 for o in outs)
    # Only the good record's tokens count.
    from r1omni_ray.data.processor import OmniProcessor

    proc = OmniProcessor.from_pretrained(tiny_ckpt)
    assert [o["tokens"] for o in outs] == [float(len(proc.response_ids(g.response or g.solution))) for g in good]


# ---------------------------------------------------------------------------------------------- numerics


def _prepared_batches(groups: RLVRGroups, records: list[Any], adv: list[float]):
    tr = make_trainer(groups, records)
    samples = tr.pipeline.next_batch(6, groups.sync.version).samples
    shards, num_micro = shard_for_learners(samples, adv, len(groups.learners.actors), groups.cfg.learner.micro_batch_size)
    lens = [len(c) for b in shards for c in b.completions]
    return shards, StepSpec(num_micro, sum(lens), len(lens), groups.cfg.rollout.max_new_tokens)


def test_nonfinite_loss_or_grad_on_one_rank_skips_the_update_on_all(groups, records):
    n = groups.cfg.train.prompts_per_step * G
    adv = [1.0, -1.0] * (n // 2)
    batches, spec = _prepared_batches(groups, records, adv)
    before = learner_states(groups)

    # 1. A NaN advantage on rank 1 only -> a NaN loss there; rank 0's loss and gradients are finite.
    batches[1].advantages[0] = math.nan
    outs = groups.learners.train_per_rank(batches, spec)
    assert [o["skipped_update"] for o in outs] == [1.0, 1.0]
    assert outs[1]["nonfinite_microbatches"] >= 1 and outs[0]["nonfinite_microbatches"] == 0
    after = learner_states(groups)
    for r in range(2):
        assert all(torch.equal(before[r][k], after[r][k]) for k in before[r]), f"rank {r} weights changed"

    # 2. A non-finite gradient (finite loss) injected on rank 1 only.
    batches[1].advantages[0] = 1.0
    ray.get(groups.learners.actors[1].debug_inject_nonfinite_grad.remote(math.inf))
    outs = groups.learners.train_per_rank(batches, spec)
    assert [o["skipped_update"] for o in outs] == [1.0, 1.0]
    assert outs[0]["skipped_updates"] == outs[1]["skipped_updates"] >= 2
    after = learner_states(groups)
    for r in range(2):
        assert all(torch.equal(before[r][k], after[r][k]) for k in before[r]), f"rank {r} weights changed"

    # The broadcast after a skipped update sends the unchanged, finite weights.
    groups.sync.broadcast(groups.sync.version + 1)
    assert_workers_hold(groups, after[0])

    # 3. The next clean update is applied again (the skip gate and the grad check were reset).
    outs = groups.learners.train_per_rank(batches, spec)
    assert [o["skipped_update"] for o in outs] == [0.0, 0.0]
    assert any(not torch.equal(before[0][k], v) for k, v in learner_states(groups)[0].items())
    groups.sync.broadcast(groups.sync.version + 1)


# ---------------------------------------------------------------------------------------------- driver death


def _resume_cfg(out: Path, ckpt: Path, train_path: Path) -> dict[str, Any]:
    return {
        "model": {"path": str(ckpt)},
        "data": {"train_path": str(train_path), "labels": LABELS},
        "rollout": {"num_workers": 1, "group_size": 2, "max_new_tokens": 6, "num_cpus_per_worker": 0.5},
        "reward": {"num_actors": 0},
        "learner": {"num_learners": 2, "zero_stage": 2, "lr": 1e-3, "micro_batch_size": 4,
                    "num_cpus_per_learner": 0.5, "dist_timeout_s": 60},
        "train": {"steps": 3, "prompts_per_step": 2, "output_dir": str(out), "log_samples": 0},
        "checkpoint": {"every": 1, "keep_last": 5},
        "wandb": {"mode": "disabled"},
    }


def test_driver_killed_between_steps_resumes_like_an_uninterrupted_run(ray_cluster, tiny_ckpt, synth_data, tmp_path):
    """SIGKILL the training driver (a job on this cluster: Ray then kills its actors too) once a checkpoint
    is committed, resume with --resume semantics, and compare with a run that was never interrupted."""
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    killed.mkdir()
    (killed / "run.yaml").write_text(yaml.safe_dump(_resume_cfg(killed, tiny_ckpt, synth_data / "train.json")))
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=str(Path.cwd()))
    with (tmp_path / "driver.log").open("w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "launch.train_rlvr", "--config", str(killed / "run.yaml")],
                                stdout=logf, stderr=subprocess.STDOUT, env=env)
    killed_at: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            ck = latest_checkpoint(killed)
            if ck is not None:
                proc.send_signal(signal.SIGKILL)
                killed_at.append(read_state(ck).step)
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_after_first_checkpoint)
    watcher.start()
    # Meanwhile, the uninterrupted reference run on the same cluster.
    prep = Prepared(str(tiny_ckpt), str(synth_data / "train.json"), None, None, LABELS)
    ref = run_rlvr(config_from_dict(_resume_cfg(straight, tiny_ckpt, synth_data / "train.json")), prep)
    watcher.join()
    proc.wait(timeout=60)
    assert killed_at and proc.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]
    assert killed_at[0] < 3, "the driver finished before it could be killed"

    resumed = run_rlvr(config_from_dict(_resume_cfg(killed, tiny_ckpt, synth_data / "train.json")), prep,
                       resume=True)
    assert resumed["resume_check"]["loaded"] == resumed["resume_check"]["saved"]
    done = read_state(latest_checkpoint(killed))
    want = read_state(latest_checkpoint(straight))
    assert done.step == want.step == 3 and done.weight_version == want.weight_version == 3
    assert all(ref["batches"][s] == b for s, b in resumed["batches"].items())
    # Same data, sampling seeds and optimizer state, one thread per actor on CPU: bit-identical weights.
    assert done.weights_checksum == want.weights_checksum


# ---------------------------------------------------------------------------------------------- hangs (last)


def test_hung_collectives_time_out_naming_the_actor(groups, records):
    """Runs last: it leaves the DP and broadcast groups of the module's pool broken."""
    n = groups.cfg.train.prompts_per_step * G
    batches, spec = _prepared_batches(groups, records, [1.0, -1.0] * (n // 2))

    # A weight broadcast that the learner never sends: the waiting worker gives up after broadcast_timeout_s.
    t0 = time.monotonic()
    w = groups.rollout.workers[1]
    with pytest.raises(ActorCallError, match="rollout-worker-1.receive_weights") as ei:
        wait_named([("rollout-worker-1", "receive_weights", w.receive_weights.remote(99, groups.sync.metas, groups.sync.routes))])
    assert isinstance(ei.value.cause, CollectiveError) and "timed out" in str(ei.value)
    assert time.monotonic() - t0 < TIMEOUT_S + 30

    # A data-parallel step that only rank 0 enters: its collective times out; the error names learner-0.
    t0 = time.monotonic()
    with pytest.raises(ActorCallError, match="learner-0.train"):
        wait_named([("learner-0", "train", groups.learners.actors[0].train.remote(batches[0], spec))])
    assert time.monotonic() - t0 < TIMEOUT_S + 30


@ray.remote(num_cpus=0)
class _Raiser:
    def fail(self, delay: float) -> None:
        time.sleep(delay)
        raise ValueError(f"failed after {delay}s")


def test_the_peers_of_a_failed_call_fail_quietly(ray_cluster):
    """One rank fails; its peer fails a moment later (as a rank left in a collective does). The first failure
    is raised, named; the peer's expected error is collected, not printed as Ray's "Unhandled error"
    traceback (which made a recovered learner loss read like a crash in the job log)."""
    import gc
    import logging

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    ray_log = logging.getLogger("ray._private.worker")  # where Ray reports an error nobody fetched
    ray_log.addHandler(handler)
    first, peer = _Raiser.remote(), _Raiser.remote()
    with pytest.raises(ActorCallError, match=r"learner-0.train failed: ValueError: failed after 0.0s"):
        wait_named([("learner-0", "train", first.fail.remote(0.0)), ("learner-1", "train", peer.fail.remote(1.0))])
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:  # the peer fails and its ref is dropped meanwhile
        gc.collect()
        time.sleep(0.5)
    ray_log.removeHandler(handler)
    assert not [m for m in seen if "Unhandled error" in m], seen
