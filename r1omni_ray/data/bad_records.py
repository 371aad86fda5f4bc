"""Records whose media failed to decode, remembered for the run: a bad clip is named and counted once, never
decoded (or warned about) again, and listed with its reason in ``<output_dir>/skipped_records.jsonl``, one JSON
object per line: {"record", "phase", "step", "reason"}. The file is appended as records are found, so it
survives a crash, and read back by ``--resume``."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("r1omni_ray")

FILE_NAME = "skipped_records.jsonl"


class BadRecords:
    def __init__(self, path: str | Path | None = None, phase: str = "rlvr", resume_step: int | None = None) -> None:
        """path: the run's list (None: remembered in memory only). A fresh run drops the file's entries of its
        own ``phase`` (another stage's, e.g. SFT's before RLVR, stay); a resumed one keeps those found up to
        ``resume_step``: the steps after it are replayed, and find (and count) their bad records again."""
        self.path = None if path is None else Path(path)
        self.phase = phase
        self.reasons: dict[str, str] = {}
        self.lock = threading.Lock()
        if self.path is None:
            return
        kept = []
        for entry in self._read():
            own = entry.get("phase") == phase
            if own and resume_step is not None and (entry.get("step") or 0) <= resume_step:
                self.reasons[str(entry["record"])] = str(entry.get("reason", ""))
            if not own or (resume_step is not None and (entry.get("step") or 0) <= resume_step):
                kept.append(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
        tmp.replace(self.path)
        if self.reasons:
            log.info("--resume: %d records known not to decode (%s) are left out", len(self.reasons), self.path)

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d: not JSON (a write cut short?); ignored", self.path, n)
                continue
            if isinstance(entry, dict) and "record" in entry:
                out.append(entry)
        return out

    def __contains__(self, record_id: object) -> bool:
        return record_id in self.reasons

    def __len__(self) -> int:
        return len(self.reasons)

    def add(self, record_id: str, reason: str, step: int | None = None) -> bool:
        """Remember a record that failed to decode; True the first time (name and count it then)."""
        with self.lock:
            if record_id in self.reasons:
                return False
            self.reasons[record_id] = reason
            if self.path is not None:
                with self.path.open("a") as f:
                    f.write(json.dumps({"record": record_id, "phase": self.phase, "step": step, "reason": reason})
                            + "\n")
            return True

    def add_all(self, found: Iterable[tuple[str, str]], step: int | None = None) -> list[str]:
        """The record ids among ``found`` (id, reason) seen here for the first time."""
        return [rid for rid, reason in found if self.add(rid, reason, step)]
