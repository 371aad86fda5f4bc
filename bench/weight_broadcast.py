"""Weight broadcast: seconds and GB/s to push a model from a learner to N receiver processes.

This process plays the learner (rank 0 of an r1omni_ray.weight_broadcast.BroadcastGroup, gloo) and holds the
model as synthetic parameters with the shapes of a Qwen2 language model: Qwen2.5-0.5B in bf16 (`0.5b`),
Qwen2.5-1.5B (`1.5b`), or the GRPO benchmark's tiny Qwen2 in fp32 (`tiny`, the CPU learners' dtype).
N receivers are spawned processes (rank 1..N) that receive with receive_buckets and copy every tensor
into their own preallocated parameters, as a rollout worker's engine does (--apply none skips that).

Each transfer is timed on the sender from a barrier to a barrier after the last receiver is done, with
send_buckets packing `--bucket-mb` buckets (0 = one collective per tensor). The same run measures the
machine's memcpy bandwidth (a torch copy of a large tensor, fresh `clone` and preallocated `copy_`) as
the limit: a same-host broadcast copies every byte at least once per receiver.

Output: one JSON line with the memcpy figures, then one per (model, receivers, bucket size).

Then (or alone, with --estimate-only) the GPU-cluster figures that this machine cannot measure, for the
0.5B and 7B configs: the bytes each rank receives per update, from the real route plan over the model
built on the meta device (weight_sync.plan_routes), and a time estimate from link speeds given as flags:
- this layout (NCCL; ZeRO-3 gathers each bucket while the previous one is on the wire): learner-0 sends the
  LM once into the ENGINES group and the front end once into ACTORS; a pipelined NCCL broadcast costs about
  bytes / link bandwidth whatever the number of receivers, so
      t = max(gather, send) + one bucket's gather,  gather = B_total (N-1)/N / nvlink,
      send = (B_engines + B_actors) / inter_node
- the layout before it (gloo with CPU staging, both the actor and its vLLM worker receive everything):
      t = B_total / pcie (device to host) + B_total * ceil(log2(R + 1)) / tcp  (a binomial tree from
      learner-0 over R = workers x (1 + TP) ranks) + gather
The link speeds are assumptions (flags), not measurements.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from bench.common import (
    QWEN25_05B,
    QWEN25_15B,
    Qwen2Dims,
    add_tiny_lm_flags,
    emit,
    machine_info,
    median,
    parse_float_list,
    parse_int_list,
    rounded,
    tiny_lm_from_flags,
    tiny_vocab_size,
)
from r1omni_ray.weight_broadcast import BroadcastGroup, ParamMeta, plan_buckets, receive_buckets, send_buckets

HOST = "127.0.0.1"


def model_spec(name: str, tiny: Qwen2Dims) -> tuple[Qwen2Dims, torch.dtype]:
    if name == "0.5b":
        return QWEN25_05B, torch.bfloat16
    if name == "1.5b":
        return QWEN25_15B, torch.bfloat16
    if name == "tiny":
        return tiny, torch.float32
    raise SystemExit(f"unknown model {name!r}: tiny, 0.5b or 1.5b")


def metas_for(dims: Qwen2Dims, dtype: torch.dtype) -> list[ParamMeta]:
    dt = str(dtype).removeprefix("torch.")
    return [ParamMeta(n, shape, dt) for n, shape in dims.param_shapes()]


def allocate(metas: Sequence[ParamMeta]) -> dict[str, torch.Tensor]:
    """Parameters with every page touched (an untouched torch.empty would charge page faults to the
    first transfer)."""
    out = {}
    for m in metas:
        t = torch.empty(m.shape, dtype=m.torch_dtype)
        t.fill_(0.5)
        out[m.name] = t
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _barrier(group: BroadcastGroup) -> None:
    t = torch.zeros(1)
    group.pg.allreduce([t]).wait(group.timeout)


def _receiver(rank: int, world: int, port: int, dims: Qwen2Dims, dtype: torch.dtype, buckets_mb: list[float],
              warmup: int, repeats: int, threads: int, apply: str, timeout_s: float, q: Any) -> None:
    try:
        torch.set_num_threads(threads)
        metas = metas_for(dims, dtype)
        params = allocate(metas) if apply == "copy" else {}

        def apply_fn(pairs: list[tuple[str, torch.Tensor]]) -> None:
            if apply == "copy":
                for name, t in pairs:
                    params[name].copy_(t)

        group = BroadcastGroup("gloo", HOST, port, rank, world, timeout_s, name=f"receiver-{rank}")
        for mb in buckets_mb:
            buckets = plan_buckets(metas, int(mb * 2**20))
            for _ in range(warmup + repeats):
                _barrier(group)
                receive_buckets(group, metas, buckets, apply_fn)
                _barrier(group)
        q.put((rank, "ok"))
    except Exception as e:  # reported to the sender, which fails loudly
        q.put((rank, f"{type(e).__name__}: {e}"))


def run_config(dims: Qwen2Dims, dtype: torch.dtype, params: dict[str, torch.Tensor], receivers: int,
               buckets_mb: list[float], warmup: int, repeats: int, threads: int, apply: str,
               timeout_s: float) -> dict[float, list[float]]:
    """Spawn the receivers once, run every bucket size; returns bucket_mb -> sender-side seconds."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    world = receivers + 1
    procs = [
        ctx.Process(target=_receiver, args=(r, world, port, dims, dtype, buckets_mb, warmup, repeats, threads,
                                            apply, timeout_s, q), daemon=True)
        for r in range(1, world)
    ]
    for p in procs:
        p.start()
    times: dict[float, list[float]] = {}
    try:
        metas = metas_for(dims, dtype)
        names = [m.name for m in metas]
        group = BroadcastGroup("gloo", HOST, port, 0, world, timeout_s, name="learner-0")

        def get_tensors(idx: Sequence[int]) -> list[torch.Tensor]:
            return [params[names[i]] for i in idx]

        for mb in buckets_mb:
            buckets = plan_buckets(metas, int(mb * 2**20))
            ts = []
            for i in range(warmup + repeats):
                _barrier(group)
                t0 = time.perf_counter()
                send_buckets(group, metas, buckets, get_tensors)
                _barrier(group)
                if i >= warmup:
                    ts.append(time.perf_counter() - t0)
            times[mb] = ts
        status = dict(q.get(timeout=timeout_s) for _ in procs)
        bad = {r: s for r, s in status.items() if s != "ok"}
        if bad:
            raise RuntimeError(f"receivers failed: {bad}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return times


def update_estimate(b_total: int, b_engines: int, b_actors: int, bucket: int, learners: int, workers: int, tp: int,
                    nvlink_gbps: float, inter_node_gbps: float, pcie_gbps: float, tcp_gbps: float) -> dict[str, float]:
    """Seconds per update (see the module docstring); bandwidths in GB/s."""
    gb = 1e9
    gather = b_total * (learners - 1) / learners / (nvlink_gbps * gb)
    send = (b_engines + b_actors) / (inter_node_gbps * gb)
    first_bucket = min(bucket, b_total) * (learners - 1) / learners / (nvlink_gbps * gb)
    ranks = workers * (1 + tp)
    old = b_total / (pcie_gbps * gb) + b_total * math.ceil(math.log2(ranks + 1)) / (tcp_gbps * gb) + gather
    return {"gather_s": gather, "send_s": send, "pipelined_s": max(gather, send) + first_bucket,
            "serial_s": gather + send, "before_gloo_staged_s": old}


def estimate_lines(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench.memory_model import ROOT, trainable_metas
    from r1omni_ray.config import load_config
    from r1omni_ray.engines.base import sync_destinations
    from r1omni_ray.weight_broadcast import ACTORS, ENGINES, plan_routes, route_bytes

    out = []
    for size, name in (("0.5b", "r1omni_0.5b_rlvr.yaml"), ("7b", "humanomni_7b_rlvr.yaml")):
        cfg = load_config(ROOT / "configs" / name)
        metas = trainable_metas(size, cfg)
        bucket = int(cfg.learner.broadcast_bucket_mb * 2**20)
        routes = plan_routes(metas, bucket, lambda n, e=cfg.rollout.engine: sync_destinations(n, e))
        got = route_bytes(metas, routes)
        total = sum(m.nbytes for m in metas)
        rc, lc = cfg.rollout, cfg.learner
        est = update_estimate(total, got.get(ENGINES, 0), got.get(ACTORS, 0), bucket, lc.num_learners,
                              rc.num_workers, rc.tensor_parallel_size, args.nvlink_gbps, args.inter_node_gbps,
                              args.pcie_gbps, args.tcp_gbps)
        out.append({
            "bench": "weight_broadcast", "kind": "gpu_cluster_estimate", "model": size, "config": name,
            "learners": lc.num_learners, "rollout_workers": rc.num_workers, "tensor_parallel_size": rc.tensor_parallel_size,
            "bytes_trainable": total, "bytes_sent_by_learner0": got["sent"],
            "bytes_per_rollout_actor": got.get(ACTORS, 0), "bytes_per_vllm_worker": got.get(ENGINES, 0),
            "bytes_per_rollout_gpu_before": 2 * total, "collectives": len(routes),
            "links_gbps": {"nvlink": args.nvlink_gbps, "inter_node": args.inter_node_gbps, "pcie": args.pcie_gbps,
                           "tcp": args.tcp_gbps},
            "seconds": {k: rounded(v, 2) for k, v in est.items()},
        })
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,0.5b", help="comma-separated: tiny, 0.5b, 1.5b")
    p.add_argument("--receivers", default="1,2,4", help="comma-separated receiver counts")
    p.add_argument("--bucket-mb", default="64,16,0", help="comma-separated bucket sizes in MiB; 0 = one call per tensor")
    p.add_argument("--warmup", type=int, default=1, help="untimed transfers per configuration")
    p.add_argument("--repeats", type=int, default=3, help="timed transfers per configuration")
    p.add_argument("--small-repeats", type=int, default=20,
                   help="timed transfers per configuration for models under 100 MB (millisecond transfers)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every process (and for memcpy)")
    p.add_argument("--apply", choices=("copy", "none"), default="copy",
                   help="receivers copy into preallocated parameters (copy) or drop the buckets (none)")
    p.add_argument("--memcpy-mb", type=int, default=1024, help="size of the memcpy reference copy")
    p.add_argument("--timeout-s", type=float, default=300.0)
    add_tiny_lm_flags(p)
    p.add_argument("--vocab-size", type=int, default=0, help="tiny model vocab (0: the local tiny tokenizer's)")
    p.add_argument("--estimate-only", action="store_true", help="print only the GPU-cluster estimates")
    p.add_argument("--nvlink-gbps", type=float, default=150.0, help="estimate: ZeRO-3 all-gather bandwidth per GPU")
    p.add_argument("--inter-node-gbps", type=float, default=25.0, help="estimate: one GPU's NIC (200 Gb/s)")
    p.add_argument("--pcie-gbps", type=float, default=25.0, help="estimate: device-to-host copies")
    p.add_argument("--tcp-gbps", type=float, default=2.5, help="estimate: gloo over TCP, per stream")
    args = p.parse_args(argv)
    if args.estimate_only:
        for line in estimate_lines(args):
            emit(line)
        return 0

    from bench.common import memcpy_bandwidth

    torch.set_num_threads(max(1, args.threads))
    lm = tiny_lm_from_flags(args)
    tiny = Qwen2Dims(args.vocab_size or tiny_vocab_size(), lm.hidden_size, lm.intermediate_size, lm.num_layers,
                     lm.num_heads, lm.num_kv_heads, True)
    receivers = parse_int_list(args.receivers)
    buckets_mb = parse_float_list(args.bucket_mb)
    def measure_memcpy(when: str) -> dict[str, float]:
        mem = memcpy_bandwidth(args.memcpy_mb * 2**20)
        emit({"bench": "weight_broadcast", "kind": "memcpy", "when": when, "machine": machine_info(),
              "threads": args.threads, "memcpy_mb": args.memcpy_mb, "clone_gbps": rounded(mem["clone_gbps"]),
              "copy_gbps": rounded(mem["copy_gbps"])})
        return mem

    mem = measure_memcpy("start")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        dims, dtype = model_spec(name, tiny)
        metas = metas_for(dims, dtype)
        nbytes = sum(m.nbytes for m in metas)
        params = allocate(metas)
        repeats = args.repeats if nbytes >= 100 * 10**6 else max(args.repeats, args.small_repeats)
        try:
            for n in receivers:
                times = run_config(dims, dtype, params, n, buckets_mb, args.warmup, repeats, args.threads,
                                   args.apply, args.timeout_s)
                for mb, ts in times.items():
                    sec = median(ts)
                    gbps = nbytes / sec / 1e9
                    emit({
                        "bench": "weight_broadcast", "model": name, "dtype": str(dtype).removeprefix("torch."),
                        "params": dims.num_params(), "tensors": len(metas), "bytes": nbytes, "receivers": n,
                        "bucket_mb": mb, "collectives": len(plan_buckets(metas, int(mb * 2**20))),
                        "apply": args.apply, "repeats": repeats, "seconds_median": rounded(sec), "seconds_min": rounded(min(ts)),
                        "gbps": rounded(gbps), "aggregate_gbps": rounded(gbps * n),
                        "frac_of_memcpy_copy": rounded(gbps * n / mem["copy_gbps"], 3),
                    })
        finally:
            del params
    measure_memcpy("end")  # a second look: the machine may be shared, the start figure is the reference
    for line in estimate_lines(args):
        emit(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
