"""Placement groups for the role groups: one bundle per actor, waited for with a deadline that names what
the run asked for and what the cluster has."""

from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from r1omni_ray.config import ConfigError, RunConfig


def bundles(n: int, cpus: float, gpus: float, node_resource: str | None = None) -> list[dict[str, float]]:
    b: dict[str, float] = {"CPU": cpus}
    if gpus > 0:
        b["GPU"] = gpus
    if node_resource:
        b[node_resource] = 0.001
    return [dict(b) for _ in range(n)]


def required_cpus(cfg: RunConfig) -> float:
    return (cfg.learner.num_learners * cfg.learner.num_cpus_per_learner
            + cfg.rollout.num_workers * cfg.rollout.num_cpus_per_worker
            + cfg.reward.num_actors * cfg.reward.num_cpus_per_actor)


def rollout_gpus_per_worker(cfg: RunConfig, cluster_gpus: float | None = None) -> float:
    """rollout.num_gpus_per_worker, or by default: for vLLM one per tensor-parallel rank on a cluster with
    GPUs and none on a CPU-only one (vLLM's CPU build), none for HF. cluster_gpus: the cluster's GPU
    total (read from Ray when not given)."""
    rc = cfg.rollout
    if rc.num_gpus_per_worker is not None:
        return rc.num_gpus_per_worker
    if rc.engine != "vllm":
        return 0.0
    if cluster_gpus is None:
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
    return float(rc.tensor_parallel_size) if cluster_gpus > 0 else 0.0


class PlacementError(ConfigError):
    """A role group's actors cannot be scheduled on this cluster: the run stops at start, naming the ask."""


class CapacityError(PlacementError):
    """Mid-run, fewer rollout workers than rollout.min_workers and no room for more in time: the driver
    stops with a checkpoint to resume from."""


def create_placement_group(bundle_list: list[dict[str, float]], cfg: RunConfig, role: str) -> Any:
    """A placement group for one role's actors, ready, or a PlacementError within ray.placement_timeout_s:
    an actor that can never be scheduled must fail the run at start, not leave a call waiting forever."""
    pg = placement_group(bundle_list, strategy=cfg.ray.placement_strategy)
    try:
        ray.get(pg.ready(), timeout=cfg.ray.placement_timeout_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        raise unschedulable(cfg, role, len(bundle_list), bundle_list[0], cfg.ray.placement_timeout_s,
                            "ray.placement_timeout_s") from None
    return pg


def cluster_resources(free: bool) -> dict[str, float]:
    """The cluster's total (or free) resources, without Ray's per-node markers."""
    res = ray.available_resources() if free else ray.cluster_resources()
    return {k: round(v, 3) for k, v in res.items() if not k.startswith("node:")}


def unschedulable(cfg: RunConfig, role: str, n: int, bundle: dict[str, float], waited_s: float,
                  knob: str) -> PlacementError:
    return PlacementError(
        f"{role}: {n} x {bundle} not schedulable within {waited_s:g}s ({knob}); the whole run asks for "
        f"{required_cpus(cfg):g} CPUs; cluster has {cluster_resources(False)}, free {cluster_resources(True)}")


def shortfall(bundle: dict[str, float], n: int) -> str | None:
    """Why ``n`` more bundles do not fit the cluster's free resources now (summed over nodes), or None."""
    free = cluster_resources(True)
    for k, v in bundle.items():
        if free.get(k, 0.0) + 1e-9 < n * v:
            return f"the cluster has {free.get(k, 0.0):g} free {k}; {n} more need {n * v:g}"
    return None


def request_capacity(bundle_list: list[dict[str, float]]) -> None:
    """Ask Ray's autoscaler for room for all these bundles at once (its request replaces the previous one):
    pending placement groups are demand already, this makes it immediate. A no-op without an autoscaler."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundle_list)


def in_bundle(pg: Any, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)


def release(actors: list[Any], pg: Any | None) -> None:
    """A role group's shutdown: kill its actors, then free their placement group."""
    for a in actors:
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001 - already dead
            pass
    if pg is not None:
        try:
            remove_placement_group(pg)
        except Exception:  # noqa: BLE001 - already gone with the cluster
            pass


@ray.remote(num_cpus=0)
def _address_in_bundle(n_ports: int, port_range: list[int] | None) -> tuple[str, list[int]]:
    from actors.common import free_ports

    return ray.util.get_node_ip_address(), free_ports(n_ports, port_range)


def address_of_bundle(pg: Any, index: int, n_ports: int = 0,
                      port_range: list[int] | None = None) -> tuple[str, list[int]]:
    """(node IP, free ports) of the node that holds a bundle: ports are chosen where they will be bound."""
    task = _address_in_bundle.options(scheduling_strategy=in_bundle(pg, index), num_cpus=0)
    return ray.get(task.remote(n_ports, port_range))


def actor_options(cfg: RunConfig, **options: Any) -> dict[str, Any]:
    """Ray options of a learner or rollout actor: its resources and placement, plus the run's environment
    (ray.network_interface), which Ray merges into the job's."""
    env = cfg.ray.actor_env()
    return options | ({"runtime_env": {"env_vars": env}} if env else {})
