"""Calling actors of a role group: named failures, waiting for a batch of calls, and the one
replace-and-retry loop every group uses when a rollout worker dies mid-call."""

from __future__ import annotations

import io
import logging
import pickle
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import ray

log = logging.getLogger("r1omni_ray")

Call = tuple[str, str, Any]  # (actor name, method, object ref)


class ActorCallError(RuntimeError):
    """A call on a group's actor failed (the actor died, raised, or timed out in a collective); names it."""

    def __init__(self, actor: str, method: str, cause: BaseException) -> None:
        self.actor, self.method = actor, method
        inner = getattr(cause, "cause", None) or cause  # RayTaskError wraps the actor-side exception
        self.cause = inner
        super().__init__(f"{actor}.{method} failed: {type(inner).__name__}: {inner}")


def settle(calls: Sequence[Call]) -> list[Any]:
    """Wait for every call; results in order, with exceptions as values."""
    out: list[Any] = []
    for _name, _method, ref in calls:
        try:
            out.append(ray.get(ref))
        except Exception as e:  # noqa: BLE001 - classified by the caller
            out.append(e)
    return out


def raise_first_error(calls: Sequence[Call], results: Sequence[Any]) -> None:
    for (name, method, _ref), r in zip(calls, results, strict=True):
        if isinstance(r, Exception):
            raise ActorCallError(name, method, r) from r


def wait_named(calls: Sequence[Call]) -> list[Any]:
    """Results of (actor name, method, ref) calls; the first failure to arrive is raised at once as an
    ActorCallError naming its actor (its peers may be stuck in a collective until their timeout). The peers'
    calls are still collected, in the background: they are expected to fail once one rank is gone, and an
    error never fetched would reach the job log as Ray's "Unhandled error" traceback, reading like a crash
    after a failure the run recovers from."""
    by_ref = {ref: (name, method) for name, method, ref in calls}
    remaining = list(by_ref)
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=1)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as e:
                name, method = by_ref[ref]
                consume_in_background([r for r in remaining + ready if r is not ref],
                                      f"the peers of {name}.{method}")
                raise ActorCallError(name, method, e) from e
    return ray.get([ref for _n, _m, ref in calls])


def consume_in_background(refs: Sequence[Any], what: str) -> None:
    """Fetch ``refs`` on a daemon thread, their errors logged at debug level only (see wait_named)."""
    if not refs:
        return

    def consume() -> None:
        for ref in refs:
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - expected after a peer failed
                log.debug("%s: %s after the failure (expected)", what, type(e).__name__)

    threading.Thread(target=consume, name="consume-peer-calls", daemon=True).start()


class Attempt(NamedTuple):
    """What one try of a call on the rollout workers came to."""

    done: bool  # finished (the result is final)
    dead: list[int]  # indices of workers that died during it (replaced before the next try)
    result: Any = None


def retry_replacing(attempt: Callable[[], Attempt], replace: Callable[[list[int]], None],
                    max_restarts: int, what: str) -> Any:
    """Run ``attempt`` until it is done, calling ``replace`` with the workers that died in between, at most
    ``max_restarts`` more times. The one retry loop of the rollout, broadcast and group set-up paths."""
    last: list[int] = []
    for n in range(max_restarts + 1):
        a = attempt()
        if a.done:
            return a.result
        last = a.dead
        if n == max_restarts:
            break
        if a.dead:
            log.warning("rollout workers %s died during %s; dropping them", a.dead, what)
        replace(a.dead)  # may be empty: the caller still re-issues what the try lost
    raise ActorCallError("rollout-workers", what, RuntimeError(
        f"workers {last} kept dying after rollout.max_restarts={max_restarts} replacements"))


class _RefsAsIds(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.binary() if isinstance(obj, ray.ObjectRef) else None


def wire_bytes(obj: Any) -> int:
    """Serialized size of ``obj`` with every ObjectRef counted as its id: what passing it by value costs."""
    buf = io.BytesIO()
    _RefsAsIds(buf, protocol=5).dump(obj)
    return buf.tell()
