"""A two-node Ray cluster (ray.cluster_utils.Cluster on one machine) with learners and rollout workers on
different nodes, ZeRO-3: training steps run and the weight broadcast crosses the node boundary bit-exactly."""

import pytest
import ray

from actors.groups import RLVRGroups
from launch.train_rlvr import RLVRTrainer
from r1omni_ray.config import WandbConfig
from r1omni_ray.data.records import load_records
from r1omni_ray.tracking import RunLogger
from tests.system.test_rlvr_system import LABELS, assert_workers_match_learners, small_cfg

pytestmark = pytest.mark.slow


def test_two_node_cluster_zero3_training_and_broadcast(tiny_ckpt, synth_data, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"learner_node": 4}})
    cluster.add_node(num_cpus=3, resources={"rollout_node": 4})
    ray.init(address=cluster.address)
    try:
        # The collectives on a named interface (loopback: both "nodes" are this machine) and ports from a range.
        ports = [41000, 41999]
        cfg = small_cfg(tmp_path, zero=3, learner={"node_resource": "learner_node"},
                        rollout={"node_resource": "rollout_node"},
                        ray={"network_interface": "lo", "port_range": ports})
        groups = RLVRGroups.build(cfg, str(tiny_ckpt), LABELS)
        try:
            linfo = ray.get([lr.info.remote() for lr in groups.learners.actors])
            winfo = ray.get([w.info.remote() for w in groups.rollout.workers])
            lnodes, wnodes = {i["node_id"] for i in linfo}, {i["node_id"] for i in winfo}
            assert len(lnodes) == 1 and len(wnodes) == 1 and lnodes.isdisjoint(wnodes)
            assert {i["ifname"] for i in linfo + winfo} == {"lo"}
            used = [linfo[0]["master_port"], *linfo[0]["sync_ports"]]
            assert len(used) == 2 and all(ports[0] <= p <= ports[1] for p in used)  # hf engine: the ACTORS group
            recs = load_records(synth_data / "train.json").records
            logger = RunLogger(tmp_path, WandbConfig(mode="disabled"), {})
            hist = RLVRTrainer(cfg, groups, recs, None, LABELS, logger).fit()
            assert len(hist) == 2 and groups.sync.version == 2
            assert all(h["samples"] == 16 for h in hist)
            assert all(v == 2 for v in (i["version"] for i in ray.get([w.info.remote() for w in groups.rollout.workers])))
            assert_workers_match_learners(groups)
        finally:
            groups.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
