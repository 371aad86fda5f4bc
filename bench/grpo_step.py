"""End-to-end GRPO step throughput on a text-only workload, through the real system path.

A random-init HumanOmni checkpoint with a tiny Qwen2 (hidden 256, 4 layers by default) is trained by the
real role groups (RolloutWorkers on the transformers engine, DeepSpeed LearnerActors with a frozen
reference, a RewardActor, the gloo weight-broadcast group) driven by launch.train_rlvr.RLVRTrainer. Prompts
have no video and no audio, so the policy only embeds text; every completion is exactly --new-tokens long.

For each layout (`{W}w{L}l-{sync|overlap}[-recompute][-noprefix][-t{R}x{T}]`: W rollout workers, L
learners, synchronous or one-step-overlapped, `-recompute` forcing the separate old-log-prob pass that
on-policy steps no longer need, `-noprefix` turning the shared prefix off in learner and engine, R torch
threads per worker and T per learner) it prints one JSON line: the median step
seconds over the measured steps, completions/s and generated tokens/s at that median, the median split by
phase, the bytes through the driver, and the fraction of wall time each group sat idle. A last line names
the fastest layout and the speed-ups of overlap and of the one-pass step. Layouts with the same
workers/learners/threads share one set of actors.

Phases are the driver's own (launch.train_rlvr's PhaseTimer, read from its metrics): rollout (waiting for
this step's rollout; near 0 once overlapped), reward, train (the one learner call), rollout_wait (only when a
worker leaves: its rollouts must end first), broadcast (a worker takes the weights between two generate calls:
overlapped, it includes the end of the one under way), other (advantages, sharding, logging); train splits
into logprob (reference, and a recompute pass if asked) and update.

Idle fraction of a group over the measured window = 1 - mean over its actors of busy / wall, where a
rollout worker is busy generating (RolloutWorker.stats busy_s) or receiving weights, and a learner is
busy in the train call or the broadcast (all learners take part in each).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from actors.groups import RLVRGroups
from bench.common import (
    BENCH_LABELS,
    TinyLMArgs,
    add_tiny_lm_flags,
    bench_trainer,
    build_bench_checkpoint,
    emit,
    local_ray,
    machine_info,
    median,
    prompt_lengths,
    rounded,
    text_only_records,
    tiny_lm_from_flags,
)
from r1omni_ray.config import RunConfig, config_from_dict

# Driver phases (they add up to the step, with "other"), then the learner call's own split of "train".
STEP_PHASES = ("rollout", "reward", "train", "rollout_wait", "broadcast")
PHASES = STEP_PHASES + ("logprob", "update")
DEFAULT_LAYOUTS = "1w1l-sync-recompute,1w1l-sync,1w1l-overlap,1w2l-overlap"
_LAYOUT_RE = re.compile(r"^(\d+)w(\d+)l-(sync|overlap|k\d+)(-recompute)?(-noprefix)?(?:-t(\d+)x(\d+))?$")


# ----------------------------------------------------------------------------- layouts and workload


@dataclass(frozen=True)
class Layout:
    workers: int
    learners: int
    staleness: int  # train.max_staleness: 0 sync, 1 overlap (the next rollout during the update), k
    rollout_threads: int
    learner_threads: int
    recompute: bool = False  # learner.old_logprobs=recompute: the separate proximal-log-prob pass
    # Shared prefix off in the learner and the engine: every completion carries its own prompt copy, as in
    # TRL (the compute-matched line).
    no_prefix: bool = False
    stream_chunk: int = 0  # > 0: train.stream_groups with rollout.stream_chunk prompts per call

    @property
    def overlap(self) -> bool:
        return self.staleness > 0

    @property
    def mode(self) -> str:
        mode = {0: "sync", 1: "overlap"}.get(self.staleness, f"k{self.staleness}")
        return f"k{self.staleness}-stream{self.stream_chunk}" if self.stream_chunk else mode

    @property
    def name(self) -> str:
        mode = self.mode
        extra = ("-recompute" if self.recompute else "") + ("-noprefix" if self.no_prefix else "")
        return f"{self.workers}w{self.learners}l-{mode}{extra}-t{self.rollout_threads}x{self.learner_threads}"

    @property
    def pool_key(self) -> tuple[int, int, int, int, bool]:
        """Layouts that can share one set of actors (mode and recompute are the driver's business only)."""
        return (self.workers, self.learners, self.rollout_threads, self.learner_threads, self.no_prefix)


def parse_layout(spec: str, rollout_threads: int, learner_threads: int) -> Layout:
    m = _LAYOUT_RE.match(spec.strip())
    if not m:
        raise ValueError(f"layout {spec!r}: expected {{W}}w{{L}}l-{{sync|overlap|k<N>}}[-recompute][-noprefix]"
                         "[-t{{R}}x{{T}}], e.g. 2w1l-overlap or 1w1l-k2")
    w, learners, mode, recompute, no_prefix, rt, lt = m.groups()
    if int(w) < 1 or int(learners) < 1:
        raise ValueError(f"layout {spec!r}: needs at least one worker and one learner")
    staleness = {"sync": 0, "overlap": 1}.get(mode) if not mode.startswith("k") else int(mode[1:])
    return Layout(int(w), int(learners), staleness, int(rt or rollout_threads), int(lt or learner_threads),
                  recompute=bool(recompute), no_prefix=bool(no_prefix))


@dataclass
class Workload:
    lm: TinyLMArgs = field(default_factory=TinyLMArgs)
    prompts: int = 16
    prompt_tokens: int = 32
    group_size: int = 8
    new_tokens: int = 48  # the exact completion length, or the cap with stop_ids
    stop_ids: int = 0  # > 0: eos allowed, long-tailed lengths (bench.common.build_bench_checkpoint)
    beta: float = 0.04
    lr: float = 1e-5
    micro_batch_size: int = 32
    zero_stage: int = 2
    bucket_mb: float = 64.0
    warmup_steps: int = 1
    steps: int = 5
    seed: int = 0

    @property
    def completions_per_step(self) -> int:
        return self.prompts * self.group_size


def make_config(layout: Layout, wl: Workload, ckpt_dir: str, out_dir: str) -> RunConfig:
    return config_from_dict({
        "model": {"path": ckpt_dir},
        "rollout": {
            "engine": "hf", "num_workers": layout.workers, "group_size": wl.group_size, "temperature": 1.0,
            "top_p": 1.0, "max_new_tokens": wl.new_tokens,
            "min_new_tokens": 0 if wl.stop_ids else wl.new_tokens, "num_cpus_per_worker": 1.0,
            "torch_threads": layout.rollout_threads, "max_restarts": 0, "shared_prefix": not layout.no_prefix,
            "stream_chunk": max(1, layout.stream_chunk),
        },
        "reward": {"num_actors": 1, "num_cpus_per_actor": 0.25},
        "grpo": {"beta": wl.beta},
        "learner": {
            "num_learners": layout.learners, "zero_stage": wl.zero_stage, "lr": wl.lr,
            "micro_batch_size": wl.micro_batch_size, "num_cpus_per_learner": 1.0,
            "torch_threads": layout.learner_threads, "use_reference": True, "broadcast_bucket_mb": wl.bucket_mb,
            "old_logprobs": "recompute" if layout.recompute else "auto", "shared_prefix": not layout.no_prefix,
        },
        "train": {
            "steps": wl.warmup_steps + wl.steps, "prompts_per_step": wl.prompts, "seed": wl.seed,
            "max_staleness": layout.staleness, "stream_groups": layout.stream_chunk > 0, "output_dir": out_dir,
            "log_samples": 0, "eval_every": 0,
        },
        "wandb": {"mode": "disabled"},
    })


# ----------------------------------------------------------------------------- one layout


def worker_busy(groups: RLVRGroups) -> list[float]:
    """Generation seconds of each rollout worker so far (asked between steps, when none is generating)."""
    return [s["busy_s"] for s in ray.get([w.stats.remote() for w in groups.rollout.workers])]


def run_layout(groups: RLVRGroups, layout: Layout, wl: Workload, ckpt_dir: str, records: Sequence[Any],
               work_dir: Path) -> dict[str, Any]:
    """Warm-up steps, then the measured ones, on the driver's own step loop and phase timer."""
    out = work_dir / layout.name
    cfg = make_config(layout, wl, ckpt_dir, str(out))
    with bench_trainer(cfg, groups, records, BENCH_LABELS, out) as trainer:
        trainer.fit(steps=wl.warmup_steps)
        busy0, t0 = worker_busy(groups), time.perf_counter()
        measured = trainer.fit(steps=wl.warmup_steps + wl.steps)[wl.warmup_steps:]
        wall, busy1 = time.perf_counter() - t0, worker_busy(groups)
    transfer = sum(h["time/broadcast"] for h in measured)
    w_busy = [(y - x) + transfer for x, y in zip(busy0, busy1, strict=True)]
    # Every learner takes part in the train call and the broadcast.
    learner_busy = sum(h["time/train"] + h["time/broadcast"] for h in measured)
    step_s = median([h["time/step"] for h in measured])
    per_step = wl.completions_per_step
    lengths = [h["response/length_mean"] for h in measured]
    samples = {int(h["samples"]) for h in measured}
    driver = median([h["data/driver_bytes"] for h in measured])
    media = median([h["data/media_bytes"] for h in measured])
    return {
        "bench": "grpo_step",
        "layout": layout.name,
        "workers": layout.workers,
        "learners": layout.learners,
        "mode": layout.mode,
        "old_logprobs": old_logprobs_source(measured),
        "rollout_threads": layout.rollout_threads,
        "learner_threads": layout.learner_threads,
        "measured_steps": len(measured),
        "step_s_median": rounded(step_s),
        "completions_per_s": rounded(per_step / step_s),
        "gen_tokens_per_s": rounded(per_step * median(lengths) / step_s),
        "phase_s_median": {p: rounded(median([h.get(f"time/{p}", 0.0) for h in measured])) for p in PHASES}
        | {"other": rounded(median([h["time/step"] - sum(h.get(f"time/{p}", 0.0) for p in STEP_PHASES)
                                    for h in measured]))},
        "idle_frac": {
            "rollout": rounded(1.0 - sum(w_busy) / len(w_busy) / wall, 3),
            "learner": rounded(1.0 - learner_busy / wall, 3),
        },
        "driver_bytes_per_step": int(driver),
        "media_bytes_per_step": int(media),
        "wall_s": rounded(wall),
        "completions_per_s_wall": rounded(per_step * len(measured) / wall),
        "step_s_all": [rounded(h["time/step"], 3) for h in measured],
        "completion_tokens_mean": rounded(median(lengths)),
        "samples_per_step": sorted(samples),
        "weight_version_lag_max": max((h.get("weight_version_lag", 0.0) for h in measured), default=0.0),
    }


def old_logprobs_source(rows: Sequence[dict[str, Any]]) -> str:
    """Where the measured steps' proximal log-probs came from, and whether the engine's behaviour log-probs
    corrected them (the learners report both every step)."""
    src = "separate pass" if median([h.get("learner/recomputed_old_logprobs", 0.0) for h in rows]) > 0.5 \
        else "training forward"
    if median([h.get("learner/corrected_step", 0.0) for h in rows]) > 0.5:
        src += " + correction"
    return src


# ----------------------------------------------------------------------------- driver


def add_workload_flags(p: argparse.ArgumentParser) -> None:
    d = Workload()
    add_tiny_lm_flags(p)
    p.add_argument("--prompts", type=int, default=d.prompts, help="prompts per step")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="rendered prompt length")
    p.add_argument("--group-size", type=int, default=d.group_size, help="completions per prompt (G)")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens,
                   help="exact completion length (the cap with --stop-ids)")
    p.add_argument("--stop-ids", type=int, default=d.stop_ids,
                   help="extra eos ids in the checkpoint: eos allowed, long-tailed completion lengths")
    p.add_argument("--beta", type=float, default=d.beta, help="KL coefficient (reference model kept when > 0)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, help="sequences per fwd/bwd")
    p.add_argument("--zero-stage", type=int, default=d.zero_stage, choices=(0, 1, 2, 3))
    p.add_argument("--bucket-mb", type=float, default=d.bucket_mb, help="weight-broadcast bucket size")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--steps", type=int, default=d.steps, help="measured steps")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--rollout-threads", type=int, default=1, help="torch threads per rollout worker")
    p.add_argument("--learner-threads", type=int, default=1, help="torch threads per learner")
    p.add_argument("--driver-threads", type=int, default=1, help="torch threads of this driver process")
    p.add_argument("--work-dir", default=None, help="where the checkpoint and run files go (default: a temp dir)")


def workload_from_flags(args: argparse.Namespace) -> Workload:
    wl = Workload(
        lm=tiny_lm_from_flags(args), prompts=args.prompts, prompt_tokens=args.prompt_tokens,
        group_size=args.group_size, new_tokens=args.new_tokens, stop_ids=args.stop_ids, beta=args.beta, lr=args.lr,
        micro_batch_size=args.micro_batch_size, zero_stage=args.zero_stage, bucket_mb=args.bucket_mb,
        warmup_steps=args.warmup_steps, steps=args.steps, seed=args.seed,
    )
    if wl.warmup_steps < 1 or wl.steps < 1:
        raise SystemExit("--warmup-steps and --steps must be >= 1 (the window starts after a warm-up step)")
    return wl


class BenchSystem:
    """The checkpoint, the prompts and a local Ray while the context is open, and the actor set of the layout
    being run: only one set is up at a time (idle Ray workers of other sets took 30% off a neighbour's step
    on this 2-core machine). Layouts that share a pool key reuse one set when run back to back."""

    def __init__(self, args: argparse.Namespace, layouts: Sequence[Layout], bench: str = "grpo_step") -> None:
        self.args, self.layouts, self.bench = args, list(layouts), bench
        self.wl = workload_from_flags(args)
        self.pools: RLVRGroups | None = None
        self.pool_key: tuple[int, int, int, int, bool] | None = None
        self.startup_s = 0.0
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._ray = contextlib.ExitStack()

    def __enter__(self) -> BenchSystem:
        torch.set_num_threads(max(1, self.args.driver_threads))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.args.work_dir:
            self.work = Path(self.args.work_dir)
            self.work.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="bench_grpo_")
            self.work = Path(self._tmp.name)
        try:
            wl = self.wl
            self.ckpt = str(build_bench_checkpoint(self.work / "ckpt", wl.lm, wl.new_tokens, seed=wl.seed,
                                                         stop_ids=wl.stop_ids))
            self.records = text_only_records(self.ckpt, wl.prompts, wl.prompt_tokens, seed=wl.seed)
            self.prompt_lens = prompt_lengths(self.ckpt, self.records)
            # A logical CPU per actor of the largest layout.
            actors = max(lay.workers + lay.learners for lay in self.layouts)
            self._ray.enter_context(local_ray(max(os.cpu_count() or 1, math.ceil(actors) + 2)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _pools_for(self, layout: Layout) -> RLVRGroups:
        if self.pool_key != layout.pool_key:
            self._release()
            cfg = make_config(layout, self.wl, self.ckpt, str(self.work / "pools"))
            t0 = time.perf_counter()
            self.pools = RLVRGroups.build(cfg, self.ckpt, BENCH_LABELS)
            self.pool_key, self.startup_s = layout.pool_key, time.perf_counter() - t0
        assert self.pools is not None
        return self.pools

    def header(self) -> dict[str, Any]:
        wl = self.wl
        pools = self._pools_for(self.layouts[0])
        metas = pools.sync.metas
        return {
            "bench": self.bench, "kind": "config", "machine": machine_info(),
            "workload": asdict(wl) | {"prompt_tokens_actual": [min(self.prompt_lens), max(self.prompt_lens)],
                                      "completions_per_step": wl.completions_per_step},
            "layouts": [lay.name for lay in self.layouts],
            "model": {"trainable_params": sum(m.numel for m in metas), "broadcast_bytes": sum(m.nbytes for m in metas),
                      "broadcast_buckets": len(pools.sync.routes)},
        }

    def run(self, layout: Layout) -> dict[str, Any]:
        pools = self._pools_for(layout)
        res = run_layout(pools, layout, self.wl, self.ckpt, self.records, self.work)
        return res | {"bench": self.bench, "actor_startup_s": rounded(self.startup_s)}

    def _release(self) -> None:
        if self.pools is not None:
            self.pools.shutdown()
        self.pools, self.pool_key = None, None

    def __exit__(self, *exc: Any) -> None:
        self._release()
        self._ray.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def run_benchmark(args: argparse.Namespace, layouts: Sequence[Layout], bench: str = "grpo_step") -> list[dict[str, Any]]:
    """Every layout once (actor sets shared by pool key), a line each after the config line."""
    first_seen: dict[tuple[int, int, int, int, bool], int] = {}
    for lay in layouts:
        first_seen.setdefault(lay.pool_key, len(first_seen))
    layouts = sorted(layouts, key=lambda lay: first_seen[lay.pool_key])  # one actor set per key, built once
    with BenchSystem(args, layouts, bench) as system:
        emit(system.header())
        results = []
        for lay in layouts:
            results.append(system.run(lay))
            emit(results[-1])
        return results


def summarize(results: Sequence[dict[str, Any]], bench: str = "grpo_step") -> dict[str, Any]:
    best = max(results, key=lambda r: r["completions_per_s"])
    out: dict[str, Any] = {
        "bench": bench, "kind": "summary", "best_layout": best["layout"],
        "best_completions_per_s": best["completions_per_s"],
        "ranking": [r["layout"] for r in sorted(results, key=lambda r: -r["completions_per_s"])],
    }
    by_name = {r["layout"]: r for r in results}
    speedups = {}
    for r in results:
        if r["mode"] == "overlap":
            sync_name = r["layout"].replace("-overlap-", "-sync-")
            if sync_name in by_name:
                speedups[r["layout"]] = rounded(by_name[sync_name]["step_s_median"] / r["step_s_median"], 3)
    if speedups:
        out["overlap_speedup_vs_sync"] = speedups
    one_pass = {}
    for r in results:
        if "-recompute-" in r["layout"] and r["layout"].replace("-recompute-", "-") in by_name:
            name = r["layout"].replace("-recompute-", "-")
            one_pass[name] = rounded(r["step_s_median"] / by_name[name]["step_s_median"], 3)
    if one_pass:  # sync step time with the separate old-log-prob pass / without it, same actors, same run
        out["one_pass_speedup_vs_recompute"] = one_pass
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_flags(p)
    p.add_argument("--layouts", default=DEFAULT_LAYOUTS,
                   help="comma-separated {W}w{L}l-{sync|overlap}[-t{R}x{T}] (default: %(default)s)")
    args = p.parse_args(argv)
    layouts = [parse_layout(s, args.rollout_threads, args.learner_threads) for s in args.layouts.split(",") if s.strip()]
    if not layouts:
        p.error("no layouts given")
    results = run_benchmark(args, layouts)
    emit(summarize(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
