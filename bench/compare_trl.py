"""TRL's GRPOTrainer and r1omni-ray on the identical text workload, back to back in one invocation.

The workload is bench.grpo_step's: a random-init tiny Qwen2 (hidden 256, 4 layers by default) with the
locally built chat tokenizer, 16 rendered prompts per step, G=8 completions of exactly --new-tokens tokens
(eos masked until then, pad never sampled), beta 0.04 with a frozen reference, AdamW at one optimizer
step per batch, accuracy + format rewards. TRL gets the very same LM weights (the LM part of our
checkpoint, written as a plain Qwen2 directory), the same prompt strings and the same reward functions,
and runs in this process at each of --trl-threads torch thread counts; r1omni-ray runs its layouts
(--layouts) on local Ray through the real actors. Each side's step time is the median over the measured
steps after --warmup-steps; TRL's is timed from its trainer callbacks (generation, scoring, reference and
policy passes and the optimizer step all fall inside a step).

Needs the optional `bench` extra (pip install -e '.[bench]'): TRL is never a runtime dependency.
Run: python -m bench.compare_trl   (a JSON line per TRL thread count and per layout, then the ratio)
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
from bench.grpo_step import Workload, add_workload_flags, parse_layout, run_benchmark, workload_from_flags

DEFAULT_LAYOUTS = "1w1l-sync,1w1l-overlap,1w2l-overlap"


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
            "step_s_median": rounded(step), "completions_per_s": rounded(per_step / step),
            "step_s_all": [rounded(s, 3) for s in measured],
            "completion_tokens_mean": rounded(median(lengths)) if lengths else None,
            "prompt_tokens": sorted({len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_flags(p)
    p.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="r1omni-ray layouts (bench.grpo_step syntax)")
    p.add_argument("--trl-threads", default="1,2", help="torch thread counts to run TRL at")
    args = p.parse_args(argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("bench.compare_trl needs TRL: pip install -e '.[bench]'") from None
    from r1omni_ray.data.processor import OmniProcessor
    from r1omni_ray.engines.vllm_engine import export_lm_dir
    from r1omni_ray.model.loading import load_policy

    wl = workload_from_flags(args)
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
        emit({"bench": "compare_trl", "kind": "config", "machine": machine_info(),
              "workload": {"prompts": wl.prompts, "group_size": wl.group_size, "new_tokens": wl.new_tokens,
                           "beta": wl.beta, "lr": wl.lr, "steps": wl.steps, "warmup_steps": wl.warmup_steps,
                           "lm": vars(wl.lm), "labels": BENCH_LABELS}})
        trl_runs = []
        for t in [int(x) for x in args.trl_threads.split(",") if x.strip()]:
            trl_runs.append(run_trl(lm_dir, proc.tokenizer, prompts, solutions, wl, t, work / f"trl-t{t}"))
            emit(trl_runs[-1])
        torch.set_num_threads(max(1, args.driver_threads))
        args.work_dir = str(work / "ours")
        layouts = [parse_layout(s, args.rollout_threads, args.learner_threads) for s in args.layouts.split(",")]
        ours = run_benchmark(args, layouts, bench="compare_trl")
    best_trl = max(trl_runs, key=lambda r: r["completions_per_s"])
    best_ours = max(ours, key=lambda r: r["completions_per_s"])
    emit({"bench": "compare_trl", "kind": "summary",
          "trl_best": {"threads": best_trl["threads"], "completions_per_s": best_trl["completions_per_s"]},
          "ours_best": {"layout": best_ours["layout"], "completions_per_s": best_ours["completions_per_s"]},
          "speedup_vs_trl_best": rounded(best_ours["completions_per_s"] / best_trl["completions_per_s"], 3),
          "ours_by_layout": {r["layout"]: r["completions_per_s"] for r in ours},
          "trl_by_threads": {r["threads"]: r["completions_per_s"] for r in trl_runs}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
