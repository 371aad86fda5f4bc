"""Elastic rollout workers with Ray's autoscaler (issue #23): the fake multi-node provider that Ray's own
tests use (ray.cluster_utils.AutoscalingCluster) launches worker nodes for the run's pending placement groups
and its request_resources call; the workers join the running job. Its own module: AutoscalingCluster runs
`ray stop --force`, which must not meet another test's cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import ray

from actors.groups import RLVRGroups
from launch.train_rlvr import RLVRTrainer
from r1omni_ray.config import WandbConfig
from r1omni_ray.data.records import load_records
from r1omni_ray.tracking import RunLogger
from tests.system.test_rlvr_system import LABELS, assert_workers_match_learners, small_cfg

pytestmark = pytest.mark.slow


def fake_provider_cluster(head: dict[str, float], worker_types: dict[str, Any]) -> Any:
    """Ray's AutoscalingCluster. It reads its base cluster config from a file the wheel does not ship, so the
    fake provider's cluster config (Ray's cluster YAML schema) is written out here."""
    from ray.cluster_utils import AutoscalingCluster

    class Cluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **extra):
            types = dict(worker_node_types)
            types["ray.head.default"] = {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}
            empty: dict[str, list] = {k: [] for k in (
                "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
                "rsync_filter")}
            return {"cluster_name": "r1omni-fake", "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
                    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                                 "disable_launch_config_check": True},
                    "available_node_types": types, "head_node_type": "ray.head.default", "auth": {},
                    "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "docker": {}, "file_mounts": {},
                    "file_mounts_sync_continuously": False, **empty, **extra}

    return Cluster(head_resources=head, worker_node_types=worker_types)


def test_autoscaler_launches_the_nodes_the_run_asks_for_and_the_workers_join(tiny_ckpt, synth_data, tmp_path,
                                                                            monkeypatch):
    # `ray start` / `ray stop` by name: this interpreter's bin first.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    ray.shutdown()
    # Only standard head resources: AutoscalingCluster.start quotes --resources for a shell it does not use.
    # The learner is placed first, on the head (the only node then).
    cluster = fake_provider_cluster(
        {"CPU": 2},
        {"rollout": {"resources": {"CPU": 1, "rollout_node": 1}, "node_config": {}, "min_workers": 0,
                     "max_workers": 2}})
    cluster.start()
    try:
        ray.init("auto", log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 1  # the head only: no rollout node yet
        # The run starts as soon as one worker is up and asks the autoscaler for the second.
        cfg = small_cfg(tmp_path, zero=2, learner={"num_learners": 1},
                        rollout={"node_resource": "rollout_node", "num_workers": 2, "min_workers": 1,
                                 "max_workers": 2, "num_cpus_per_worker": 1, "autoscale": True},
                        reward={"num_actors": 0}, train={"steps": 40})
        groups = RLVRGroups.build(cfg, str(tiny_ckpt), LABELS)
        try:
            recs = load_records(synth_data / "train.json").records
            tr = RLVRTrainer(cfg, groups, recs, None, LABELS, RunLogger(tmp_path, WandbConfig(mode="disabled"), {}))
            while len(groups.rollout.active) < 2:
                assert tr.step < cfg.train.steps, f"the second worker never joined: {groups.rollout.state()}"
                tr.fit(tr.step + 1)
            tr.fit(tr.step + 1)  # a step on both
            nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
            assert len(nodes) == 3
            wnodes = [i["node_id"] for i in ray.get([w.info.remote() for w in groups.rollout.workers])]
            assert len(set(wnodes)) == 2 and all(nodes[n]["Resources"].get("rollout_node") == 1 for n in wnodes)
            assert sum(h["rollout/joined"] for h in tr.history) == 1
            assert all(h["samples"] == cfg.train.prompts_per_step * cfg.rollout.group_size for h in tr.history)
            assert_workers_match_learners(groups)
        finally:
            groups.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
