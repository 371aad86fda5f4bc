"""Reading a data split for an entry point: records, with what was skipped at load logged and counted
(data.on_error), before Ray starts."""

from __future__ import annotations

import logging
from typing import Any

from r1omni_ray.config import RunConfig
from r1omni_ray.data.records import load_records

log = logging.getLogger("r1omni_ray")


def load_split_counted(path: str | None, labels: list[str], cfg: RunConfig) -> tuple[list[Any] | None, int]:
    """(records, how many were skipped at load time: malformed lines, unknown labels, missing files)."""
    if path is None:
        return None, 0
    res = load_records(path, root=cfg.data.root, label_set=labels, on_error=cfg.data.on_error)
    for idx, reason in res.skipped:
        log.warning("%s: skipped record %d: %s", path, idx, reason)
    return res.records, len(res.skipped)


def load_split(path: str | None, labels: list[str], cfg: RunConfig) -> list[Any] | None:
    return load_split_counted(path, labels, cfg)[0]
