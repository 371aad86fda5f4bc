"""Bad input is caught before Ray starts, in one line: missing checkpoints and data, relative paths inside a
Ray job, an output dir that already holds a run."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from launch.preflight import RAY_JOB_ENV, preflight
from r1omni_ray.config import ConfigError, config_from_dict
from r1omni_ray.tracking import truncate_step_log

ROOT = Path(__file__).resolve().parents[2]


def cfg(out: Path, **data):
    return config_from_dict({"train": {"output_dir": str(out)}, "data": data, "wandb": {"mode": "disabled"}})


def test_missing_inputs_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"--init-ckpt='/nonexistent': does not exist"):
        preflight(cfg(tmp_path / "out"), init_ckpt="/nonexistent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"--init-ckpt=.*empty': has no config.json"):
        preflight(cfg(tmp_path / "out"), init_ckpt=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"data.train_path='/no/train.json': no such file"):
        preflight(cfg(tmp_path / "out", train_path="/no/train.json"))
    assert not ray.is_initialized()


def test_relative_paths_are_refused_inside_a_ray_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    preflight(cfg(Path("runs/x")))  # fine outside a job: relative to where you are
    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    with pytest.raises(ConfigError, match=r"train.output_dir='runs/x' is relative: inside a Ray job"):
        preflight(cfg(Path("runs/x")))
    preflight(cfg(tmp_path / "abs"))


def test_an_output_dir_holding_a_run_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "data").mkdir()
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl, checkpoints\): use --resume"):
        preflight(cfg(out))
    preflight(cfg(out), resume=True)  # continuing it is fine, and touches nothing
    assert (out / "metrics.jsonl").exists()
    preflight(cfg(out), overwrite=True)
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    assert (out / "data").is_dir()  # inputs stay


def test_resume_drops_the_rows_logged_after_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 0, "sft/loss": 1}\n{"step": 5, "sft/loss": 0.5}\n{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    assert truncate_step_log(log, 2) == 1
    assert log.read_text().splitlines() == ['{"step": 0, "sft/loss": 1}', '{"step": 5, "sft/loss": 0.5}',
                                            '{"step": 1}', '{"step": 2}']


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--init-ckpt", "/nonexistent"], "error: --init-ckpt='/nonexistent': does not exist"),
        (["learner.lr=1e-5", "train.steps=-3"], "error: <defaults>: train.steps: -3 must be >= 1"),
        (["rollout.num_workers=0"], "error: rollout.num_workers: 0 must be >= 1 for RLVR"),
        (["data.train_path=/no/such.json"], "error: data.train_path='/no/such.json': no such file"),
    ],
)
def test_cli_errors_are_one_line_and_come_before_ray(tmp_path, args, needle):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "launch.train_rlvr", f"train.output_dir={tmp_path / 'o'}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert lines == [needle] or (len(lines) == 1 and lines[0].startswith(needle)), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stderr
    assert time.monotonic() - t0 < 60


def test_no_throw_away_init_model_when_a_checkpoint_is_given(tmp_path, tiny_ckpt):
    from launch.common import prepare

    c = config_from_dict({"train": {"output_dir": str(tmp_path)}, "data": {"synthetic": {"num_train": 2,
                          "num_eval": 1, "num_sft": 1}}})
    prep = prepare(c, init_ckpt=str(tiny_ckpt))
    assert prep.ckpt_dir == str(Path(tiny_ckpt).resolve()) and not (tmp_path / "init_model").exists()


def test_a_policy_family_the_checkpoint_is_not_is_refused_and_both_engines_serve_qwen(tmp_path):
    from r1omni_ray.tiny.qwen_omni import make_tiny_qwen_omni_checkpoint

    qwen = make_tiny_qwen_omni_checkpoint(tmp_path / "qwen", layout="thinker")
    c = cfg(tmp_path / "out")
    c.model.family = "humanomni"
    with pytest.raises(ConfigError, match=r"--init-ckpt=.*qwen': model.family='humanomni' but .* is a qwen2_5_omni"):
        preflight(c, init_ckpt=str(qwen))
    c.model.family, c.rollout.engine = "auto", "vllm"
    preflight(c, init_ckpt=str(qwen))
    c.model.family = "qwen2_5_omni"  # the tiny model of a named family, no checkpoint given
    preflight(c)
    assert not ray.is_initialized()
