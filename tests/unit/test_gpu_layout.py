"""GPU-layout decisions made before anything runs on a GPU: the weight broadcast's backend from where Ray placed
each end (learner.broadcast_backend), and DeepSpeed's overlap_comm (learner.overlap_comm)."""

import pytest

from actors.weight_sync import choose_backend
from r1omni_ray.config import load_config
from r1omni_ray.learner.policy import deepspeed_config


@pytest.mark.parametrize("learner, workers, want", [
    (("n1", ["0"]), [("n1", ["1"]), ("n2", ["0"])], "nccl"),  # a GPU each, none shared
    (("n1", ["0"]), [("n1", ["0"])], "gloo"),  # one GPU shared by learner-0 and a worker (fractional GPUs)
    (("n1", ["0", "1"]), [("n2", ["0"]), ("n1", ["1", "2"])], "gloo"),  # tensor-parallel worker overlaps
    (("n1", []), [("n2", ["0"])], "gloo"),  # a CPU learner
    (("n1", ["0"]), [("n2", ["0"]), ("n3", [])], "gloo"),  # one CPU worker (hf on CPU)
    (("n1", ["0"]), [], "nccl"),  # no worker yet
])
def test_auto_picks_nccl_only_where_every_rank_has_a_gpu_of_its_own(learner, workers, want):
    assert choose_backend("auto", learner, workers) == want
    assert choose_backend("gloo", learner, workers) == "gloo"  # forced
    assert choose_backend("nccl", learner, workers) == "nccl"


def test_overlap_comm_defaults_on_for_gpu_learners_and_follows_the_config():
    cfg = load_config(None, [])
    assert deepspeed_config(cfg, bf16=True, on_gpu=True)["zero_optimization"]["overlap_comm"] is True
    assert deepspeed_config(cfg, bf16=False, on_gpu=False)["zero_optimization"]["overlap_comm"] is False
    off = load_config(None, ["learner.overlap_comm=false", "learner.zero_stage=3"])
    ds = deepspeed_config(off, bf16=True, on_gpu=True, grad_accum=4)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": False}
    assert ds["gradient_accumulation_steps"] == 4 and ds["bf16"] == {"enabled": True}
