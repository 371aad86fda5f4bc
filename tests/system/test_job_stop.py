"""Stopping a run (SIGTERM, what `ray job stop` sends) unwinds cleanly: one line, a non-zero exit, no
traceback, the actors and W&B run closed by the driver's own finally blocks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run_until_step_2(tmp_path, then, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """Start a small embedded run (``extra`` overrides), wait for its second step, call ``then(proc)``, and
    wait for the exit."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # an embedded, private local Ray
    log = tmp_path / "driver.log"
    args = [sys.executable, "-m", "launch.train_rlvr", "--config", "configs/tiny_cpu.yaml",
            f"train.output_dir={tmp_path / 'run'}", "train.steps=500", "train.prompts_per_step=2",
            "rollout.group_size=2", "rollout.max_new_tokens=6", "rollout.num_workers=1", "learner.num_learners=1",
            "data.synthetic.num_train=4", "data.synthetic.num_eval=2", "data.synthetic.num_sft=2",
            "wandb.mode=offline", *extra, "checkpoint.every=1"]
    with log.open("w") as f:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "step 2 |" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert "step 2 |" in log.read_text(), log.read_text()[-3000:]
        then(proc)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, log.read_text()


def test_a_dead_learner_ends_the_run_with_one_line_naming_it_and_the_resume_command(tmp_path):
    import psutil

    def kill_learner(proc: subprocess.Popen) -> None:
        learners = [p for p in psutil.process_iter(["cmdline"])
                    if any("ray::LearnerActor" in part for part in (p.info["cmdline"] or []))]
        assert learners, "no learner process found"
        for p in learners:
            p.kill()

    # No in-job restart left (learner.max_restarts=0; tests/system/test_elastic.py covers the restart).
    proc, text = _run_until_step_2(tmp_path, kill_learner, ("learner.max_restarts=0",))
    assert proc.returncode == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: learner-0 failed in "), errors
    assert "python -m launch.train_rlvr --config configs/tiny_cpu.yaml" in errors[0]
    assert errors[0].endswith("checkpoint.every=1 --resume"), errors[0]


def test_sigterm_stops_the_driver_with_one_line(tmp_path):
    proc, text = _run_until_step_2(tmp_path, lambda p: p.send_signal(signal.SIGTERM))
    assert proc.returncode == 130, text[-3000:]
    assert "stopped (SIGTERM)" in text and "Traceback" not in text, text[-3000:]


def test_an_actor_stopped_inside_a_finalizer_prints_no_traceback():
    """Ray stops an actor by raising SystemExit from its SIGTERM handler; landing in a finalizer (decord's
    VideoReader.__del__ once, in the SIGTERM test above) Python would print "Exception ignored ... Traceback"
    into the job's log. setup_process's hook drops exactly that case, and reports every other one."""
    code = (
        "import sys\n"
        "from actors.common import setup_process\n"
        "setup_process(1)\n"
        "class Stopped:\n"
        "    def __del__(self):\n"
        "        raise SystemExit(1)\n"
        "class Broken:\n"
        "    def __del__(self):\n"
        "        raise ValueError('a real bug in a finalizer')\n"
        "Stopped()\n"
        "Broken()\n"
        "print('alive')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "alive", out.stderr[-2000:]
    assert "SystemExit" not in out.stderr
    assert "ValueError: a real bug in a finalizer" in out.stderr and "Traceback" in out.stderr
