"""Checkpoint + resume on real Ray + DeepSpeed (CPU): a 2-step run checkpointing every step, resumed to
step 3, against an uninterrupted 3-step run: same records per step, same weight version, the loaded
learner weights are the saved ones, and the W&B run continues under the same id."""

import json
from pathlib import Path

import pytest

from launch.common import Prepared
from launch.train_rlvr import run_rlvr
from r1omni_ray.checkpointing import latest_checkpoint, list_checkpoints, read_state
from r1omni_ray.config import config_from_dict

LABELS = ["happy", "sad", "angry", "neutral"]
pytestmark = pytest.mark.slow


def cfg_for(out: Path, ckpt: Path, steps: int, wandb: str):
    return config_from_dict({
        "model": {"path": str(ckpt)},
        "rollout": {"num_workers": 1, "group_size": 2, "max_new_tokens": 6, "num_cpus_per_worker": 0.5},
        # A reward that varies within a group on a random model, so every step really updates the weights.
        "reward": {"num_actors": 0, "modules": ["tests.fault_rewards"],
                   "rewards": [{"name": "test_parity", "weight": 1.0}]},
        "learner": {"num_learners": 2, "zero_stage": 2, "lr": 1e-3, "micro_batch_size": 4,
                    "num_cpus_per_learner": 0.5, "dist_timeout_s": 120},
        "train": {"steps": steps, "prompts_per_step": 2, "output_dir": str(out), "log_samples": 1},
        "checkpoint": {"every": 1, "keep_last": 2},
        "wandb": {"mode": wandb},
    })


def test_resume_matches_uninterrupted_run(local_ray, tiny_ckpt, synth_data, tmp_path):
    prep = Prepared(str(tiny_ckpt), str(synth_data / "train.json"), None, None, LABELS)
    a, b = tmp_path / "interrupted", tmp_path / "straight"

    first = run_rlvr(cfg_for(a, tiny_ckpt, 2, "offline"), prep)
    assert [s for s, _ in list_checkpoints(a)] == [1, 2]
    s1, s2 = read_state(a / "checkpoints" / "step_1"), read_state(a / "checkpoints" / "step_2")
    assert (s2.step, s2.weight_version, s2.wandb_run_id) == (2, 2, first["wandb_run_id"])
    assert (a / "checkpoints" / "step_2" / "hf" / "config.json").is_file()  # end-of-run export
    from transformers import AutoTokenizer

    gen = json.loads((a / "checkpoints" / "step_2" / "hf" / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)  # the export stops on the tokenizer's eos, pads with its pad
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (tok.eos_token_id, tok.pad_token_id)
    assert not (a / "checkpoints" / "step_1" / "hf").exists()
    assert s1.weights_checksum != s2.weights_checksum  # the weights did move between checkpoints

    # As if the interrupted driver had logged a step after its last checkpoint: the resume replays it.
    with (a / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "weight_version": 3.0, "reward/total_mean": 9.9}) + "\n")
    resumed = run_rlvr(cfg_for(a, tiny_ckpt, 3, "offline"), prep, resume=True)
    assert resumed["resumed_from"] == str(a / "checkpoints" / "step_2")
    check = resumed["resume_check"]
    assert check["loaded"] == check["saved"] == s2.weights_checksum
    assert resumed["wandb_run_id"] == first["wandb_run_id"]
    assert len(sorted((a / "wandb").glob(f"offline-run-*{first['wandb_run_id']}*"))) == 2
    # keep_last=2: step_1 pruned, latest is step_3
    assert [s for s, _ in list_checkpoints(a)] == [2, 3]
    assert latest_checkpoint(a) == a / "checkpoints" / "step_3"

    straight = run_rlvr(cfg_for(b, tiny_ckpt, 3, "disabled"), prep)
    assert {**first["batches"], **resumed["batches"]} == straight["batches"]
    assert sorted(straight["batches"]) == [0, 1, 2]
    assert resumed["weight_version"] == straight["weight_version"] == 3
    assert read_state(latest_checkpoint(a)).weight_version == read_state(latest_checkpoint(b)).weight_version == 3
    assert [h["step"] for h in resumed["history"]] == [3.0]
    assert resumed["history"][0]["weight_version_lag"] == 0.0  # workers held version 2 when sampling step 3
    # metrics.jsonl continues across the resume
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["reward/total_mean"] != 9.9  # no step twice


def test_resume_at_max_staleness_two_redraws_the_queued_rollouts_from_the_checkpoint(local_ray, tiny_ckpt, synth_data,
                                                                                      tmp_path):
    """train.max_staleness=2: the rollouts queued ahead at the checkpoint are not in it; the resumed run draws
    those steps' prompts (the same ones: data order is a pure function of (seed, step)) from the checkpoint's
    weights, so its first step is on-policy, and every step stays within the bound."""
    from r1omni_ray.data.records import load_records
    from r1omni_ray.data.sampler import batch_indices

    prep = Prepared(str(tiny_ckpt), str(synth_data / "train.json"), None, None, LABELS)
    out = tmp_path / "k2"

    def cfg(steps: int):
        c = cfg_for(out, tiny_ckpt, steps, "disabled")
        c.train.max_staleness = 2
        return c

    first = run_rlvr(cfg(3), prep)
    assert max(h["staleness/max"] for h in first["history"]) >= 1  # the first run really ran ahead
    resumed = run_rlvr(cfg(5), prep, resume=True)
    assert [h["step"] for h in resumed["history"]] == [4.0, 5.0] and resumed["weight_version"] == 5
    assert resumed["history"][0]["staleness/max"] == 0.0  # drawn by the checkpoint's weights
    assert all(h["staleness/max"] <= 2 and h["learner/corrected_step"] == 1.0 for h in resumed["history"])
    records = load_records(synth_data / "train.json").records
    want = {s: [records[i].id for i in batch_indices(len(records), 2, s, 0)] for s in range(5)}
    assert {**first["batches"], **resumed["batches"]} == want
