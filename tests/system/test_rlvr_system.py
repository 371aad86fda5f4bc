"""The distributed RLVR system on real Ray + real DeepSpeed (CPU, gloo): GRPO update direction, bit-exact
weight broadcast (ZeRO-2 here; ZeRO-3 across two nodes in test_multinode.py)."""

from pathlib import Path

import pytest
import ray
import torch

from actors.groups import RLVRGroups
from actors.learner_group import shard_for_learners
from r1omni_ray.config import config_from_dict
from r1omni_ray.data.records import load_records
from r1omni_ray.engines.base import SamplingParams
from r1omni_ray.learner.grpo_update import StepSpec

LABELS = ["happy", "sad", "angry", "neutral"]
pytestmark = pytest.mark.slow


def small_cfg(out: Path, zero: int, **sections) -> "object":
    d = {
        "rollout": {"num_workers": 2, "group_size": 4, "max_new_tokens": 12, "num_cpus_per_worker": 0.5},
        "learner": {"num_learners": 2, "zero_stage": zero, "lr": 1e-3, "micro_batch_size": 4,
                    "num_cpus_per_learner": 0.5, "dist_timeout_s": 120},
        "reward": {"num_actors": 1, "num_cpus_per_actor": 0.1},
        "train": {"steps": 2, "prompts_per_step": 4, "output_dir": str(out), "log_samples": 2},
        "wandb": {"mode": "disabled"},
    }
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return config_from_dict(d)


def train_and_broadcast(groups: RLVRGroups, shards: list, num_micro: int, max_len: int) -> None:
    """One GRPO update on hand-made advantages, then weight version 1 to the workers: the log-probs of the
    positive-advantage completions rose and the negative ones fell, and every worker holds the learners'
    weights bit for bit."""
    before = groups.learners.logprobs(shards, num_micro)
    lens = [len(c) for b in shards for c in b.completions]
    groups.learners.train(shards, StepSpec(num_micro, sum(lens), len(lens), max_len))
    after = groups.learners.logprobs(shards, num_micro)
    up = down = 0.0
    for b, lb, la in zip(shards, before, after, strict=True):
        for a, x, y in zip(b.advantages, lb, la, strict=True):
            delta = sum(y) - sum(x)
            up += delta if a > 0 else 0.0
            down += delta if a < 0 else 0.0
    assert up > 0 > down, (up, down)
    groups.sync.broadcast(1)
    assert_workers_match_learners(groups)


def assert_workers_match_learners(groups: RLVRGroups) -> None:
    # full_state is collective under ZeRO-3: every learner rank takes part in the gather.
    learner_state = groups.learners.full_states()[0]
    assert learner_state
    for w in groups.rollout.workers:
        wstate = ray.get(w.named_tensors.remote())
        for name, t in learner_state.items():
            assert torch.equal(wstate[name], t), f"{name} differs on a rollout worker"


@pytest.mark.parametrize("vision_trainable", [False, True], ids=["frozen-towers", "trainable-vision"])
def test_grpo_update_follows_advantages_and_broadcast_is_bit_exact_zero2(local_ray, tiny_ckpt, synth_data, tmp_path,
                                                                         vision_trainable):
    cfg = small_cfg(tmp_path, zero=2, grpo={"beta": 0.04}, model={"freeze_vision_tower": not vision_trainable})
    groups = RLVRGroups.build(cfg, str(tiny_ckpt), LABELS)
    try:
        recs = load_records(synth_data / "train.json").records
        params = SamplingParams(n=4, max_new_tokens=12, seed=0)
        samples = groups.rollout.collect(groups.rollout.submit(list(enumerate(recs[:4])), params), params)
        assert all(len(g.completions) == 4 and g.weight_version == 0 for g in samples)
        # A frozen tower's output travels instead of its raw input; a trainable tower gets the raw input and
        # runs on the learners (its weights are trained and broadcast).
        for media in ray.get([g.media_ref for g in samples]):
            assert media.audio_feats is not None and media.audio_features is None
            assert (media.pixel_values is not None) == vision_trainable
            assert (media.vision_feats is None) == vision_trainable
        assert any(m.name.startswith("model.vision_tower.") for m in groups.sync.metas) == vision_trainable
        # Hand-made advantages: the first two samples of every group are good, the last two bad.
        adv = [1.0, 1.0, -1.0, -1.0] * len(samples)
        shards, num_micro = shard_for_learners(samples, adv, 2, cfg.learner.micro_batch_size)
        train_and_broadcast(groups, shards, num_micro, max_len=12)
        samples = groups.rollout.collect(groups.rollout.submit(list(enumerate(recs[:2])), params), params)
        assert all(g.weight_version == 1 for g in samples)
    finally:
        groups.shutdown()
