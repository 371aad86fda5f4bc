"""How far a starting actor has got in loading, readable by the driver while the actor's __init__ still runs
(Ray answers no method call until then). A 7B rollout worker loads 17 GB, exports its LM, and vLLM loads,
profiles, compiles and captures CUDA graphs: several minutes is normal, and when it is too many the driver
names the phase that holds it. The record lives in Ray's key-value store (the GCS), so it reads the same from
any node."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import ray


def _key(name: str) -> bytes:
    return f"r1omni-load:{ray.get_runtime_context().get_job_id()}:{name}".encode()


class LoadProgress:
    """The actor's side: ``with progress.phase("vLLM engine"): ...`` for each phase of its start."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.done: dict[str, float] = {}  # phase -> seconds, in order

    def _put(self, current: str | None) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        record = {"phase": current, "since": time.time(), "done": self.done}
        with contextlib.suppress(Exception):  # progress is a report: it never fails a start
            _internal_kv_put(_key(self.name), json.dumps(record).encode(), overwrite=True)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._put(name)
        t0 = time.perf_counter()
        yield
        self.done[name] = round(time.perf_counter() - t0, 1)
        self._put(None)

    def callback(self):
        """phase(name) as a plain function for library code that has no Ray: each call ends the previous
        phase it started and begins the next (None ends the last)."""
        stack = contextlib.ExitStack()

        def on_phase(name: str | None) -> None:
            stack.close()
            if name is not None:
                stack.enter_context(self.phase(name))

        return on_phase


def read(name: str) -> dict[str, Any] | None:
    """The actor's last record: {"phase": current or None, "since": unix time, "done": {phase: seconds}}."""
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        raw = _internal_kv_get(_key(name))
    except Exception:  # noqa: BLE001 - the report is best effort
        return None
    return json.loads(raw) if raw else None


def forget(name: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    with contextlib.suppress(Exception):
        _internal_kv_del(_key(name))


def describe(record: dict[str, Any] | None, now: float | None = None) -> str:
    """One line: the phase under way and for how long, after the ones done."""
    if not record:
        return "no progress reported yet (the actor's process has not started loading)"
    done = ", ".join(f"{k} {v:.0f} s" for k, v in record.get("done", {}).items())
    parts = []
    if record.get("phase"):
        parts.append(f"in '{record['phase']}' for {(now or time.time()) - record['since']:.0f} s")
    if done:
        parts.append(f"after {done}")
    return "; ".join(parts) or "loaded"
