"""Cold-start SFT on the DeepSpeed learner actors (R1-Omni: EMER + HumanOmni samples with reasoning),
producing the HF-format checkpoint that RLVR starts from."""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path

import numpy as np

from actors.learner_group import LearnerGroup
from launch.common import Prepared, base_parser, init_ray, parse_config, prepare, run_main, setup_logging
from launch.preflight import preflight
from launch.splits import load_split
from r1omni_ray.config import ConfigError, RunConfig
from r1omni_ray.data.bad_records import FILE_NAME as BAD_RECORDS_FILE
from r1omni_ray.data.bad_records import BadRecords
from r1omni_ray.data.errors import DataError
from r1omni_ray.data.sampler import shared_micro_batches, split_even
from r1omni_ray.tracking import RunLogger, progress

log = logging.getLogger("r1omni_ray")


def run_sft(cfg: RunConfig, prepared: Prepared | None = None, logger: RunLogger | None = None) -> str:
    prep = prepared or prepare(cfg)
    if not prep.sft_path:
        raise ConfigError("data.sft_path: the SFT stage needs a dataset with reasoning responses")
    records = load_split(prep.sft_path, prep.labels, cfg)  # read and checked before Ray starts
    init_ray(cfg)
    out = Path(cfg.train.output_dir) / "sft_model"
    own_logger = logger is None
    logger = logger or RunLogger(Path(cfg.train.output_dir), cfg.wandb, cfg.to_dict(), job_type="sft")
    # SFT needs only the learners: the SFT learning rate, no reference model.
    learners = LearnerGroup(cfg, prep.ckpt_dir, lr=cfg.sft.lr, with_reference=False)
    n = cfg.learner.num_learners
    bad = BadRecords(Path(cfg.train.output_dir) / BAD_RECORDS_FILE, "sft")  # the run's list (skipped_records.jsonl)
    step = 0
    bar = progress(total=cfg.sft.epochs * math.ceil(len(records) / cfg.sft.batch_size), desc="SFT", unit="batch",
                   leave=True)
    try:
        for epoch in range(cfg.sft.epochs):
            order = np.random.default_rng([cfg.train.seed, 7919, epoch]).permutation(len(records))
            losses = []
            for start in range(0, len(order), cfg.sft.batch_size):
                # records known not to decode are left out, never decoded again (bad.add_all below)
                batch = [records[i] for i in order[start : start + cfg.sft.batch_size] if records[i].id not in bad]
                bar.update(1)
                if len(batch) < n:
                    continue
                parts = split_even(len(batch), n)
                num_micro = shared_micro_batches(parts, cfg.learner.micro_batch_size)
                outs = learners.sft([[batch[j] for j in p] for p in parts], num_micro, cfg.data.use_video,
                                    cfg.data.use_audio)
                errors = [o["error"] for o in outs if "error" in o]
                if errors:  # data.on_error=raise: every rank stopped before training on the batch
                    raise DataError(next((e for e in errors if e), "an SFT record failed to load") +
                                    " [data.on_error=raise; data.on_error=skip skips such records]")
                new = bad.add_all(((rid, reason) for o in outs
                                   for rid, reason in zip(o["skipped_ids"], o["skipped_reasons"], strict=True)),
                                  step=step)
                for o in outs:  # named once a run: a learner keeps a bad record's failure, later epochs repeat it
                    for rid, reason in zip(o["skipped_ids"], o["skipped_reasons"], strict=True):
                        if rid in new:
                            log.warning("SFT: skipped %s", reason)
                loss = sum(o["sft_loss"] for o in outs)
                acc = statistics.fmean(o["sft_token_acc"] for o in outs)
                losses.append(loss)
                logger.log({"sft/loss": loss, "sft/token_acc": acc, "sft/epoch": epoch, "sft/step": step,
                            "sft/skipped_records": float(len(new)), "sft/known_bad_records": float(len(bad))},
                           step=step)
                step += 1
                bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
            log.info("SFT epoch %d: mean loss %.4f", epoch, statistics.fmean(losses) if losses else float("nan"))
        bar.close()
        learners.save_hf(str(out))
    finally:
        learners.shutdown()
        if own_logger:
            logger.finish()
    return str(out)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = base_parser(__doc__ or "")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run's outputs in train.output_dir (refused without it)")
    args = parser.parse_intermixed_args(argv)
    cfg = parse_config(args)
    preflight(cfg, overwrite=args.overwrite)
    print(f"SFT model: {run_sft(cfg)}")
    return 0


if __name__ == "__main__":
    run_main(main)
