"""Overlap: how much of the wall time each actor pool sits idle, synchronous vs one-step overlapped.

Runs the bench.grpo_step workload twice on one set of actors (`--workers` rollout workers, `--learners`
learners): synchronous (rollout, then update, then broadcast) and with one-step overlap (the next rollout
runs on the workers while the learners compute log-probs and update). Prints the grpo_step line of each
mode, then one comparison line: the idle fraction of the rollout pool and of the learner pool in each
mode, and the overlap speedup of the median step.

Idle fraction = 1 - busy / wall over the measured steps (a worker is busy generating or receiving
weights, a learner computing log-probs, updating or sending weights). With overlap the step takes about
max(rollout, learner work) instead of their sum, so the faster pool's idle share is what is left over.
"""

from __future__ import annotations

import argparse
import sys

from bench.common import emit, rounded
from bench.grpo_step import Layout, add_workload_flags, run_benchmark


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_flags(p)
    p.add_argument("--workers", type=int, default=1, help="rollout workers")
    p.add_argument("--learners", type=int, default=1, help="learners")
    args = p.parse_args(argv)
    layouts = [
        Layout(args.workers, args.learners, staleness, args.rollout_threads, args.learner_threads)
        for staleness in (0, 1)
    ]
    sync, over = run_benchmark(args, layouts, bench="overlap")
    emit({
        "bench": "overlap", "kind": "summary", "workers": args.workers, "learners": args.learners,
        "idle_frac": {"sync": sync["idle_frac"], "overlap": over["idle_frac"]},
        "step_s_median": {"sync": sync["step_s_median"], "overlap": over["step_s_median"]},
        "completions_per_s": {"sync": sync["completions_per_s"], "overlap": over["completions_per_s"]},
        "overlap_speedup": rounded(sync["step_s_median"] / over["step_s_median"], 3),
        "hidden_rollout_s": rounded(sync["phase_s_median"]["rollout"] - over["phase_s_median"]["rollout"]),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
