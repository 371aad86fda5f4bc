"""Elastic rollout workers: one run resized 1 -> 2 -> 3 workers (``--phases``) through its scale channel.

A rollout-bound workload (bench.grpo_step's text-only GRPO step with long fixed-length completions, one
learner, synchronous steps). For each phase it prints one JSON line: the workers, the steps/s and
completions/s over ``--steps`` measured steps, and the scaling efficiency against the first phase
(throughput / (workers x first phase's throughput per worker)), for the whole step and for the rollout
phase alone (completions per second of rollout time: the part more workers can speed up). For each resize: the time and the number of
steps from the request (sent the way ``python -m launch.scale`` sends it) to the first step whose rollout
uses the new workers (they are placed and loaded while the run trains, and join at a step boundary).

Throughput can only scale while there are cores to run the workers on: the summary line names the CPUs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import ray

from bench.common import (
    BENCH_LABELS,
    build_bench_checkpoint,
    emit,
    local_ray,
    machine_info,
    median,
    parse_int_list,
    rounded,
    text_only_records,
)
from bench.grpo_step import Layout, Workload, add_workload_flags, make_config, workload_from_flags


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_flags(p)
    p.add_argument("--phases", default="1,2,3", help="rollout workers in each phase, in order")
    p.set_defaults(new_tokens=192, prompts=6, group_size=4, steps=3, beta=0.0)
    args = p.parse_args(argv)
    phases = parse_int_list(args.phases)
    wl: Workload = workload_from_flags(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        ckpt = build_bench_checkpoint(work / "ckpt", wl.lm, wl.new_tokens, wl.seed)
        records = text_only_records(ckpt, wl.prompts, wl.prompt_tokens, wl.seed)
        cfg = make_config(Layout(phases[0], 1, 0, args.rollout_threads, args.learner_threads), wl, str(ckpt),
                          str(work / "run"))
        cfg.rollout.min_workers, cfg.rollout.max_workers = 1, max(phases)
        cfg.train.steps = 10_000
        with local_ray(num_cpus=2 + max(phases)):
            for line in run_phases(cfg, ckpt, records, phases, wl):
                emit(line)
    return 0


def run_phases(cfg, ckpt, records, phases, wl):
    from actors.groups import RLVRGroups
    from actors.scale_control import ScaleChannel
    from launch.train_rlvr import RLVRTrainer
    from r1omni_ray.config import WandbConfig
    from r1omni_ray.tracking import RunLogger

    groups = RLVRGroups.build(cfg, str(ckpt), BENCH_LABELS)
    channel = ScaleChannel(cfg)
    logger = RunLogger(Path(cfg.train.output_dir), WandbConfig(mode="disabled"), {})
    lines, base = [], None
    try:
        tr = RLVRTrainer(cfg, groups, list(records), None, BENCH_LABELS, logger, scale=channel)
        tr.fit(wl.warmup_steps)
        for k, n in enumerate(phases):
            join: dict[str, float] = {}
            if k:
                t_cmd, s_cmd = time.perf_counter(), tr.step
                ray.get(channel.actor.request.remote(n))
                while len(groups.rollout.active) != n:
                    if time.perf_counter() - t_cmd > 600:
                        raise RuntimeError(f"{n} workers did not join in 600 s: {groups.rollout.state_line()}")
                    tr.fit(tr.step + 1)
                # The boundary of the step just logged admitted them: the next step's rollout uses them.
                join = {"join_s": rounded(time.perf_counter() - t_cmd),
                        "join_steps": tr.step - s_cmd, "step_s_before": rounded(tr.history[s_cmd - 1]["time/step"])}
                tr.fit(tr.step + 1)  # the first step on the new workers (its shares rebalanced), not measured
            t0, s0 = time.perf_counter(), tr.step
            rows = tr.fit(tr.step + wl.steps)[s0:]
            wall = time.perf_counter() - t0
            assert all(h["rollout/num_workers"] == n for h in rows)
            steps_per_s = len(rows) / wall
            rollout_rate = wl.completions_per_step / median([h["time/rollout"] for h in rows])
            base = base or (steps_per_s / n, rollout_rate / n)
            lines.append({
                "bench": "elastic", "workers": n, "measured_steps": len(rows), "steps_per_s": rounded(steps_per_s),
                "completions_per_s": rounded(steps_per_s * wl.completions_per_step),
                "scaling_efficiency": rounded(steps_per_s / (n * base[0]), 3),
                # the rollout phase alone: what more workers can speed up
                "rollout_completions_per_s": rounded(rollout_rate),
                "rollout_scaling_efficiency": rounded(rollout_rate / (n * base[1]), 3),
                "rollout_s_median": rounded(median([h["time/rollout"] for h in rows])),
                "train_s_median": rounded(median([h["time/train"] for h in rows])),
                "step_s_all": [rounded(h["time/step"], 3) for h in rows],
            } | join)
    finally:
        channel.shutdown()
        groups.shutdown()
        logger.finish()
    lines.append({"bench": "elastic", "kind": "summary", "phases": phases, "new_tokens": wl.new_tokens,
                  "prompts": wl.prompts, "group_size": wl.group_size, "learners": 1, "machine": machine_info()})
    return lines


if __name__ == "__main__":
    sys.exit(main())
