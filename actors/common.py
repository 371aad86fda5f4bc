"""Helpers shared by the Ray actors (process set-up)."""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

import torch


def name_cpu_accelerator() -> None:
    """Name DeepSpeed's accelerator on a machine without CUDA instead of letting it warn (on stdout), in every
    process that imports it, that it fell back to CPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _quiet_exit_in_finalizers(hook: Any = sys.unraisablehook) -> Any:
    """An unraisable-exception hook that drops SystemExit: Ray stops an actor by raising SystemExit from its
    SIGTERM handler in whatever runs then, and when that is a finalizer (decord's VideoReader.__del__, seen
    when a stopped job's workers were mid-rollout) Python prints "Exception ignored in ..." with a traceback
    into the job's log. The process is exiting as asked; anything else still goes to ``hook``."""

    def quiet(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            hook(unraisable)

    return quiet


def setup_process(torch_threads: int) -> None:
    sys.unraisablehook = _quiet_exit_in_finalizers()
    torch.set_num_threads(max(1, torch_threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    name_cpu_accelerator()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("deepspeed").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging only
        pass


def node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def gpu_ids() -> list[str]:
    """The GPUs Ray gave this actor (empty without one): where its collectives run."""
    import ray

    return [str(x) for x in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int, port_range: tuple[int, int] | list[int] | None = None) -> list[int]:
    """``n`` distinct ports free on this node: any the OS offers, or the first free ones of ``port_range``
    (inclusive: the range a firewall leaves open between nodes). Call it on the node that will bind them."""
    held: list[socket.socket] = []
    try:
        candidates = iter([0] * n) if port_range is None else iter(range(port_range[0], port_range[1] + 1))
        for port in candidates:
            s = socket.socket()
            try:
                s.bind(("", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            if len(held) == n:
                return [h.getsockname()[1] for h in held]
        raise RuntimeError(f"cluster.port_range {list(port_range or [])}: fewer than {n} free ports on "
                           f"{node_ip()} (found {len(held)})")
    finally:
        for h in held:
            h.close()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
