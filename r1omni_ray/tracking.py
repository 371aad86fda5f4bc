"""Run logging: a metrics.jsonl next to the run, Weights & Biases, and quiet progress bars.

W&B mode "auto" goes online only when WANDB_API_KEY is set, else offline. An offline run lives in
``<wandb.dir or output_dir>/wandb/offline-run-<time>-<id>/``; upload it later with::

    wandb sync <output_dir>/wandb/offline-run-*        # or: wandb sync --sync-all (inside that dir)

A resumed run (``--resume``) re-opens the same run id, so both offline dirs sync into one W&B run.
The API key is only ever read by wandb itself from the environment: nothing here logs or prints it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import sys
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("r1omni_ray")

# Config keys that must never reach W&B or the console, whatever a user put into the YAML.
_SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|auth[_-]?token)", re.IGNORECASE)


def resolve_wandb_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def redact(obj: Any) -> Any:
    """A copy of a (nested) config with secret-looking keys' values replaced."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if isinstance(k, str) and _SECRET_KEY.search(k) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def progress(iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "", **kw: Any) -> Any:
    """A tqdm bar on an interactive terminal; disabled when stderr is not a TTY (log files, Ray jobs,
    CI) so logs get no carriage-return noise."""
    from tqdm.auto import tqdm

    kw.setdefault("disable", not sys.stderr.isatty())
    kw.setdefault("mininterval", 1.0)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("leave", False)
    return tqdm(iterable, total=total, desc=desc, **kw)


def truncate_step_log(path: Path, step: int) -> int:
    """Drop the training rows after ``step`` from a JSON-lines log (metrics.jsonl, completions.jsonl): a run
    resumed from the checkpoint at ``step`` logs those steps again. SFT rows (keys ``sft/...``) stay.
    Returns the number of rows dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("step", 0) > step and not any(k.startswith("sft/") for k in row):
            dropped += 1
        else:
            keep.append(line)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    tmp.replace(path)
    return dropped


class RunLogger:
    def __init__(self, out_dir: str | Path, wandb_cfg: Any, run_config: dict[str, Any], job_type: str = "rlvr",
                 resume_id: str | None = None, wandb_step: int = 0) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        self.run = None
        # W&B needs a monotonically increasing step; SFT, RLVR and eval share one run, so W&B gets a
        # running counter and each record carries its own logical step ("step", "sft/step"). A resumed
        # run continues the saved counter, or W&B would drop every row up to the old last step.
        self._wandb_step = wandb_step
        self.mode = resolve_wandb_mode(wandb_cfg.mode)
        if self.mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=wandb_cfg.project, name=wandb_cfg.run_name, config=redact(run_config), mode=self.mode,
                dir=str(Path(wandb_cfg.dir) if wandb_cfg.dir else self.out), job_type=job_type,
                tags=list(wandb_cfg.tags), id=resume_id, resume="allow" if resume_id else None,
                settings=wandb.Settings(console="off", silent=True),
            )
            if self.mode == "offline":
                log.info("W&B offline run in %s; upload later with `wandb sync %s`", self.run_dir, self.run_dir)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    @property
    def run_dir(self) -> Path | None:
        """The run's own dir (offline-run-*/run-*), parent of its files/ dir."""
        return Path(self.run.dir).parent if self.run is not None else None

    @property
    def wandb_step(self) -> int:
        return self._wandb_step

    def _wandb_log(self, payload: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(payload, step=self._wandb_step)
            self._wandb_step += 1

    def log(self, metrics: dict[str, Any], step: int,
            tables: dict[str, tuple[list[str], list[list[Any]]]] | None = None) -> None:
        """One row: scalars to metrics.jsonl, tables to <key>.jsonl, and all of it as ONE W&B step."""
        clean = {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)}
        record = {"step": step, **clean}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        payload = {**metrics, "step": step}
        for key, (columns, rows) in (tables or {}).items():
            payload |= self._table(key, columns, rows, step)
        self._wandb_log(payload)

    def _table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> dict[str, Any]:
        with (self.out / f"{key.replace('/', '_')}.jsonl").open("a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **dict(zip(columns, r, strict=True))}, default=str) + "\n")
        if self.run is None:
            return {}
        import wandb

        return {key: wandb.Table(columns=columns, data=rows)}

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table on its own W&B step (evaluation reports)."""
        payload = self._table(key, columns, rows, step)
        if payload:
            self._wandb_log(payload | {"step": step})

    def log_images(self, images: dict[str, str | Path], step: int) -> None:
        """PNG files (confusion matrix, attribution plot) as W&B images."""
        if self.run is not None and images:
            import wandb

            self._wandb_log({k: wandb.Image(str(p)) for k, p in images.items()} | {"step": step})

    def summary(self, values: dict[str, Any]) -> None:
        """Final numbers (eval WAR/UAR, ...) in the run summary."""
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            try:
                run.finish()
            except Exception as e:  # noqa: BLE001 - e.g. its service already gone when a job is stopped
                log.warning("W&B run %s did not finish cleanly (%s: %s); its files stay in %s",
                            run.id, type(e).__name__, e, self.out)


# ---------------------------------------------------------------------------------------------
# Reading an offline run back (tests, and checking a run without network access)
# ---------------------------------------------------------------------------------------------

_LDB_BLOCK = 32768
_LDB_HEADER = 7  # crc32 (4) + length (2) + chunk type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_file_records(path: Path) -> list[bytes]:
    """Payloads of a .wandb transaction log: a 7-byte file header (":W&B", magic, version), then
    LevelDB-log style chunks in 32 KiB blocks, a record split FIRST/MIDDLE/LAST across blocks, each
    chunk checked by zlib.crc32(type byte + data). wandb-core may still be writing the file: the
    records end at the first chunk that is cut short or fails its checksum (a torn tail; the caller
    reads again until the exit record is there)."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a .wandb file")
    out: list[bytes] = []
    pos, buf = 7, b""
    while pos + _LDB_HEADER <= len(data):
        left = _LDB_BLOCK - pos % _LDB_BLOCK
        if left < _LDB_HEADER:  # block trailer padding
            pos += left
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos : pos + _LDB_HEADER])
        pos += _LDB_HEADER
        chunk = data[pos : pos + n]
        pos += n
        if len(chunk) < n or zlib.crc32(bytes([kind]) + chunk) != crc:
            break
        if kind in (_FULL, _FIRST):
            buf = chunk
        elif kind in (_MIDDLE, _LAST):
            buf += chunk
        else:
            continue
        if kind in (_FULL, _LAST):
            out.append(buf)
            buf = b""
    return out


def _put(d: dict[str, Any], path: list[str], value: Any) -> None:
    for k in path[:-1]:
        if not isinstance(d.get(k), dict):  # a later nested update supersedes a scalar
            d[k] = {}
        d = d[k]
    d[path[-1]] = value


def read_offline_run(run_dir: str | Path, wait_s: float = 30.0) -> dict[str, Any]:
    """{"id", "project", "name", "config", "history" (one dict per logged row), "summary", "finished"} of
    an offline run dir (the one holding run-<id>.wandb). wandb's service process may still be flushing
    the log after run.finish() returns: wait up to wait_s for its exit record."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        out = _read_offline_run_once(Path(run_dir))
        if out["finished"] or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _read_offline_run_once(run_dir: Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no run-*.wandb file")
    out: dict[str, Any] = {"id": None, "project": None, "name": None, "config": {}, "history": [], "summary": {},
                           "finished": False}
    for payload in _wandb_file_records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["project"], out["name"] = rec.run.run_id, rec.run.project, rec.run.display_name
            for item in rec.run.config.update:
                _put(out["config"], list(item.nested_key) or [item.key], json.loads(item.value_json))
        elif kind == "config":
            for item in rec.config.update:
                _put(out["config"], list(item.nested_key) or [item.key], json.loads(item.value_json))
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _put(row, list(item.nested_key) or [item.key], json.loads(item.value_json))
            out["history"].append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _put(out["summary"], list(item.nested_key) or [item.key], json.loads(item.value_json))
        elif kind == "exit":
            out["finished"] = True
    return out
