"""Gradient checkpointing on the learner's shared-prefix forward: peak memory and time of one micro-batch.

One R1-Omni-shaped prompt group (972 prompt tokens: 392 visual, 500 audio, 80 text; G completions of
--new-tokens tokens; shipped frozen-tower features) through completion_logprobs + backward, with
learner.gradient_checkpointing off and on. Each variant runs in a fresh process of its own; a thread samples
its resident memory every 2 ms during its first forward + backward, and the peak above the level just
before the forward is reported (activations, gradients and the autograd graph; the weights are already
resident). Only the first pass: memory the allocator keeps after it would hide the next pass's growth.
Also the exact bytes autograd keeps for backward (saved tensors, each storage once; a checkpointed layer
keeps only its inputs), which does not depend on the allocator.

Run: python -m bench.grad_checkpointing  (one JSON line per variant and repeat, then a summary line)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
from dataclasses import asdict
from typing import Any

from bench.common import (
    TinyLMArgs,
    add_tiny_lm_flags,
    emit,
    machine_info,
    median,
    rounded,
    tiny_lm_from_flags,
)


def _one(args: argparse.Namespace, checkpointing: bool, out: Any) -> None:
    import psutil
    import torch

    from bench.omni_shape import omni_model, omni_prompts, with_features
    from r1omni_ray.model.loading import freeze_modules, set_train_mode

    torch.set_num_threads(args.threads)
    lm = tiny_lm_from_flags(args)
    model = omni_model(lm, 512, args.tower_hidden, args.seed)
    freeze_modules(model, vision=True, audio=True, bert=True)
    prompts = with_features(model, omni_prompts(1, list(range(10, 500)), args.seed))
    if checkpointing:
        model.enable_gradient_checkpointing()
    set_train_mode(model)
    g = torch.Generator().manual_seed(args.seed)
    comps = [torch.randint(10, 500, (args.new_tokens,), generator=g).tolist() for _ in range(args.group_size)]
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:  # what autograd keeps for backward (each storage once)
        saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        lp, mask, ent = model.completion_logprobs(prompts, [0] * len(comps), comps, with_entropy=True)
    ((lp * mask).sum() + 0.01 * ent.sum()).backward()
    step_s = time.perf_counter() - t0
    done.set()
    sampler.join()
    out.put({"step_s": step_s, "peak_mb": (peak[0] - base) / 2**20, "saved_mb": sum(saved.values()) / 2**20})


def run_variant(args: argparse.Namespace, checkpointing: bool) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_one, args=(args, checkpointing, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tiny_lm_flags(p, TinyLMArgs(hidden_size=512, intermediate_size=2048, num_layers=8, num_heads=8, num_kv_heads=2))
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--tower-hidden", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    res: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for r in range(args.repeats):  # interleaved: both variants see the same machine load
        for ckpt in (False, True):
            x = run_variant(args, ckpt)
            res[ckpt].append(x)
            emit({"bench": "grad_checkpointing", "gradient_checkpointing": ckpt, "repeat": r,
                  "peak_mb": rounded(x["peak_mb"]), "saved_for_backward_mb": rounded(x["saved_mb"]),
                  "step_s": rounded(x["step_s"])})
    off, on = res[False], res[True]
    emit({"bench": "grad_checkpointing", "summary": True, "lm": asdict(tiny_lm_from_flags(args)),
          "prompt_tokens": 972, "group_size": args.group_size, "new_tokens": args.new_tokens,
          "peak_mb_off": rounded(median([x["peak_mb"] for x in off])),
          "peak_mb_on": rounded(median([x["peak_mb"] for x in on])),
          "peak_ratio_on_off": rounded(median([x["peak_mb"] for x in on]) / median([x["peak_mb"] for x in off])),
          "saved_for_backward_mb_off": rounded(off[0]["saved_mb"]), "saved_for_backward_mb_on": rounded(on[0]["saved_mb"]),
          "step_s_off": rounded(median([x["step_s"] for x in off])),
          "step_s_on": rounded(median([x["step_s"] for x in on])),
          "time_ratio_on_off": rounded(median([x["step_s"] for x in on]) / median([x["step_s"] for x in off])),
          "machine": machine_info()})


if __name__ == "__main__":
    main()
