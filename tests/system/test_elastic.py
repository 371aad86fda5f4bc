"""Elastic rollout workers on real multi-node Ray clusters on one machine (issue #23): a worker joins when a
node arrives and leaves with its node, under ZeRO-3 with overlapped (one-step off-policy) steps; the Ray
autoscaler launches the nodes a run asks for; a learner killed mid-run is restored in the job and the steps
since its checkpoint are replayed exactly."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import ray

from actors import load_progress
from actors.calls import ActorCallError
from actors.groups import RLVRGroups
from actors.load_progress import LoadProgress
from actors.placement import CapacityError
from actors.rollout_group import RolloutGroup, WorkerLoadTimeout
from actors.scale_control import ScaleRefused
from launch.checkpointer import Checkpointer
from launch.train_rlvr import RLVRTrainer
from r1omni_ray.checkpointing import latest_checkpoint, read_state
from r1omni_ray.config import WandbConfig
from r1omni_ray.data.records import load_records
from r1omni_ray.tracking import RunLogger
from tests.system.test_rlvr_system import LABELS, assert_workers_match_learners, small_cfg

pytestmark = pytest.mark.slow
G = 4
PROMPTS = 4


def wait_loaded(groups: RLVRGroups, timeout_s: float = 180.0) -> None:
    """Until a pending worker is placed and loaded (it then joins at the next step boundary)."""
    deadline = time.monotonic() + timeout_s
    while not groups.rollout.poll():
        assert time.monotonic() < deadline, f"no pending worker loaded in {timeout_s:g}s: {groups.rollout.state()}"
        time.sleep(0.5)


def worker_nodes(groups: RLVRGroups) -> list[str]:
    return [i["node_id"] for i in ray.get([w.info.remote() for w in groups.rollout.workers])]


def test_worker_joins_with_a_new_node_and_leaves_with_it_zero3_overlap(tiny_ckpt, synth_data, tmp_path):
    """One rollout node at the start (rollout.min_workers=1 of num_workers=2): the run starts with one worker
    while the second's placement group waits. A node is added: the worker loads there and joins at the next
    step boundary, bit-exact with the learners. Its node is removed: the run goes on with one worker at
    once, every step with all its prompts x G samples, and every overlapped sample's weight version right."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"learner_node": 4}})
    first = cluster.add_node(num_cpus=1, resources={"rollout_node": 1})
    ray.init(address=cluster.address)
    try:
        cfg = small_cfg(tmp_path, zero=3, learner={"node_resource": "learner_node"},
                        rollout={"node_resource": "rollout_node", "num_workers": 2, "min_workers": 1,
                                 "max_workers": 2, "num_cpus_per_worker": 1, "capacity_timeout_s": 5},
                        reward={"num_actors": 0}, train={"max_staleness": 1, "steps": 7, "prompts_per_step": PROMPTS})
        groups = RLVRGroups.build(cfg, str(tiny_ckpt), LABELS)
        try:
            assert groups.rollout.state() == {"target": 2, "active": 1, "pending": 1, "min": 1, "max": 2}
            recs = load_records(synth_data / "train.json").records
            seen: dict[str, object] = {}

            class Trainer(RLVRTrainer):
                def after_step(self) -> None:  # in the driver, while the next step's rollout is in flight
                    super().after_step()
                    if self.step == 2:
                        seen["first"] = worker_nodes(groups)
                        seen["node"] = cluster.add_node(num_cpus=1, resources={"rollout_node": 1})
                        wait_loaded(groups)
                    elif self.step == 3:
                        seen["nodes"] = worker_nodes(groups)
                        assert_workers_match_learners(groups)
                    elif self.step == 5:
                        seen["busy"] = [ray.get(w.stats.remote())["busy_s"] for w in groups.rollout.workers]
                        cluster.remove_node(seen["node"])  # with step 6's share in flight on it

            logger = RunLogger(tmp_path, WandbConfig(mode="disabled"), {})
            tr = Trainer(cfg, groups, recs, None, LABELS, logger,
                         checkpointer=Checkpointer(cfg, groups, tmp_path, str(tiny_ckpt), logger))
            hist = tr.fit()
            assert len(seen["first"]) == 1
            # Step 3's boundary admitted the loaded worker (step 4's rollout already in flight on the first);
            # the step's broadcast brought it to the learners' weights bit for bit, and it took rollouts.
            assert [h["rollout/num_workers"] for h in hist] == [1, 1, 2, 2, 2, 1, 1]
            assert [h["rollout/joined"] for h in hist] == [0, 0, 1, 0, 0, 0, 0]
            nodes = seen["nodes"]
            assert len(set(nodes)) == 2 and nodes[0] == seen["first"][0]
            assert all(b > 0 for b in seen["busy"]), seen["busy"]
            # Its node went: the run went on at once with the survivor, losing no prompt and no step.
            assert [h["step"] for h in hist] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
            assert all(h["samples"] == PROMPTS * G for h in hist)
            assert [h["rollout/lost"] for h in hist] == [0, 0, 0, 0, 0, 1, 0]
            assert groups.rollout.reissued > 0 and groups.rollout.state()["pending"] == 1  # a replacement asked
            # Overlapped steps trained on samples drawn at most one version back (one back unless a worker took
            # the new weights before its queued rollout started generating), the joiner's included.
            lags = [h["weight_version_lag"] for h in hist]
            assert lags[0] == 0.0 and all(x <= 1.0 for x in lags) and sum(lags) >= 3, lags
            assert groups.sync.version == 7
            assert_workers_match_learners(groups)

            # The last rollout node goes too: below rollout.min_workers, the run waits capacity_timeout_s,
            # then stops with a checkpoint of the last finished step instead of hanging.
            cluster.remove_node(first)
            with pytest.raises(CapacityError, match=r"stopped at step 7 with checkpoint .*step_7.*--resume"):
                tr.fit(8)
            assert read_state(latest_checkpoint(tmp_path)).step == 7
        finally:
            groups.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_resize_bounds_and_capacity_refusals_change_nothing(tiny_ckpt, tmp_path, caplog):
    """The scale command's answers, on a live group: out of [min, max], and more than the cluster's free
    resources without rollout.autoscale; then a shrink that applies at the boundary."""
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        # 3 CPUs: 1 learner x 0.5 + 2 workers x 1 used, 0.5 free.
        cfg = small_cfg(tmp_path, zero=2, rollout={"num_workers": 2, "min_workers": 1, "max_workers": 4,
                                                   "num_cpus_per_worker": 1},
                        learner={"num_learners": 1}, reward={"num_actors": 0})
        # A worker that cannot load is not re-requested forever: after rollout.max_restarts, one named error.
        bad = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_restarts=0))
        with pytest.raises(ActorCallError, match=r"rollout-worker-\d+\.__init__ failed"):
            RolloutGroup(bad, str(tmp_path / "no_such_checkpoint"))
        # Loading is timed on its own (not by ray.placement_timeout_s), and a slow one is named with its phase.
        slow = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, load_timeout_s=0.5))
        with pytest.raises(WorkerLoadTimeout, match=r"rollout-worker-\d+ has been loading for \d+ s, over "
                                                    r"rollout.load_timeout_s=0.5 \((in '|no progress)"):
            RolloutGroup(slow, str(tiny_ckpt))
        progress = LoadProgress("probe")
        with progress.phase("policy load"):
            assert load_progress.describe(load_progress.read("probe")).startswith("in 'policy load' for ")
        with progress.phase("vLLM start"):
            assert "after policy load 0 s" in load_progress.describe(load_progress.read("probe"))
        assert list(load_progress.read("probe")["done"]) == ["policy load", "vLLM start"]
        load_progress.forget("probe")
        assert load_progress.read("probe") is None
        with caplog.at_level("INFO", logger="r1omni_ray"):
            groups = RLVRGroups.build(cfg, str(tiny_ckpt), LABELS)
        assert re.search(r"rollout-worker-\d+ loaded in \d+ s \(policy load \d+ s, hf engine \d+ s\)", caplog.text)
        try:
            before = groups.rollout.state()
            with pytest.raises(ScaleRefused, match=r"outside \[rollout.min_workers, rollout.max_workers\] = \[1, 4\]"):
                groups.rollout.resize(5)
            with pytest.raises(ScaleRefused, match=r"^the cluster has 0.5 free CPU; 1 more need 1 "):
                groups.rollout.resize(3)
            assert groups.rollout.state() == before  # min_workers=1: the run started, the 2nd still loading
            first = groups.rollout.names()
            wait_loaded(groups)
            assert groups.rollout.at_boundary() and groups.rollout.state()["active"] == 2
            assert groups.rollout.resize(1).startswith("rollout workers: target 1, active 2")
            assert groups.rollout.at_boundary() and groups.rollout.names() == first  # the last to join left
            groups.sync.broadcast(1)  # the group re-formed for the one member
            assert_workers_match_learners(groups)
        finally:
            groups.shutdown()
    finally:
        ray.shutdown()


def _learner_pids() -> list[int]:
    """Ray titles an actor's process ray::<Class>[.<method>]."""
    import psutil

    return sorted(p.pid for p in psutil.process_iter(["cmdline"])
                  if (p.info["cmdline"] or [""])[0].startswith("ray::LearnerActor"))


def kill_a_learner_at_checkpoint(out: Path, step: int, box: dict[str, int], or_later: bool = False) -> threading.Thread:
    """SIGKILL a learner process (its pid goes in box["pid"]) once the run in ``out`` committed the checkpoint
    of ``step`` (or of a later step, with or_later); the thread is started."""

    def run() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            ck = latest_checkpoint(out)
            at = read_state(ck).step if ck is not None else -1
            if (at == step or (or_later and at > step)) and (pids := _learner_pids()):
                box["pid"] = pids[-1]
                os.kill(pids[-1], signal.SIGKILL)
                return
            time.sleep(0.2)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_learner_killed_mid_run_is_restored_in_the_job_and_replays_exactly(tiny_ckpt, synth_data, tmp_path):
    """SIGKILL a learner once the step-2 checkpoint is committed: the run rebuilds its learner group from it,
    re-syncs the workers, replays from step 3, and ends with the same weights and per-step metrics as an
    uninterrupted run (one W&B run, offline)."""
    from launch.common import Prepared
    from launch.train_rlvr import run_rlvr

    def cfg_for(out: Path):
        return small_cfg(out, zero=2, rollout={"num_workers": 1}, reward={"num_actors": 0},
                         train={"steps": 4, "prompts_per_step": PROMPTS}, checkpoint={"every": 2},
                         wandb={"mode": "offline"})

    prep = Prepared(str(tiny_ckpt), str(synth_data / "train.json"), None, None, LABELS)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        straight = run_rlvr(cfg_for(tmp_path / "straight"), prep)
        killed_out = tmp_path / "killed"
        box: dict[str, int] = {}
        killer = kill_a_learner_at_checkpoint(killed_out, 2, box)
        res = run_rlvr(cfg_for(killed_out), prep)
        killer.join(timeout=5)
        assert "pid" in box and res["learner_restarts"] == 1
        assert read_state(Path(res["checkpoint"])).weights_checksum == read_state(
            Path(straight["checkpoint"])).weights_checksum
        keys = ("reward/total_mean", "learner/loss", "learner/kl", "response/length_mean")
        rows = {p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines() if '"reward/' in x]
                for p in (tmp_path / "straight", killed_out)}
        assert [r["step"] for r in rows[killed_out]] == [1, 2, 3, 4]  # the replayed rows replaced the lost ones
        for a, b in zip(rows[tmp_path / "straight"], rows[killed_out], strict=True):
            assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
        assert rows[killed_out][-1]["faults/learner_restarts"] == 1.0
        assert len(list((killed_out / "wandb").glob("offline-run-*"))) == 1
    finally:
        ray.shutdown()
