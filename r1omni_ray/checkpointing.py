"""Checkpoint bookkeeping (pure filesystem logic; the Ray/DeepSpeed side lives in the driver).

Layout under a run's output dir::

    <out>/checkpoints/step_N/        one complete checkpoint
        state.json                   DriverState (step, seed, weight version, W&B run id, ...)
        deepspeed/step_N/...         every learner's DeepSpeed state (engine.save_checkpoint)
        hf/                          optional HF-format export (written at the end of a run)
    <out>/checkpoints/step_N.tmp/    a checkpoint being written (never read; pruned)
    <out>/checkpoints/latest         text file naming the newest complete step dir

A checkpoint is written into ``step_N.tmp`` and renamed to ``step_N`` only when complete, then the
``latest`` pointer is atomically replaced, so a crash at any point leaves either the previous or the
new checkpoint as ``latest`` — never a half-written one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "state.json"
DEEPSPEED_SUBDIR = "deepspeed"
HF_SUBDIR = "hf"
_STEP_RE = re.compile(r"^step_(\d+)$")


@dataclass
class DriverState:
    """What the driver needs besides the learners' DeepSpeed state to continue a run exactly."""

    step: int  # completed RLVR steps; the next step to run
    seed: int  # train.seed: data order and sampling seeds are pure functions of (seed, step)
    weight_version: int  # the version the rollout workers must hold after resume
    prompts_per_step: int
    num_records: int
    init_ckpt: str  # HF checkpoint the learners (and the frozen reference) were built from
    wandb_run_id: str | None = None
    wandb_step: int = 0  # W&B's monotonic step counter, so a resumed run keeps logging forward
    deepspeed_tag: str = ""
    weights_checksum: list[list[float]] = field(default_factory=list)  # per learner rank
    # train.stream_groups: the prompt stream's positions ahead of the learners (drawn again on resume)
    pipeline: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DriverState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def checkpoints_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINTS


def step_name(step: int) -> str:
    return f"step_{step}"


def step_dir(out_dir: str | os.PathLike, step: int) -> Path:
    return checkpoints_root(out_dir) / step_name(step)


def tmp_step_dir(out_dir: str | os.PathLike, step: int) -> Path:
    return checkpoints_root(out_dir) / f"{step_name(step)}.tmp"


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable; not every filesystem allows opening a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write to a temp file in the same dir, fsync, then os.replace: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def begin_checkpoint(out_dir: str | os.PathLike, step: int) -> Path:
    """A fresh, empty ``step_N.tmp`` (a leftover from a crashed attempt is discarded)."""
    tmp = tmp_step_dir(out_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(out_dir: str | os.PathLike, step: int, state: DriverState) -> Path:
    """Write state.json into ``step_N.tmp``, rename it to ``step_N``, then point ``latest`` at it."""
    tmp = tmp_step_dir(out_dir, step)
    if not tmp.is_dir():
        raise FileNotFoundError(f"{tmp}: begin_checkpoint first")
    write_text_atomic(tmp / STATE_FILE, state.to_json())
    final = step_dir(out_dir, step)
    if final.exists():  # same step written again (e.g. the end-of-run save after a periodic one)
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)
    write_text_atomic(checkpoints_root(out_dir) / LATEST, final.name + "\n")
    return final


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (a ``step_N`` dir with a state.json), oldest first."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The dir ``latest`` names; if the pointer is missing or stale, the newest complete checkpoint."""
    root = checkpoints_root(out_dir)
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        cand = root / name
        if _STEP_RE.match(name) and (cand / STATE_FILE).is_file():
            return cand
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def read_state(ckpt_dir: str | os.PathLike) -> DriverState:
    path = Path(ckpt_dir) / STATE_FILE
    try:
        return DriverState.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path}: not a readable checkpoint state ({e})") from e


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest`` names)
    and any leftover ``.tmp``/``.old`` dirs. keep_last <= 0 keeps everything. Returns what was removed."""
    root = checkpoints_root(out_dir)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        if p.is_dir() and (p.name.endswith(".tmp") or p.name.endswith(".old")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if keep_last <= 0:
        return removed
    latest = latest_checkpoint(out_dir)
    for _step, p in list_checkpoints(out_dir)[:-keep_last]:
        if latest is not None and p.resolve() == latest.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """An HF-format model dir from what a user points at: the model dir itself, a checkpoint dir with an
    ``hf/`` export, or a run output dir (its latest checkpoint's ``hf/``, else its ``final_model``)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / HF_SUBDIR / "config.json").is_file():
        return p / HF_SUBDIR
    latest = latest_checkpoint(p)
    if latest is not None and (latest / HF_SUBDIR / "config.json").is_file():
        return latest / HF_SUBDIR
    if (p / "final_model" / "config.json").is_file():
        return p / "final_model"
    hint = " (a DeepSpeed-only checkpoint: export one with a finished run, which writes hf/)" if (
        p / STATE_FILE).is_file() else ""
    raise FileNotFoundError(f"{p}: no HF-format model found (config.json, hf/, checkpoints/latest or final_model){hint}")


def link_or_copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Replace dst with a copy of src made of hard links where the filesystem allows (no extra disk for
    a multi-GB export), plain copies otherwise. Built beside dst, then renamed into place."""
    src, dst = Path(src), Path(dst)

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=link)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst
