"""TRL's GRPOTrainer and r1omni-ray on the identical text workload, interleaved in one invocation.

The workload is bench.grpo_step's: a random-init tiny Qwen2 (hidden 256, 4 layers by default) with the
locally built chat tokenizer, 16 rendered prompts per step, G=8 completions of exactly --new-tokens tokens
(eos masked until then), beta 0.04 with a frozen reference, AdamW at one optimizer step per batch, accuracy +
format rewards. TRL gets the very same LM weights (the LM part of our checkpoint, written as a plain Qwen2
directory), the same prompt strings and the same reward functions, and runs in a fresh process of its own
(no Ray beside it) at each of --trl-threads torch thread counts, at R1-Omni's own setting: gradient checkpointing off (its GRPO script
passes --gradient_checkpointing false; TRL's default is on), with no Ray on the machine. r1omni-ray runs
its layouts (--layouts) through the real actors on a local Ray started after TRL's runs, one actor set up at
a time (idle Ray workers beside a run slowed TRL's step from 3.8 to 5.1-5.5 s on this 2-core machine).

--repeats rounds, each running every TRL thread count and every layout once, so both sides see the same
machine load; each run's step time is the median over its measured steps after --warmup-steps (TRL's timed
by its trainer callbacks: generation, scoring, reference and policy passes and the optimizer step). The
summary gives the median over repeats with the [min, max] spread, and ratios of medians:
- primary: synchronous against synchronous at equal cores: a synchronous layout runs one phase at a time, on
  (processes x threads) cores (1w1l-sync-t2x2: 2; 2w2l-sync-t1x1: two rollout workers, then two learners, 2),
  against TRL at that many threads; and the best synchronous layout per core count;
- compute-matched: ours with the shared prefix off in learner and engine (every completion carries its own
  prompt, as in TRL), so the share of the gain that comes from it shows;
- off-policy: overlapped layouts (the next rollout runs during the update: one-step off-policy), on a line
  of their own.

Needs the optional `bench` extra (pip install -e '.[bench]'): TRL is never a runtime dependency.
Run: python -m bench.compare_trl   (a JSON line per run, then the summary)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    BENCH_LABELS,
    build_bench_checkpoint,
    emit,
    machine_info,
    median,
    rounded,
    text_only_records,
)
from bench.grpo_step import (
    BenchSystem,
    Layout,
    Workload,
    add_workload_flags,
    parse_layout,
    workload_from_flags,
)

# Synchronous layouts on 1 and 2 cores (a phase's processes x threads), the compute-matched twin of the best
# 2-core one, and the best overlapped layout of earlier runs.
DEFAULT_LAYOUTS = "1w1l-sync-t1x1,1w1l-sync-t2x2,2w2l-sync-t1x1,2w2l-sync-noprefix-t1x1,1w2l-overlap-t1x1"


def _trl_rewards():
    from r1omni_ray.rewards import accuracy_reward, format_reward

    def accuracy(prompts, completions, solution, **_: Any) -> list[float]:
        return [accuracy_reward(c, s) for c, s in zip(completions, solution, strict=True)]

    def fmt(prompts, completions, solution, **_: Any) -> list[float]:
        return [format_reward(c, s) for c, s in zip(completions, solution, strict=True)]

    return [accuracy, fmt]


def run_trl(lm_dir: Path, tok: Any, prompts: list[str], solutions: list[str], wl: Workload, threads: int,
            out_dir: Path) -> dict[str, Any]:
    from datasets import Dataset

    # transformers' Trainer integrations print() a W&B notice on import (WANDB_MODE=offline); stdout is for
    # JSON lines.
    with contextlib.redirect_stdout(sys.stderr):
        from transformers import PrinterCallback, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads)
    steps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            steps.append(time.perf_counter() - self.t0)

    cfg = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=wl.prompts * wl.group_size,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=wl.group_size,
        max_completion_length=wl.new_tokens, temperature=1.0, top_p=1.0,
        # Exactly new_tokens per completion, as bench.grpo_step asks with rollout.min_new_tokens.
        generation_kwargs={"min_new_tokens": wl.new_tokens, "suppress_tokens": [int(tok.pad_token_id)]},
        beta=wl.beta, learning_rate=wl.lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, loss_type="grpo", scale_rewards="group", epsilon=0.2,
        gradient_checkpointing=False,  # R1-Omni's run_grpo_humanomni.sh setting (TRL's default is True)
        max_steps=wl.warmup_steps + wl.steps, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, bf16=False, seed=wl.seed, dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False, log_completions=False,
    )
    data = Dataset.from_dict({"prompt": prompts, "solution": solutions})
    with contextlib.redirect_stdout(sys.stderr):  # TRL print()s notices too
        trainer = GRPOTrainer(model=str(lm_dir), reward_funcs=_trl_rewards(), args=cfg, train_dataset=data,
                              processing_class=tok, callbacks=[StepTimer()])
        trainer.remove_callback(PrinterCallback)  # it print()s every log row
        trainer.train()
    measured = steps[wl.warmup_steps:]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    step = median(measured)
    per_step = wl.completions_per_step
    import trl

    return {"bench": "compare_trl", "system": "trl", "trl_version": trl.__version__, "threads": threads,
            "gradient_checkpointing": trainer.args.gradient_checkpointing,
            "step_s_median": rounded(step), "completions_per_s": rounded(per_step / step),
            "step_s_all": [rounded(s, 3) for s in measured],
            "completion_tokens_mean": rounded(median(lengths)) if lengths else None,
            "prompt_tokens": sorted({len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts})}


def _run_trl_child(q: Any, *args: Any) -> None:
    q.put(run_trl(*args))


def run_trl_in_own_process(*args: Any) -> dict[str, Any]:
    """run_trl in a fresh process: no Ray driver threads beside it, nothing left from an earlier TRL run."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run_trl_child, args=(q, *args))
    p.start()
    try:
        return q.get()
    finally:
        p.join()


def _stats(values: list[float]) -> dict[str, Any]:
    return {"median": rounded(median(values)), "min": rounded(min(values)), "max": rounded(max(values)),
            "runs": [rounded(v) for v in values]}


def sync_cores(layout: Layout) -> int:
    """Cores a synchronous layout uses at a time: its phases run one after another, each on its processes'
    threads (rollout workers x threads, then learners x threads)."""
    return max(layout.workers * layout.rollout_threads, layout.learners * layout.learner_threads)


def summarize(trl: dict[int, list[float]], ours: dict[str, list[float]], layouts: list[Layout]) -> dict[str, Any]:
    """Medians over repeats with their spread, and the ratios of medians the module docstring lists."""
    trl_med = {t: median(v) for t, v in trl.items()}
    ours_med = {name: median(v) for name, v in ours.items()}
    best_t = max(trl_med, key=lambda t: trl_med[t])
    out: dict[str, Any] = {
        "bench": "compare_trl", "kind": "summary", "unit": "completions/s",
        "trl": {f"t{t}": _stats(v) for t, v in trl.items()}, "trl_best_threads": best_t,
        "ours": {lay.name: _stats(ours[lay.name]) | {"mode": "overlap" if lay.overlap else "sync"} for lay in layouts},
    }
    sync = [lay for lay in layouts if not lay.overlap and sync_cores(lay) in trl_med]
    ratio = {lay.name: ours_med[lay.name] / trl_med[sync_cores(lay)] for lay in sync}
    out["sync_vs_trl_equal_cores"] = {f"{lay.name} / trl-t{sync_cores(lay)}": rounded(ratio[lay.name], 3)
                                      for lay in sync if not lay.no_prefix}
    for cores in sorted({sync_cores(lay) for lay in sync}):
        best = max((lay for lay in sync if sync_cores(lay) == cores and not lay.no_prefix),
                   key=lambda lay: ours_med[lay.name], default=None)
        if best is not None:
            out.setdefault("best_sync_vs_trl_equal_cores", {})[f"{cores} cores"] = {
                "layout": best.name, "ratio": rounded(ratio[best.name], 3)}
    out["compute_matched_vs_trl_equal_cores"] = {
        f"{lay.name} / trl-t{sync_cores(lay)}": rounded(ratio[lay.name], 3) for lay in sync if lay.no_prefix}
    out["off_policy_overlap_vs_trl_best"] = {
        lay.name: rounded(ours_med[lay.name] / trl_med[best_t], 3) for lay in layouts if lay.overlap}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_flags(p)
    p.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="r1omni-ray layouts (bench.grpo_step syntax)")
    p.add_argument("--trl-threads", default="1,2", help="torch thread counts to run TRL at")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every TRL run and layout")
    p.set_defaults(warmup_steps=2)  # both sides: a fresh actor set's first steps are still slow
    args = p.parse_args(argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("bench.compare_trl needs TRL: pip install -e '.[bench]'") from None
    from r1omni_ray.data.processor import OmniProcessor
    from r1omni_ray.engines.vllm_engine import export_lm_dir
    from r1omni_ray.model.loading import load_policy

    wl = workload_from_flags(args)
    layouts = [parse_layout(s, args.rollout_threads, args.learner_threads) for s in args.layouts.split(",") if s.strip()]
    threads = [int(x) for x in args.trl_threads.split(",") if x.strip()]
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        ckpt = build_bench_checkpoint(work / "ckpt", wl.lm, wl.new_tokens, seed=wl.seed)
        proc = OmniProcessor.from_pretrained(ckpt)
        # The same LM weights for TRL (the checkpoint's LM as a plain Qwen2 directory) and the very tokenizer
        # object we use: AutoTokenizer on that directory would pick Qwen2's class for the word-level vocab.
        lm_dir = export_lm_dir(load_policy(str(ckpt), "float32"), proc.tokenizer, work / "lm")
        records = text_only_records(ckpt, wl.prompts, wl.prompt_tokens, seed=wl.seed)
        prompts = [proc.process(r, use_video=False, use_audio=False).prompt for r in records]
        solutions = [r.solution for r in records]
        args.work_dir = str(work / "ours")
        trl_rates: dict[int, list[float]] = {t: [] for t in threads}
        ours_rates: dict[str, list[float]] = {lay.name: [] for lay in layouts}
        emit({"bench": "compare_trl", "kind": "config", "machine": machine_info(), "repeats": args.repeats,
              "workload": {"prompts": wl.prompts, "group_size": wl.group_size, "new_tokens": wl.new_tokens,
                           "prompt_tokens": wl.prompt_tokens, "beta": wl.beta, "lr": wl.lr, "steps": wl.steps,
                           "warmup_steps": wl.warmup_steps, "lm": vars(wl.lm), "labels": BENCH_LABELS},
              "trl": {"threads": threads, "gradient_checkpointing": False}, "layouts": [x.name for x in layouts]})
        for r in range(args.repeats):
            # TRL with no Ray on the machine, then ours with one actor set up at a time: idle Ray workers
            # beside a run took up to 30% off its step here.
            for t in threads:
                res = run_trl_in_own_process(lm_dir, proc.tokenizer, prompts, solutions, wl, t, work / f"trl-t{t}-r{r}")
                trl_rates[t].append(res["completions_per_s"])
                emit(res | {"repeat": r})
            with BenchSystem(args, layouts, bench="compare_trl") as ours:
                for lay in layouts:
                    res = ours.run(lay)
                    ours_rates[lay.name].append(res["completions_per_s"])
                    emit(res | {"repeat": r})
    emit(summarize(trl_rates, ours_rates, layouts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
