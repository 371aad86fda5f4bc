"""The Qwen2.5-Omni family through the distributed system on real Ray + DeepSpeed (CPU, gloo): rollouts ship the
frozen towers' outputs, ZeRO-3 learners (every rank the same collectives, a text-only rank included) apply GRPO
in the advantages' direction, the broadcast is bit-exact, and the whole driver (SFT -> RLVR with its
evaluation and modality attribution) runs, its final model reloading as a thinker checkpoint."""

import dataclasses
from pathlib import Path

import pytest
import ray
import torch

from actors.groups import RLVRGroups
from actors.learner_group import shard_for_learners
from launch.common import Prepared
from launch.train_rlvr import run_rlvr
from launch.train_sft import run_sft
from r1omni_ray.data.records import load_records
from r1omni_ray.engines.base import SamplingParams
from r1omni_ray.model.family import detect
from r1omni_ray.model.qwen_omni import load_qwen_omni
from tests.system.test_rlvr_system import LABELS, small_cfg, train_and_broadcast

pytestmark = pytest.mark.slow
QWEN = {"family": "qwen2_5_omni"}


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory) -> Path:
    from r1omni_ray.tiny.qwen_omni import make_tiny_qwen_omni_checkpoint
    from r1omni_ray.tiny.synthetic import SYNTHETIC_VOCAB_TEXTS

    return make_tiny_qwen_omni_checkpoint(tmp_path_factory.mktemp("qckpt") / "full", tuple(SYNTHETIC_VOCAB_TEXTS))


@pytest.mark.parametrize("vision_trainable", [False, True], ids=["frozen-towers", "trainable-vision"])
def test_grpo_on_zero3_follows_advantages_and_broadcast_is_bit_exact(local_ray, qwen_ckpt, synth_data, tmp_path,
                                                                     vision_trainable):
    cfg = small_cfg(tmp_path, zero=3, grpo={"beta": 0.04},
                    model=QWEN | {"freeze_vision_tower": not vision_trainable})
    groups = RLVRGroups.build(cfg, str(qwen_ckpt), LABELS)
    try:
        recs = load_records(synth_data / "train.json").records[:4]
        recs[2:] = [dataclasses.replace(r, video=None) for r in recs[2:]]  # audio only: one rank gets no video
        params = SamplingParams(n=4, max_new_tokens=12, seed=0)
        samples = groups.rollout.collect(groups.rollout.submit(list(enumerate(recs)), params), params)
        assert all(len(g.completions) == 4 and g.inputs.positions.shape[0] == 3 for g in samples)
        assert [g.modalities() for g in samples] == [(True, True)] * 2 + [(False, True)] * 2
        for media in ray.get([g.media_ref for g in samples[:2]]):
            assert media.audio_feats is not None and media.audio_features is None
            assert (media.vision_feats is None) == vision_trainable
        assert any(m.name.startswith("visual.") for m in groups.sync.metas) == vision_trainable
        adv = [1.0, 1.0, -1.0, -1.0] * len(samples)
        # One rank without video: with a trainable vision tower it still runs the tower (on a zero input), or
        # ZeRO-3's gathers would fall out of step.
        shards, num_micro = shard_for_learners(samples, adv, 2, cfg.learner.micro_batch_size)
        assert sorted(any(p.media_kinds[0] for p in b.prompts) for b in shards) == [False, True]
        train_and_broadcast(groups, shards, num_micro, max_len=12)
    finally:
        groups.shutdown()


def test_sft_then_rlvr_with_evaluation_and_the_export_reloads(local_ray, qwen_ckpt, synth_data, tmp_path):
    cfg = small_cfg(tmp_path / "run", zero=2, model=QWEN, sft={"epochs": 1, "batch_size": 4},
                    train={"steps": 2, "eval_every": 2})
    prep = Prepared(str(qwen_ckpt), str(synth_data / "train.json"), str(synth_data / "train.json"),
                    str(synth_data / "sft.json"), LABELS)
    sft = run_sft(cfg, prep)
    res = run_rlvr(cfg, prep, init_ckpt=sft)
    assert len(res["history"]) == 2 and 0.0 <= res["eval"]["war"] <= 1.0 and "uar" in res["eval"]
    assert detect(res["final_model"]).name == "qwen2_5_omni"
    final = load_qwen_omni(res["final_model"], "float32")
    start = load_qwen_omni(qwen_ckpt, "float32")
    changed = [n for n, p in final.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert changed and all(n.startswith(("model.", "lm_head.")) for n in changed)  # the frozen towers stay


def test_evaluation_with_modality_attribution(local_ray, qwen_ckpt, synth_data, tmp_path, capsys):
    """launch.evaluate on the Qwen2.5-Omni checkpoint: WAR/UAR, and each example re-scored without its video
    (the audio then an item of its own) and without its audio."""
    import json

    from launch.evaluate import main

    cfg = tmp_path / "eval.yaml"
    cfg.write_text("rollout: {num_workers: 1, max_new_tokens: 6, num_cpus_per_worker: 0.5}\n"
                   f"train: {{output_dir: {tmp_path}}}\nwandb: {{mode: disabled}}\n")
    out = tmp_path / "report"
    assert main(["--config", str(cfg), "--ckpt", str(qwen_ckpt), "--data", str(synth_data / "sft.json"),
                 "--label-set", "dfew", "--out", str(out), "--attribution"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 8 and m["data_errors"] == 0 and 0.0 <= m["war"] <= 1.0 and 0.0 <= m["uar"] <= 1.0
    assert [a["label"] for a in m["attribution"]][-1] == "ALL"
    preds = json.loads((out / "predictions.json").read_text())
    assert all(p["error"] is None for p in preds)
    assert "WAR" in capsys.readouterr().out
