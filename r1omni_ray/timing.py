"""One timer for the named phases of a driver step (rollout, reward, train, broadcast, ...).

The driver and the benchmarks read the same numbers, so a benchmark never re-implements the step to time it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseTimer:
    """Wall seconds per phase name, accumulated until :meth:`reset`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def reset(self) -> dict[str, float]:
        """The phases timed since the last reset (as ``time/<phase>``), and a fresh start."""
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        self.seconds = {}
        return out
