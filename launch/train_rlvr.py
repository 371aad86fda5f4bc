"""RLVR (GRPO) training driver: rollout -> rewards -> old/ref log-probs -> advantages -> update ->
broadcast -> log, on Ray actor pools. Run embedded (`python -m launch.train_rlvr`) or as a Ray job."""

from __future__ import annotations

import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from actors.learner import GLOBALLY_NORMALISED
from actors.pools import ActorPools, shard_for_learners
from actors.rollout import RolloutGroup
from launch.common import Prepared, base_parser, init_ray, parse_config, prepare, setup_logging
from launch.evaluation import evaluate_records, wait_with_progress
from r1omni_ray.completions import split_reasoning
from r1omni_ray.config import RunConfig
from r1omni_ray.data.records import load_records
from r1omni_ray.data.sampler import batch_indices
from r1omni_ray.engines.base import SamplingParams
from r1omni_ray.grpo import group_advantages
from r1omni_ray.tracking import RunLogger, progress

log = logging.getLogger("r1omni_ray")


class RLVRTrainer:
    def __init__(self, cfg: RunConfig, pools: ActorPools, records: list[Any], eval_records: list[Any] | None,
                 labels: list[str], logger: RunLogger, start_step: int = 0) -> None:
        self.cfg, self.pools, self.records, self.eval_records = cfg, pools, records, eval_records
        self.labels, self.logger = labels, logger
        self.step = start_step
        self.history: list[dict[str, float]] = []
        self.batches: dict[int, list[str]] = {}  # step index -> record ids of its prompts
        self.checkpointer: Checkpointer | None = None
        rc = cfg.rollout
        self.params = SamplingParams(n=rc.group_size, temperature=rc.temperature, top_p=rc.top_p,
                                     max_new_tokens=rc.max_new_tokens)

    def items_for(self, step: int) -> list[tuple[int, Any]]:
        idx = batch_indices(len(self.records), self.cfg.train.prompts_per_step, step, self.cfg.train.seed)
        return [(uid, self.records[i]) for uid, i in enumerate(idx)]

    def submit(self, step: int):
        d = self.cfg.data
        return self.pools.submit_rollout(self.items_for(step), self._params_for(step), d.use_video, d.use_audio)

    def _params_for(self, step: int) -> SamplingParams:
        p = self.params
        return SamplingParams(p.n, p.temperature, p.top_p, p.max_new_tokens, seed=self.cfg.train.seed * 100003 + step)

    def fit(self) -> list[dict[str, float]]:
        total = self.cfg.train.steps
        pending = self.submit(self.step) if self.step < total else None
        bar = progress(total=total, initial=min(self.step, total), desc="RLVR", unit="step", leave=True)
        while self.step < total:
            t0 = time.perf_counter()
            d = self.cfg.data
            wait_with_progress(pending, f"rollout {self.step + 1}")
            groups = self.pools.collect_rollout(pending, self._params_for(self.step), d.use_video, d.use_audio)
            t_roll = time.perf_counter() - t0
            # The records of each step, in order: what a resumed run must reproduce.
            self.batches[self.step] = [g.record_id for g in groups]
            # One-step off-policy: the next rollout runs on the workers while the learners update.
            overlap = self.cfg.train.overlap and self.step + 1 < total
            pending = self.submit(self.step + 1) if overlap else None
            metrics = self.train_on(groups)
            metrics["time/rollout"] = t_roll
            metrics["time/step"] = time.perf_counter() - t0
            n_tokens = metrics.pop("_tokens", 0.0)
            metrics["throughput/tokens_per_s"] = n_tokens / metrics["time/step"]
            metrics["throughput/samples_per_s"] = metrics.get("samples", 0.0) / metrics["time/step"]
            self.step += 1
            self.log(metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/total_mean']:.3f}", acc=f"{metrics['accuracy']:.3f}")
            if not overlap and self.step < total:
                pending = self.submit(self.step)
            self.after_step()
        bar.close()
        return self.history

    def after_step(self) -> None:
        """Periodic checkpoints (the end-of-run one is written by run_rlvr, with an HF export)."""
        every = self.cfg.checkpoint.every
        if self.checkpointer is not None and every > 0 and self.step % every == 0 and self.step < self.cfg.train.steps:
            self.checkpointer.save(self)

    def train_on(self, groups: list[RolloutGroup]) -> dict[str, float]:
        cfg = self.cfg
        data_errors = [g for g in groups if g.error is not None]
        for g in data_errors:
            log.warning("skipped record %s: %s", g.record_id, g.error)
        groups = [g for g in groups if g.error is None and g.completions]
        if not groups:
            raise RuntimeError("every record of this step failed to load; see the warnings above")
        texts = [c.text for g in groups for c in g.completions]
        sols = [g.inputs.solution for g in groups for c in g.completions]
        t = time.perf_counter()
        rb = self.pools.score(texts, sols)
        t_reward = time.perf_counter() - t
        G = cfg.rollout.group_size
        rewards = torch.tensor(rb.total, dtype=torch.float32)
        adv = group_advantages(rewards, G, scale=cfg.grpo.advantage_scale, eps=cfg.grpo.advantage_eps)
        batches, num_micro = shard_for_learners(groups, adv.tolist(), cfg.learner.num_learners, cfg.learner.micro_batch_size)
        t = time.perf_counter()
        lps = self.pools.learner_call("compute_logprobs", batches, num_micro)
        for b, lp in zip(batches, lps, strict=True):
            b.old_logp = lp["old"]
            b.ref_logp = lp["ref"] or None
        t_logprob = time.perf_counter() - t
        lens = [len(c.token_ids) for g in groups for c in g.completions]
        t = time.perf_counter()
        outs = self.pools.learner_call(
            "train_step", batches, num_micro, sum(lens), len(lens), cfg.rollout.max_new_tokens
        )
        t_update = time.perf_counter() - t
        version = self.pools.version + 1
        bc = self.pools.broadcast(version)
        m: dict[str, float] = {}
        m["reward/total_mean"] = float(rewards.mean())
        for name, vals in rb.per_reward.items():
            m[f"reward/{name}_mean"] = statistics.fmean(vals) if vals else 0.0
        m["accuracy"] = m.get("reward/accuracy_mean", 0.0)
        m["format_rate"] = m.get("reward/format_mean", 0.0)
        grouped = rewards.view(-1, G)
        std = grouped.std(dim=1, unbiased=True) if G > 1 else torch.zeros(grouped.shape[0])
        m["reward/group_std_mean"] = float(std.mean())
        m["reward/zero_std_group_frac"] = float((std < 1e-6).float().mean())
        m["adv/mean"], m["adv/std"] = float(adv.mean()), float(adv.std()) if adv.numel() > 1 else 0.0
        m["adv/min"], m["adv/max"] = float(adv.min()), float(adv.max())
        for k in outs[0]:
            vals = [o[k] for o in outs]
            m[f"learner/{k}"] = sum(vals) if k in GLOBALLY_NORMALISED else statistics.fmean(vals)
        m["response/length_mean"] = statistics.fmean(lens)
        m["response/length_max"] = float(max(lens))
        m["response/clipped_frac"] = sum(c.finish_reason == "length" for g in groups for c in g.completions) / len(lens)
        m["time/reward"], m["time/logprob"], m["time/update"] = t_reward, t_logprob, t_update
        m["time/broadcast"] = bc["broadcast_wall_s"]
        m["weight_version"] = float(version)
        m["weight_version_lag"] = float(version - 1 - min(g.weight_version for g in groups))
        m["samples"] = float(len(lens))
        m["data/skipped_records"] = float(len(data_errors))
        m["reward/errors"] = float(sum(rb.errors.values()))
        for k, v in rb.diagnostics.items():
            m[f"reward/diag_{k}"] = float(v)
        m["faults/worker_restarts"] = float(self.pools.stats.worker_restarts)
        m["faults/reissued_prompts"] = float(self.pools.stats.reissued_prompts)
        m["_tokens"] = float(sum(lens))
        self._samples_table(groups, rb)
        return m

    def _samples_table(self, groups: list[RolloutGroup], rb) -> None:
        n = self.cfg.train.log_samples
        if n <= 0:
            return
        rows, k = [], 0
        names = list(rb.per_reward)
        for g in groups:
            for c in g.completions:
                if len(rows) < n and c is g.completions[0]:
                    parsed = split_reasoning(c.text)
                    rows.append([g.record_id, g.inputs.label, parsed.answer, parsed.reasoning, c.text, rb.total[k]]
                                + [rb.per_reward[x][k] for x in names])
                k += 1
        cols = ["id", "label", "prediction", "reasoning", "completion", "reward"] + names
        self.logger.log_table("samples", cols, rows, self.step + 1)

    def log(self, m: dict[str, float]) -> None:
        m = dict(m, step=float(self.step))
        self.history.append(m)
        self.logger.log(m, step=self.step)
        log.info(
            "step %d | reward %.3f acc %.3f fmt %.3f | kl %.4f loss %.4f | len %.1f | %.1fs",
            self.step, m["reward/total_mean"], m["accuracy"], m["format_rate"], m.get("learner/kl", 0.0),
            m.get("learner/loss", 0.0), m["response/length_mean"], m["time/step"],
        )


def load_split(path: str | None, labels: list[str], cfg: RunConfig) -> list[Any] | None:
    if path is None:
        return None
    res = load_records(path, root=cfg.data.root, label_set=labels, on_error=cfg.data.on_error)
    for idx, reason in res.skipped:
        log.warning("%s: skipped record %d: %s", path, idx, reason)
    return res.records


def run_rlvr(cfg: RunConfig, prepared: Prepared | None = None, init_ckpt: str | None = None,
             logger: RunLogger | None = None, eval_before: bool = False) -> dict[str, Any]:
    init_ray(cfg)
    prep = prepared or prepare(cfg)
    ckpt = init_ckpt or prep.ckpt_dir
    out = Path(cfg.train.output_dir)
    records = load_split(prep.train_path, prep.labels, cfg)
    eval_records = load_split(prep.eval_path, prep.labels, cfg)
    own_logger = logger is None
    logger = logger or RunLogger(out, cfg.wandb, cfg.to_dict())
    pools = ActorPools(cfg, ckpt, str(out), prep.labels)
    try:
        trainer = RLVRTrainer(cfg, pools, records, eval_records, prep.labels, logger)
        result: dict[str, Any] = {}
        if eval_before and eval_records:
            ev = evaluate_records(pools, eval_records, prep.labels, cfg.rollout.max_new_tokens,
                                  cfg.data.use_video, cfg.data.use_audio)
            result["eval_before"] = ev.metrics.to_dict() | {"format_rate": ev.format_rate}
            logger.log({"eval/war": ev.metrics.war, "eval/uar": ev.metrics.uar, "eval/format_rate": ev.format_rate},
                       step=0)
        result["history"] = trainer.fit()
        if eval_records:
            ev = evaluate_records(pools, eval_records, prep.labels, cfg.rollout.max_new_tokens,
                                  cfg.data.use_video, cfg.data.use_audio)
            result["eval"] = ev.metrics.to_dict() | {"format_rate": ev.format_rate}
            logger.log({"eval/war": ev.metrics.war, "eval/uar": ev.metrics.uar, "eval/format_rate": ev.format_rate},
                       step=trainer.step)
        final_dir = out / "final_model"
        import ray

        ray.get([lr.save_hf.remote(str(final_dir)) for lr in pools.learners])
        result["final_model"] = str(final_dir)
        return result
    finally:
        pools.shutdown()
        if own_logger:
            logger.finish()


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = base_parser(__doc__ or "")
    parser.add_argument("--init-ckpt", default=None, help="start from this HF-format checkpoint (e.g. the SFT output)")
    args = parser.parse_args(argv)
    cfg = parse_config(args)
    res = run_rlvr(cfg, init_ckpt=args.init_ckpt)
    if "eval" in res:
        e = res["eval"]
        print(f"eval WAR {e['war']:.3f} UAR {e['uar']:.3f} format {e['format_rate']:.3f}")
    print(f"final model: {res['final_model']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
