"""A running job's scale channel: a named Ray actor that the driver owns (it ends with the job), through
which ``python -m launch.scale`` asks for a number of rollout workers. The driver takes the requests at step
boundaries, applies them to its RolloutGroup, and answers each with the state applied or the reason it
could not."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from r1omni_ray.config import ConfigError, RunConfig

if TYPE_CHECKING:
    from actors.rollout_group import RolloutGroup

log = logging.getLogger("r1omni_ray")
NAMESPACE = "r1omni_ray"  # every run's channel, whatever namespace its job runs in


class ScaleRefused(ValueError):
    """A resize that cannot be applied; the message is the one-line answer the scale command prints."""


def run_name(cfg: RunConfig) -> str:
    """What ``launch.scale --run`` names a run by: wandb.run_name, else train.output_dir's last part."""
    return cfg.wandb.run_name or Path(cfg.train.output_dir).resolve().name


def channel_name(run: str) -> str:
    return f"scale:{run}"


@ray.remote(num_cpus=0)
class ScaleControl:
    def __init__(self) -> None:
        self._queue: list[tuple[int, int]] = []
        self._answers: dict[int, tuple[bool, str]] = {}
        self._state: dict[str, Any] = {}
        self._next = 0

    def request(self, rollout_workers: int) -> int:
        self._next += 1
        self._queue.append((self._next, rollout_workers))
        return self._next

    def take(self) -> list[tuple[int, int]]:
        out, self._queue = self._queue, []
        return out

    def answer(self, rid: int, ok: bool, text: str) -> None:
        self._answers[rid] = (ok, text)

    def result(self, rid: int) -> tuple[bool, str] | None:
        return self._answers.get(rid)

    def publish(self, state: dict[str, Any]) -> None:
        self._state = state

    def state(self) -> dict[str, Any]:
        return self._state


class ScaleChannel:
    """The driver's side: creates the named actor and serves its requests."""

    def __init__(self, cfg: RunConfig) -> None:
        self.run = run_name(cfg)
        name = channel_name(self.run)
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            pass
        else:
            raise ConfigError(f"wandb.run_name: a live run named {self.run!r} already has a scale channel on this "
                              "cluster; give this run another name")
        self.actor = ScaleControl.options(name=name, namespace=NAMESPACE).remote()
        log.info("scale this run's rollout workers with: python -m launch.scale --address <ray address> --run %s "
                 "--rollout-workers N", self.run)

    def serve(self, rollout: RolloutGroup, step: int) -> None:
        """Apply the queued requests (in order) and publish the group's state; never raises for a bad one."""
        for rid, n in ray.get(self.actor.take.remote()):
            try:
                text, ok = rollout.resize(n), True
                log.info("scale request %d: %s", rid, text)
            except ScaleRefused as e:
                text, ok = f"refused: {e}", False
                log.warning("scale request %d for %d rollout workers %s", rid, n, text)
            self.actor.answer.remote(rid, ok, text)
        self.actor.publish.remote(rollout.state() | {"step": step})

    def shutdown(self) -> None:
        try:
            ray.kill(self.actor)
        except Exception:  # noqa: BLE001 - gone with the cluster
            pass
