"""Helpers of the vLLM test modules (CPU engine, system, GPU): which vLLM build is installed, and a real
weight update into a VLLMEngine."""

from __future__ import annotations

import threading

import torch

from actors.common import free_port

LOGPROB_ATOL = 1e-4  # fp32 on both sides; different kernels (vLLM's CPU attention vs SDPA)


def vllm_platform() -> str:
    """"cpu" or "cuda" for the installed vLLM build; "missing" without one (the suite's install has it, so a
    missing vllm fails the tests that need it instead of skipping them)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return "missing"
    return current_platform.device_type


def push_weights(engine, named: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> int:
    """A real weight update: a learner-side sender and the engine's ranks (the actor's own and one per vLLM
    worker) in one gloo broadcast group. Returns the number of buckets sent."""
    from r1omni_ray.weight_sync import (
        BroadcastGroup,
        param_metas,
        plan_buckets,
        receive_buckets,
        send_buckets,
    )

    metas = param_metas(named)
    buckets = plan_buckets(metas, bucket_bytes)
    port, world_size = free_port(), 2 + engine.extra_sync_ranks()
    box: dict = {}

    def learner() -> None:
        g = BroadcastGroup("gloo", "127.0.0.1", port, 0, world_size, 120, name="learner")
        send_buckets(g, metas, buckets, lambda idx: [named[i][1].cpu() for i in idx], "cpu")

    t = threading.Thread(target=learner)
    t.start()
    engine.join_sync(lambda: box.setdefault("g", BroadcastGroup("gloo", "127.0.0.1", port, 1, world_size, 120,
                                                                name="actor")),
                     "gloo", "127.0.0.1", port, 2, world_size, 120)
    engine.receive(lambda: receive_buckets(box["g"], metas, buckets, engine.load_weights, "cpu"), metas, buckets)
    t.join()
    return len(buckets)
