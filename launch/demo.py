"""The embedded end-to-end demo: synthetic data -> cold-start SFT -> RLVR (GRPO) -> evaluation, on a local
Ray with a tiny model. Prints how the accuracy reward and eval WAR/UAR moved."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from launch.common import base_parser, init_ray, parse_config, prepare, run_main, setup_logging
from launch.preflight import preflight
from launch.train_rlvr import run_rlvr
from launch.train_sft import run_sft
from r1omni_ray.tracking import RunLogger


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = base_parser(__doc__ or "")
    parser.set_defaults(config=str(Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"))
    args = parser.parse_args(argv)
    cfg = parse_config(args)
    t0 = time.time()
    # The demo always starts afresh in its output dir (its synthetic data and init model are kept).
    preflight(cfg, overwrite=True)
    prep = prepare(cfg)
    init_ray(cfg)
    out = Path(cfg.train.output_dir)
    logger = RunLogger(out, cfg.wandb, cfg.to_dict(), job_type="demo")
    try:
        sft_ckpt = run_sft(cfg, prep, logger=logger)
        t_sft = time.time() - t0
        res = run_rlvr(cfg, prep, init_ckpt=sft_ckpt, logger=logger, eval_before=True)
    finally:
        logger.finish()
    hist = res["history"]
    k = max(1, len(hist) // 3)
    first = statistics.fmean(h["accuracy"] for h in hist[:k])
    last = statistics.fmean(h["accuracy"] for h in hist[-k:])
    fmt_last = statistics.fmean(h["format_rate"] for h in hist[-k:])
    summary = {
        "sft_seconds": round(t_sft, 1),
        "total_seconds": round(time.time() - t0, 1),
        "rlvr_steps": len(hist),
        f"accuracy_reward_first_{k}_steps": round(first, 3),
        f"accuracy_reward_last_{k}_steps": round(last, 3),
        f"format_reward_last_{k}_steps": round(fmt_last, 3),
        "eval_before_rlvr": {k2: res["eval_before"][k2] for k2 in ("war", "uar", "format_rate")},
        "eval_after_rlvr": {k2: res["eval"][k2] for k2 in ("war", "uar", "format_rate")},
        "final_model": res["final_model"],
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
