"""Asynchronous GRPO: the same workload synchronous and at train.max_staleness k = 1, 2, 4, side by side.

The bench.grpo_step workload on one set of actors (`--workers` rollout workers, `--learners` learners), with
completion lengths long-tailed (`--stop-ids`: the checkpoint lists extra eos ids, so a random policy stops
with a fixed chance per token; lengths are geometric, capped at --new-tokens), so a step's longest group
decides its rollout time, as with reasoning traces. The layouts run interleaved, `--repeats` rounds of each;
a line per run (the grpo_step line: median step, completions/s, phases, idle fractions, the largest
staleness), then a summary line: per k the median completions/s over the rounds with its range, and the ratios
k=2 / k=1 (today's overlap) and k=2 / sync, from medians measured in the same run.

Off-policy steps are corrected (learner.rollout_correction, default tis): their proximal log-probs are the
training forward's own, weighted towards the hf engine's recorded behaviour log-probs; no extra pass.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

from bench.common import emit, rounded
from bench.grpo_step import BenchSystem, Layout, add_workload_flags

DEFAULT_STALENESS = "0,1,2,4"


def summarize(runs: dict[int, list[dict[str, Any]]], workers: int, learners: int) -> dict[str, Any]:
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
    for num, den in (("2", "1"), ("2", "0"), ("1", "0"), ("4", "0")):
        if num in med and den in med:
            out[f"speedup_k{num}_vs_k{den}"] = rounded(med[num] / med[den], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_flags(p)
    p.set_defaults(stop_ids=4, new_tokens=96, steps=4)
    p.add_argument("--workers", type=int, default=1, help="rollout workers")
    p.add_argument("--learners", type=int, default=1, help="learners")
    p.add_argument("--staleness", default=DEFAULT_STALENESS, help="comma-separated train.max_staleness values")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every layout")
    args = p.parse_args(argv)
    ks = [int(x) for x in args.staleness.split(",") if x.strip()]
    if not ks or min(ks) < 0 or args.repeats < 1:
        p.error("--staleness needs values >= 0 and --repeats >= 1")
    layouts = [Layout(args.workers, args.learners, k, args.rollout_threads, args.learner_threads) for k in ks]
    runs: dict[int, list[dict[str, Any]]] = {k: [] for k in ks}
    with BenchSystem(args, layouts, bench="async_rl") as system:  # one actor set: the layouts share a pool key
        emit(system.header())
        for r in range(args.repeats):
            for lay in layouts:
                res = system.run(lay) | {"round": r, "max_staleness": lay.staleness}
                runs[lay.staleness].append(res)
                emit(res)
    emit(summarize(runs, args.workers, args.learners))
    return 0


if __name__ == "__main__":
    sys.exit(main())
