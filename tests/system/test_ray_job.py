"""The documented cluster path: `ray start --head` + `ray job submit ... -- python -m launch.train_rlvr`,
with Ray token authentication on and the dashboard bound to 127.0.0.1, on a 2-CPU head (every actor of
configs/tiny_cpu.yaml must fit, reward actors included)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # the server answered (e.g. 401 without a token): it is up
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


def test_ray_job_submit_runs_rlvr_end_to_end(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    gcs, dash, agent, agent_grpc, metrics = (_port() for _ in range(5))
    # --block keeps the head in our process group, so tearing it down never touches other Ray instances.
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
        out = tmp_path / "run"
        cmd = [
            str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
            "--", sys.executable, "-m", "launch.train_rlvr", "--config", "configs/tiny_cpu.yaml",
            "train.steps=2", "train.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=12",
            "data.synthetic.num_train=8", "data.synthetic.num_eval=4", "data.synthetic.num_sft=4",
            f"train.output_dir={out}", "wandb.mode=disabled",
        ]
        for _ in range(60):  # the dashboard answers before its job agent is up
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            log = r.stdout + r.stderr
            if "No available agent" not in log:
                break
            time.sleep(2)
        assert r.returncode == 0, log[-5000:]
        assert "succeeded" in log
        assert "final model:" in log
        assert (out / "final_model" / "model.safetensors").is_file()
        assert (out / "metrics.jsonl").read_text().count('"step"') >= 2
        # Quiet logs: no per-actor DeepSpeed banners, no progress bars in a job's (non-TTY) log.
        for noise in ("Setting accelerator to CPU", "built successfully", "Writing model shards", "Loading weights"):
            assert noise not in log, noise
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
