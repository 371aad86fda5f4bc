"""Asynchronous GRPO: the same workload synchronous and at train.max_staleness k = 1, 2, 4, side by side.

The bench.grpo_step workload on one set of actors (`--workers` rollout workers, `--learners` learners), with
completion lengths long-tailed (`--stop-ids`: the checkpoint lists extra eos ids, so a random policy stops
with a fixed chance per token; lengths are geometric, capped at --new-tokens), so a step's longest group
decides its rollout time, as with reasoning traces. The layouts run interleaved, `--repeats` rounds of each;
a line per run (the grpo_step line: median step, completions/s, phases, idle fractions, the largest
staleness), then a summary line: per k the median completions/s over the rounds with its range, and the ratios
k=2 / k=1 (one-step overlap) and k=2 / sync, from medians measured in the same run. A value with an ``s``
(``2s``) runs that k with streamed groups (train.stream_groups, `--stream-chunk` prompts per rollout call): a
step trains the first groups to complete; its ratios are reported on their own lines (``2s / 1``).

Off-policy steps are corrected (learner.rollout_correction, default tis): their proximal log-probs are the
training forward's own, weighted towards the hf engine's recorded behaviour log-probs; no extra pass.

`--quality`: instead, the demo task (configs/tiny_cpu.yaml: synthetic clips, SFT once, then RLVR from that one
SFT checkpoint at each --staleness value, 600 steps). A line per k: the first step at which the accuracy reward,
averaged over the last --window steps, reaches --target, and the final window's mean; then the ratio of each
k's steps to the synchronous run's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import emit, rounded
from bench.grpo_step import BenchSystem, Layout, add_workload_flags

DEFAULT_STALENESS = "0,1,2,2s"


def parse_staleness(spec: str) -> list[tuple[str, int, bool]]:
    """"0,1,2,2s" -> (key, k, streamed) per value."""
    out = []
    for x in (x.strip() for x in spec.split(",")):
        if x:
            out.append((x, int(x.removesuffix("s")), x.endswith("s")))
    return out


def summarize(runs: dict[str, list[dict[str, Any]]], workers: int, learners: int) -> dict[str, Any]:
    per_k = {}
    for k, rows in runs.items():
        cps = [r["completions_per_s"] for r in rows]
        per_k[str(k)] = {
            "completions_per_s_median": rounded(statistics.median(cps)), "completions_per_s_range": [min(cps), max(cps)],
            "step_s_median": rounded(statistics.median(r["step_s_median"] for r in rows)),
            "idle_frac_rollout": rounded(statistics.median(r["idle_frac"]["rollout"] for r in rows), 3),
            "idle_frac_learner": rounded(statistics.median(r["idle_frac"]["learner"] for r in rows), 3),
            "staleness_max": max(r["weight_version_lag_max"] for r in rows),
            "completion_tokens_mean": rounded(statistics.median(r["completion_tokens_mean"] for r in rows)),
        }
    out: dict[str, Any] = {"bench": "async_rl", "kind": "summary", "workers": workers, "learners": learners,
                           "rounds": len(next(iter(runs.values()))), "by_staleness": per_k}
    med = {k: v["completions_per_s_median"] for k, v in per_k.items()}
    for num, den in (("2", "1"), ("2", "0"), ("1", "0"), ("4", "0"), ("2s", "1"), ("2s", "0"), ("2s", "2"),
                     ("4s", "0"), ("4s", "4")):
        if num in med and den in med:
            out[f"speedup_k{num}_vs_k{den}"] = rounded(med[num] / med[den], 3)
    return out


def steps_to_target(accuracy: list[float], window: int, target: float) -> int | None:
    """The first step (1-based) whose trailing ``window``-step mean accuracy reaches ``target``."""
    for i in range(window, len(accuracy) + 1):
        if statistics.fmean(accuracy[i - window : i]) >= target:
            return i
    return None


def quality(args: argparse.Namespace, ks: list[int]) -> int:
    from launch.common import init_ray, prepare, setup_logging
    from launch.train_rlvr import run_rlvr
    from launch.train_sft import run_sft
    from r1omni_ray.config import load_config

    setup_logging()
    config = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_async_quality_"))
    base = [f"train.output_dir={work / 'sft'}", "wandb.mode=disabled", f"train.steps={args.quality_steps}"]
    cfg = load_config(config, base)
    prep = prepare(cfg)
    init_ray(cfg)
    sft_ckpt = run_sft(cfg, prep)
    rows = {}
    corrections = [c for c in args.corrections.split(",") if c.strip()]
    runs = [(k, c) for k in ks for c in (corrections if k > 0 else corrections[:1])]
    for k, corr in runs:
        name = f"k{k}-{corr}"
        ck = load_config(config, base + [f"train.output_dir={work / name}", f"train.max_staleness={k}",
                                         f"learner.rollout_correction={corr}"])
        hist = run_rlvr(ck, prep, init_ckpt=sft_ckpt)["history"]
        acc = [h["accuracy"] for h in hist]
        rows[name] = {"bench": "async_rl", "kind": "quality", "max_staleness": k, "rollout_correction": corr,
                      "steps": len(hist),
                      "steps_to_target": steps_to_target(acc, args.window, args.target), "target": args.target,
                      "window": args.window,
                      "final_window_accuracy": rounded(statistics.fmean(acc[-args.window:]), 3),
                      "staleness_max": max(h["staleness/max"] for h in hist),
                      "corrected_frac_mean": rounded(statistics.fmean(h.get("offpolicy/corrected_frac", 0.0)
                                                                      for h in hist), 4),
                      "mismatch_kl_max": max(h.get("offpolicy/mismatch_kl", 0.0) for h in hist)}
        emit(rows[name])
    sync = next((r for r in rows.values() if r["max_staleness"] == 0), None)
    if sync is not None and sync["steps_to_target"]:
        emit({"bench": "async_rl", "kind": "quality_summary", "steps_ratio_vs_sync": {
            name: (rounded(r["steps_to_target"] / sync["steps_to_target"], 3) if r["steps_to_target"] else None)
            for name, r in rows.items()}})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_flags(p)
    p.set_defaults(stop_ids=4, new_tokens=96, steps=4)
    p.add_argument("--workers", type=int, default=1, help="rollout workers")
    p.add_argument("--learners", type=int, default=1, help="learners")
    p.add_argument("--staleness", default=DEFAULT_STALENESS,
                   help="comma-separated train.max_staleness values; a trailing s streams groups (e.g. 2s)")
    p.add_argument("--stream-chunk", type=int, default=4, help="rollout.stream_chunk of the streamed values")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every layout")
    p.add_argument("--quality", action="store_true", help="the demo task's learning curve per k instead (below)")
    p.add_argument("--quality-steps", type=int, default=600, help="--quality: RLVR steps per run")
    p.add_argument("--window", type=int, default=50, help="--quality: trailing steps averaged")
    p.add_argument("--target", type=float, default=0.9, help="--quality: accuracy reward to reach")
    p.add_argument("--corrections", default="tis",
                   help="--quality: learner.rollout_correction values for the off-policy runs (e.g. tis,none)")
    args = p.parse_args(argv)
    try:
        values = parse_staleness(args.staleness)
    except ValueError:
        p.error(f"--staleness {args.staleness!r}: expected integers, each optionally ending in s (e.g. 0,1,2,2s)")
    if not values or min(k for _, k, _ in values) < 0 or args.repeats < 1 or any(
            k < 1 for _, k, s in values if s):
        p.error("--staleness needs values >= 0 (>= 1 when streamed) and --repeats >= 1")
    if args.quality:
        return quality(args, [k for _, k, s in values if not s])
    layouts = {key: Layout(args.workers, args.learners, k, args.rollout_threads, args.learner_threads,
                           stream_chunk=args.stream_chunk if s else 0) for key, k, s in values}
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in layouts}
    with BenchSystem(args, list(layouts.values()), bench="async_rl") as system:  # one actor set: one pool key
        emit(system.header())
        for r in range(args.repeats):
            for key, lay in layouts.items():
                res = system.run(lay) | {"round": r, "max_staleness": lay.staleness, "streamed": lay.stream_chunk > 0}
                runs[key].append(res)
                emit(res)
    emit(summarize(runs, args.workers, args.learners))
    return 0


if __name__ == "__main__":
    sys.exit(main())
