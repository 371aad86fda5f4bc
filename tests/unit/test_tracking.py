"""Run logging: the driver's per-step metrics and sample table reach metrics.jsonl and an offline W&B run
(read back from its .wandb file); secrets never do; progress bars stay quiet without a TTY."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from actors.rollout import PromptSamples
from actors.rollout_group import PendingRollout
from launch.train_rlvr import RLVRTrainer
from r1omni_ray.config import WandbConfig, config_from_dict
from r1omni_ray.data.records import OmniRecord
from r1omni_ray.engines.base import Completion
from r1omni_ray.rewards import RewardSpec, score_completions
from r1omni_ray.tracking import RunLogger, progress, read_offline_run, redact

# What the driver must log every step (issue #5).
REQUIRED = [
    "reward/total_mean", "reward/accuracy_mean", "reward/format_mean", "accuracy", "format_rate",
    "reward/group_std_mean", "reward/zero_std_group_frac", "adv/mean", "adv/std", "adv/min", "adv/max",
    "learner/kl", "learner/policy_loss", "learner/clip_frac", "learner/entropy", "learner/grad_norm", "learner/lr",
    "response/length_mean", "response/length_max", "response/clipped_frac",
    "time/rollout", "time/reward", "time/logprob", "time/update", "time/broadcast", "time/step",
    "throughput/tokens_per_s", "throughput/samples_per_s", "weight_version", "weight_version_lag",
    # counters, on every row (issue #15)
    "faults/worker_restarts", "faults/reissued_prompts", "faults/reward_actor_restarts", "faults/learner_restarts",
    # rollout membership (issue #23)
    "rollout/num_workers", "rollout/pending_workers", "rollout/target_workers", "rollout/joined", "rollout/left",
    "rollout/lost",
    "data/skipped_records", "data/skipped_at_load", "data/skipped_steps", "data/known_bad_records", "reward/errors",
]
LEARNER_OUT = {"loss": 0.1, "policy_loss": 0.08, "kl_loss": 0.02, "kl": 0.5, "clip_frac": 0.1, "entropy": 2.0,
               "grad_norm": 0.7, "lr": 1e-5, "approx_kl": 0.01}
GOOD = "<think>bright red and a high voice</think> <answer>happy</answer>"


class FakeRollout:
    def __init__(self):
        self.workers, self.restarts, self.reissued = [None], 0, 0
        self.version = 0

    def submit(self, items, params, use_video=True, use_audio=True, next_items=None):
        return [PendingRollout(0, items, None, [])]

    def collect(self, pending, params, use_video=True, use_audio=True):
        samples = []
        for uid, rec in pending[0][1]:
            comps = [Completion([5] * (3 + j), GOOD if j % 2 == 0 else "sad", "stop" if j else "length")
                     for j in range(params.n)]
            inputs = SimpleNamespace(label=rec.label, solution=rec.solution, prompt_ids=[1, 2])
            samples.append(PromptSamples(uid, rec.id, inputs, comps, weight_version=self.version, worker=0))
        return samples

    def at_boundary(self):
        return False

    def leaving(self):
        return False

    def metrics(self):
        return {f"rollout/{k}": 0.0 for k in ("pending_workers", "joined", "left", "lost")} | {
            "rollout/num_workers": 1.0, "rollout/target_workers": 1.0}


class FakeRewards:
    restarts = 0

    def score(self, texts, sols):
        return score_completions(texts, sols, [RewardSpec("accuracy", 1.0), RewardSpec("format", 1.0)])


class FakeLearners:
    def train(self, shards, spec):
        return dict(LEARNER_OUT, frozen_logprob_s=0.01, update_s=0.02)


class FakeSync:
    def __init__(self, rollout):
        self.version, self.rollout = 0, rollout

    def broadcast(self, version):
        self.version = self.rollout.version = version
        return {"broadcast_wall_s": 0.01}

    def byte_metrics(self):
        return {"broadcast/sent_bytes": 1e6, "broadcast/actor_bytes": 1e6}


class FakeGroups:
    """Just enough of RLVRGroups for RLVRTrainer: completions alternate right/wrong within each prompt."""

    def __init__(self):
        self.rollout, self.rewards, self.learners = FakeRollout(), FakeRewards(), FakeLearners()
        self.sync = FakeSync(self.rollout)


def offline_run_dir(out: Path) -> Path:
    (d,) = sorted((out / "wandb").glob("offline-run-*"))
    return d


def test_driver_metrics_and_samples_table_reach_wandb_and_jsonl(tmp_path):
    cfg = config_from_dict({
        "rollout": {"group_size": 4, "max_new_tokens": 8},
        "learner": {"num_learners": 2, "micro_batch_size": 4},
        "train": {"steps": 2, "prompts_per_step": 2, "output_dir": str(tmp_path), "log_samples": 2},
        "wandb": {"mode": "offline", "project": "r1omni-test", "run_name": "tiny", "tags": ["ci"]},
    })
    records = [OmniRecord(f"r{i}", None, None, "q", "happy", "<answer>happy</answer>") for i in range(4)]
    logger = RunLogger(tmp_path, cfg.wandb, cfg.to_dict())
    trainer = RLVRTrainer(cfg, FakeGroups(), records, None, ["happy", "sad"], logger)
    history = trainer.fit()
    run_id = logger.run_id
    logger.finish()

    assert len(history) == 2 and history[-1]["weight_version"] == 2.0
    assert history[0]["accuracy"] == 0.5 and history[0]["reward/zero_std_group_frac"] == 0.0
    assert set(trainer.batches) == {0, 1} and all(len(v) == 2 for v in trainer.batches.values())

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for key in REQUIRED:
        assert key in lines[0], key

    run = read_offline_run(offline_run_dir(tmp_path))
    assert run["id"] == run_id and run["project"] == "r1omni-test" and run["name"] == "tiny"
    assert run["config"]["train"]["steps"] == 2 and run["config"]["rollout"]["group_size"] == 4
    metric_rows = [h for h in run["history"] if "reward/total_mean" in h]
    assert len(metric_rows) == 2
    for key in REQUIRED:
        assert key in metric_rows[0], key
    assert metric_rows[1]["learner/entropy"] == pytest.approx(2.0)
    steps = [h["_step"] for h in run["history"]]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # W&B's step only moves forward

    # One W&B step per training step: the sample table rides in the metrics row.
    assert len(run["history"]) == 2 and all("completions" in h for h in run["history"])
    tables = [h["completions"] for h in run["history"] if "completions" in h]
    assert len(tables) == 2 and tables[0]["_type"] == "table-file"
    table_file = sorted((offline_run_dir(tmp_path) / "files").rglob("completions_*.table.json"))[0]
    table = json.loads(table_file.read_text())
    assert table["columns"][:6] == ["id", "label", "prediction", "reasoning", "completion", "reward"]
    row = dict(zip(table["columns"], table["data"][0], strict=True))
    assert row["reasoning"] == "bright red and a high voice" and row["prediction"] == "happy"
    assert row["accuracy"] == 1.0 and row["format"] == 1.0
    assert (tmp_path / "completions.jsonl").is_file()


def test_api_key_never_written_or_printed(tmp_path, monkeypatch, capfd):
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    cfg = {"wandb": {"api_key": secret}, "train": {"steps": 1}}
    logger = RunLogger(tmp_path, WandbConfig(mode="offline"), cfg)
    logger.log({"x": 1.0}, step=1)
    logger.finish()
    out, err = capfd.readouterr()
    assert secret not in out + err
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    config = read_offline_run(offline_run_dir(tmp_path))["config"]
    assert config.get("wandb", {}).get("api_key") == "<redacted>", config


def test_resumed_logger_keeps_run_id_and_step_counter(tmp_path):
    first = RunLogger(tmp_path, WandbConfig(mode="offline"), {})
    first.log({"x": 1.0}, step=1)
    run_id, step = first.run_id, first.wandb_step
    first.finish()
    again = RunLogger(tmp_path, WandbConfig(mode="offline"), {}, resume_id=run_id, wandb_step=step)
    again.log({"x": 2.0}, step=2)
    assert again.run_id == run_id
    again.finish()
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(runs) == 2
    assert [h["_step"] for h in read_offline_run(runs[1])["history"]] == [1]


def test_reader_stops_at_a_torn_tail_while_wandb_still_writes(tmp_path):
    """wandb-core flushes the .wandb log in pieces: a read can meet a chunk cut short or not yet
    filled in. The records before it are read; the run is not yet finished; nothing raises."""
    logger = RunLogger(tmp_path / "run", WandbConfig(mode="offline"), {"a": 1})
    for step, x in enumerate([1.5, 2.5, 3333.25], start=1):
        logger.log({"x": x}, step=step)
    logger.finish()
    full_dir = offline_run_dir(tmp_path / "run")
    (wandb_file,) = full_dir.glob("run-*.wandb")
    full = read_offline_run(full_dir)
    assert full["finished"] and [h["x"] for h in full["history"]] == [1.5, 2.5, 3333.25]

    data = wandb_file.read_bytes()
    torn = tmp_path / "torn"
    torn.mkdir()
    # The last history row's value, cut in the middle and then with one byte flipped in place.
    cut = data.rindex(b"3333.25") + 3
    for name, body in {"short": data[:cut], "flipped": data[:cut] + bytes([data[cut] ^ 0xFF]) + data[cut + 1:]}.items():
        d = torn / name
        d.mkdir()
        (d / wandb_file.name).write_bytes(body)
        out = read_offline_run(d, wait_s=0.0)
        assert not out["finished"], name
        assert out["id"] == full["id"] and [h["x"] for h in out["history"]] == [1.5, 2.5], name


def test_disabled_logger_still_writes_jsonl(tmp_path):
    logger = RunLogger(tmp_path, WandbConfig(mode="disabled"), {})
    logger.log({"a": 1.0, "skip": [1, 2]}, step=3)
    logger.log_images({"img": tmp_path / "none.png"}, step=3)
    logger.summary({"a": 1})
    logger.finish()
    assert logger.run_id is None and not (tmp_path / "wandb").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "a": 1.0}


def test_redact_and_quiet_progress():
    assert redact({"a": {"API_KEY": "s", "n": [{"password": "p"}]}, "max_new_tokens": 3}) == {
        "a": {"API_KEY": "<redacted>", "n": [{"password": "<redacted>"}]}, "max_new_tokens": 3}
    bar = progress(range(3), desc="x")  # pytest's stderr is not a TTY
    assert bar.disable and list(bar) == [0, 1, 2]
