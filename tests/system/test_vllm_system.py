"""RLVR with `rollout.engine=vllm` through the real system: Ray rollout actors running vLLM's CPU build,
two DeepSpeed ZeRO-2 learners, the reward actor, weight broadcasts into the vLLM worker processes, the
asynchronous schedule (train.max_staleness=2: up to two rollouts queued, corrected), and a rollout worker
killed mid-run."""

from __future__ import annotations

import os
import signal
import statistics
import threading
from pathlib import Path
from typing import Any

import ray
import torch

from actors.groups import RLVRGroups
from launch.train_rlvr import RLVRTrainer
from r1omni_ray.config import config_from_dict
from r1omni_ray.data.records import load_records
from r1omni_ray.engines.base import SamplingParams
from r1omni_ray.model.loading import load_policy
from r1omni_ray.tracking import RunLogger
from tests.vllm_support import LOGPROB_ATOL, VLLM_CPU_MARKS

pytestmark = VLLM_CPU_MARKS

LABELS = ["happy", "sad", "angry", "neutral"]
G = 8
STEPS = 16
KILL_AT = 6  # worker 0 is killed once this many steps are done (its queued rollouts are in flight)


def vllm_cfg(out: Path):
    return config_from_dict({
        "rollout": {"engine": "vllm", "num_workers": 2, "group_size": G, "max_new_tokens": 8,
                    "num_cpus_per_worker": 0.5, "max_model_len": 256, "kv_cache_gib": 0.25},
        "learner": {"num_learners": 2, "zero_stage": 2, "lr": 3e-2, "micro_batch_size": 16,
                    "num_cpus_per_learner": 0.5, "dist_timeout_s": 300},
        "reward": {"num_actors": 1, "num_cpus_per_actor": 0.1, "modules": ["tests.fault_rewards"],
                   "rewards": [{"name": "test_letter_e"}]},
        "grpo": {"beta": 0.0},
        "train": {"steps": STEPS, "prompts_per_step": 4, "output_dir": str(out), "log_samples": 0,
                  "max_staleness": 2},
        "wandb": {"mode": "disabled"},
    })


def kill_when(trainer: RLVRTrainer, groups: RLVRGroups, step: int, box: dict[str, Any]) -> threading.Thread:
    """SIGKILL rollout worker 0 (its actor process; vLLM's engine processes lose their parent) as soon as
    ``step`` steps are done."""

    def run() -> None:
        while trainer.step < step:
            threading.Event().wait(0.05)
        info = ray.get(groups.rollout.workers[0].info.remote())
        box["pid"] = info["pid"]
        os.kill(info["pid"], signal.SIGKILL)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def assert_greedy_logprobs_are_the_learners(worker, policy, records) -> None:
    """The worker's greedy samples carry vLLM's log-probs; the learners' teacher-forced forward under
    ``policy`` gives the same on the same tokens."""
    items = list(enumerate(records))
    params = SamplingParams(greedy=True, max_new_tokens=8, logprobs=True)
    samples, *media = ray.get(worker.rollout.options(num_returns=1 + len(items)).remote(items, params))
    inputs = [s.inputs.with_media(m) for s, m in zip(samples, media, strict=True)]
    comps = [s.completions[0].token_ids for s in samples]
    with torch.no_grad():
        lp, _, _ = policy.completion_logprobs(inputs, list(range(len(inputs))), comps)
    for k, s in enumerate(samples):
        torch.testing.assert_close(torch.tensor(s.completions[0].logprobs), lp[k, : len(comps[k])],
                                   atol=LOGPROB_ATOL, rtol=0)


def reward_ends(hist: list[dict[str, Any]], k: int) -> tuple[float, float]:
    """The mean test reward of the first k steps and of the last k."""
    first = statistics.fmean(h["reward/test_letter_e_mean"] for h in hist[:k])
    return first, statistics.fmean(h["reward/test_letter_e_mean"] for h in hist[-k:])


def test_rlvr_with_vllm_learns_survives_a_killed_worker_and_resyncs_it(local_ray, tiny_ckpt, synth_data, tmp_path):
    cfg = vllm_cfg(tmp_path)
    records = load_records(synth_data / "train.json", label_set=LABELS).records
    groups = RLVRGroups.build(cfg, str(tiny_ckpt), LABELS)
    try:
        infos = ray.get([w.info.remote() for w in groups.rollout.workers])
        assert [i["engine"] for i in infos] == ["VLLMEngine", "VLLMEngine"]
        trainer = RLVRTrainer(cfg, groups, records, None, LABELS, RunLogger(tmp_path, cfg.wandb, {}))
        box: dict[str, Any] = {}
        killer = kill_when(trainer, groups, KILL_AT, box)
        hist = trainer.fit()
        killer.join(timeout=1)
        assert len(hist) == STEPS and "pid" in box

        # Every step trained on all its samples; overlapped steps were off-policy, weighted by the learners'
        # current log-probs over vLLM's own sampling ones (no recompute pass).
        assert all(h["samples"] == 4 * G for h in hist)
        assert all(h["learner/corrected_step"] == 1.0 and h["learner/recomputed_old_logprobs"] == 0.0 for h in hist)
        assert max(h["offpolicy/mismatch_kl"] for h in hist) > 0
        assert groups.rollout.restarts == 1
        # Up to two rollouts queued: vLLM takes each update between two generate calls.
        assert 1.0 <= max(h["weight_version_lag"] for h in hist) <= 2.0
        # The replacement is a vLLM worker holding the learners' final weights: its own log-probs (greedy)
        # equal the learners' teacher-forced ones on the same tokens.
        info = ray.get(groups.rollout.workers[0].info.remote())
        assert info["pid"] != box["pid"] and info["engine"] == "VLLMEngine"
        assert info["version"] == groups.sync.version == STEPS
        policy = load_policy(str(tiny_ckpt))
        missing, unexpected = policy.load_state_dict(groups.learners.full_states()[0], strict=False)
        assert not unexpected
        for w in groups.rollout.workers:
            assert_greedy_logprobs_are_the_learners(w, policy, records[:3])
        # Reward rises (the mean of the last quarter against the first).
        first, last = reward_ends(hist, STEPS // 4)
        assert last > first + 0.05, [round(h["reward/test_letter_e_mean"], 3) for h in hist]

    finally:
        groups.shutdown()


QWEN_STEPS = 10


def test_qwen_omni_rlvr_with_vllm_rollouts_trains_off_policy_and_vllm_holds_the_learners_weights(
        local_ray, synth_data, tmp_path):
    """The Qwen2.5-Omni thinker with vLLM rollouts (engines/vllm_mrope_lm.py) through the same system: ZeRO-3
    learners on shipped tower outputs, one step of staleness corrected with vLLM's own sampling log-probs, and at
    the end vLLM's greedy log-probs equal the learners' teacher-forced ones under the trained weights."""
    from r1omni_ray.model.qwen_omni import load_qwen_omni
    from r1omni_ray.tiny.qwen_omni import make_tiny_qwen_omni_checkpoint
    from r1omni_ray.tiny.synthetic import SYNTHETIC_VOCAB_TEXTS

    ckpt = make_tiny_qwen_omni_checkpoint(tmp_path / "qwen", tuple(SYNTHETIC_VOCAB_TEXTS))
    cfg = vllm_cfg(tmp_path / "run")
    cfg.model.family = "qwen2_5_omni"
    cfg.rollout.num_workers, cfg.rollout.max_model_len = 1, 512
    cfg.learner.zero_stage = 3
    cfg.train.steps, cfg.train.max_staleness = QWEN_STEPS, 1
    records = load_records(synth_data / "train.json", label_set=LABELS).records
    groups = RLVRGroups.build(cfg, str(ckpt), LABELS)
    try:
        assert [ray.get(w.info.remote())["engine"] for w in groups.rollout.workers] == ["VLLMEngine"]
        hist = RLVRTrainer(cfg, groups, records, None, LABELS, RunLogger(tmp_path, cfg.wandb, {})).fit()
        assert len(hist) == QWEN_STEPS and all(h["samples"] == 4 * G for h in hist)
        assert all(h["learner/corrected_step"] == 1.0 and h["learner/recomputed_old_logprobs"] == 0.0 for h in hist)
        assert max(h["weight_version_lag"] for h in hist) == 1.0
        assert not any(m.name.startswith(("visual.", "audio_tower.")) for m in groups.sync.metas)  # frozen towers

        policy = load_qwen_omni(ckpt, "float32")
        _, unexpected = policy.load_state_dict(groups.learners.full_states()[0], strict=False)
        assert not unexpected and ray.get(groups.rollout.workers[0].info.remote())["version"] == QWEN_STEPS
        assert_greedy_logprobs_are_the_learners(groups.rollout.workers[0], policy, records[:3])
        first, last = reward_ends(hist, QWEN_STEPS // 3)
        assert last > first, [round(h["reward/test_letter_e_mean"], 3) for h in hist]
    finally:
        groups.shutdown()
