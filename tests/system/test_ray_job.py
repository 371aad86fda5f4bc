"""The documented cluster path: `ray start --head` + `ray job submit ... -- python -m launch.train_rlvr`,
with Ray token authentication on and the dashboard bound to 127.0.0.1, on a 2-CPU head (every actor of
configs/tiny_cpu.yaml must fit, reward actors included)."""

import json
import os
import re
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
JOB_STEPS = 120  # at >= 0.8 s a step while paced: 90 s of room for the commands (they take ~25 s)


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


@pytest.fixture(scope="module")
def head():
    """A token-authenticated Ray head (2 CPUs, dashboard on 127.0.0.1): (env, GCS port, dashboard port)."""
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    gcs, dash, agent, agent_grpc, metrics = (_port() for _ in range(5))
    # --block keeps the head in our process group, so tearing it down never touches other Ray instances.
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
        yield env, gcs, dash
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _submit(env: dict[str, str], dash: int, args: list[str], no_wait: bool = False,
            job_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
           *(["--no-wait"] if no_wait else []),
           *(["--runtime-env-json", json.dumps({"env_vars": job_env})] if job_env else []), "--", sys.executable, "-m", "launch.train_rlvr",
           "--config", "configs/tiny_cpu.yaml", *args]
    for _ in range(60):  # the dashboard answers before its job agent is up
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in r.stdout + r.stderr:
            return r
        time.sleep(2)
    return r


def test_ray_job_submit_runs_rlvr_end_to_end(head, tmp_path):
    env, _gcs, dash = head
    out = tmp_path / "run"
    r = _submit(env, dash, [
        "train.steps=2", "train.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=12",
        "data.synthetic.num_train=8", "data.synthetic.num_eval=4", "data.synthetic.num_sft=4",
        f"train.output_dir={out}", "wandb.mode=disabled",
    ])
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-5000:]
    assert "succeeded" in log
    assert "final model:" in log
    assert (out / "final_model" / "model.safetensors").is_file()
    assert (out / "metrics.jsonl").read_text().count('"step"') >= 2
    # Quiet logs: no per-actor DeepSpeed banners, no progress bars in a job's (non-TTY) log.
    for noise in ("Setting accelerator to CPU", "built successfully", "Writing model shards", "Loading weights"):
        assert noise not in log, noise


def _scale(env: dict[str, str], gcs: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.scale", "--address", f"127.0.0.1:{gcs}", "--run", "scaled",
                           *args], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_scale_command_grows_and_shrinks_a_submitted_job(head, tmp_path):
    """`python -m launch.scale` from another process, while a `ray job submit` run trains: 1 -> 2 workers (the
    second joins once loaded), a request beyond the free CPUs is refused with one line and changes nothing,
    2 -> 1; the job then ends normally, every step with all its samples."""
    env, gcs, dash = head
    out = tmp_path / "scaled"
    pace = tmp_path / "pace"  # while it exists, every step takes >= 0.8 s (tests/fault_rewards.py: test_paced)
    pace.touch()
    r = _submit(env, dash, [
        f"train.steps={JOB_STEPS}", "train.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=8",
        "reward.modules=[tests.fault_rewards]",
        "reward.rewards=[{name: accuracy}, {name: format}, {name: test_paced, weight: 0.0}]",
        "rollout.num_workers=1", "rollout.min_workers=1", "rollout.max_workers=3",
        "data.synthetic.num_train=8", "data.synthetic.num_eval=2", "data.synthetic.num_sft=4", "sft.epochs=1",
        f"train.output_dir={out}", "wandb.mode=disabled",
    ], no_wait=True, job_env={"R1OMNI_TEST_PACE_FILE": str(pace)})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    job = re.search(r"raysubmit_\w+", r.stdout + r.stderr).group(0)
    deadline = time.monotonic() + 600
    while (st := _scale(env, gcs)).returncode != 0:  # the channel exists once the driver's groups are up
        assert time.monotonic() < deadline, st.stderr[-2000:]
        time.sleep(2)

    grow = _scale(env, gcs, "--rollout-workers", "2", "--wait-joined")
    assert grow.returncode == 0 and "target 2" in grow.stdout and "joined" in grow.stdout, grow.stdout + grow.stderr
    # Learners 2 x 0.5, reward 0.1 and two workers x 0.45: the 2-CPU head is full.
    refused = _scale(env, gcs, "--rollout-workers", "3")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: refused: the cluster has 0 free CPU; 1 more need 0.45")
    assert "'target': 2, 'active': 2" in _scale(env, gcs).stdout  # nothing changed
    shrink = _scale(env, gcs, "--rollout-workers", "1", "--wait-joined")
    assert shrink.returncode == 0 and "target 1" in shrink.stdout, shrink.stdout + shrink.stderr
    pace.unlink()  # the rest of the run at full speed

    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", f"http://127.0.0.1:{dash}", "--follow", job],
                          env=env, capture_output=True, text=True, timeout=900)
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", f"http://127.0.0.1:{dash}", job],
                            env=env, capture_output=True, text=True, timeout=120)
    assert "succeeded" in (status.stdout + status.stderr).lower(), logs.stdout[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"samples"' in x]
    assert len(rows) == JOB_STEPS and all(r["samples"] == 16 for r in rows)
    seq = [int(r["rollout/num_workers"]) for r in rows]
    changes = [seq[0]] + [b for a, b in zip(seq, seq[1:], strict=False) if a != b]
    assert changes == [1, 2, 1], seq
    assert sum(r["rollout/joined"] for r in rows) == 1 and sum(r["rollout/left"] for r in rows) == 1
