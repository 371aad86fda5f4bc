"""RLVR (GRPO) training driver: rollout -> rewards -> old/ref log-probs -> advantages -> update ->
broadcast -> log, on Ray actor pools. Run embedded (`python -m launch.train_rlvr`) or as a Ray job."""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from actors.learner import GLOBALLY_NORMALISED
from actors.pools import ActorPools, shard_for_learners
from actors.rollout import RolloutGroup, usable_groups
from launch.common import Prepared, base_parser, init_ray, parse_config, prepare, run_main, setup_logging
from launch.evaluation import evaluate_records, wait_with_progress
from r1omni_ray.checkpointing import (
    DEEPSPEED_SUBDIR,
    HF_SUBDIR,
    DriverState,
    begin_checkpoint,
    commit_checkpoint,
    latest_checkpoint,
    link_or_copy_tree,
    prune_checkpoints,
    read_state,
    step_name,
)
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
            bar.set_postfix(reward=f"{metrics.get('reward/total_mean', float('nan')):.3f}",
                            acc=f"{metrics.get('accuracy', float('nan')):.3f}")
            if not overlap and self.step < total:
                pending = self.submit(self.step)
            self.after_step()
        bar.close()
        return self.history

    def after_step(self) -> None:
        """Periodic evaluation, then periodic checkpoints (after everything this step logs, so the saved
        W&B step counter is final). The end-of-run eval and checkpoint are run_rlvr's."""
        tc, every = self.cfg.train, self.cfg.checkpoint.every
        if tc.eval_every > 0 and self.eval_records and self.step % tc.eval_every == 0 and self.step < tc.steps:
            ev = evaluate_records(self.pools, self.eval_records, self.labels, self.cfg.rollout.max_new_tokens,
                                  self.cfg.data.use_video, self.cfg.data.use_audio)
            self.logger.log({"eval/war": ev.metrics.war, "eval/uar": ev.metrics.uar,
                             "eval/format_rate": ev.format_rate}, step=self.step)
        if self.checkpointer is not None and every > 0 and self.step % every == 0 and self.step < tc.steps:
            self.checkpointer.save(self)

    def train_on(self, groups: list[RolloutGroup]) -> dict[str, float]:
        cfg = self.cfg
        # Bad media: logged and counted (data.on_error=skip) or a DataError naming the file (raise).
        groups, data_errors = usable_groups(groups, cfg.data.on_error)
        if not groups:
            log.warning("step %d: every record failed to load; no update this step", self.step + 1)
            return {"data/skipped_records": float(len(data_errors)), "data/skipped_steps": 1.0}
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
        for k, v in rb.errors.items():
            if v:
                log.warning("step %d: reward %r failed on %d samples (they score 0): %s", self.step + 1, k, v,
                            rb.error_examples.get(k, "?"))
        if m.get("learner/skipped_update"):
            log.warning("step %d: non-finite loss or gradient on a learner; update skipped on every rank, "
                        "weights unchanged", self.step + 1)
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
        self.logger.log_table("completions", cols, rows, self.step + 1)  # not "samples": a metric has that key

    def log(self, m: dict[str, float]) -> None:
        nan = float("nan")  # a step whose records all failed to load has no reward/response metrics
        m = dict(m, step=float(self.step))
        self.history.append(m)
        self.logger.log(m, step=self.step)
        log.info(
            "step %d | reward %.3f acc %.3f fmt %.3f | kl %.4f loss %.4f | len %.1f | %.1fs",
            self.step, m.get("reward/total_mean", nan), m.get("accuracy", nan), m.get("format_rate", nan),
            m.get("learner/kl", 0.0), m.get("learner/loss", 0.0), m.get("response/length_mean", nan), m["time/step"],
        )


def load_split(path: str | None, labels: list[str], cfg: RunConfig) -> list[Any] | None:
    if path is None:
        return None
    res = load_records(path, root=cfg.data.root, label_set=labels, on_error=cfg.data.on_error)
    for idx, reason in res.skipped:
        log.warning("%s: skipped record %d: %s", path, idx, reason)
    return res.records


class Checkpointer:
    """Writes ``<out>/checkpoints/step_N`` atomically: every learner's DeepSpeed state (a collective save;
    on a multi-node cluster output_dir must be a shared filesystem, each rank writes its own shards) plus
    the driver state, then moves ``latest`` and prunes to ``checkpoint.keep_last``."""

    def __init__(self, cfg: RunConfig, pools: ActorPools, out: Path, init_ckpt: str, logger: RunLogger) -> None:
        self.cfg, self.pools, self.out, self.init_ckpt, self.logger = cfg, pools, out, init_ckpt, logger
        self.last: Path | None = None

    def save(self, trainer: RLVRTrainer, with_hf: bool = False) -> Path:
        import ray

        t0 = time.perf_counter()
        step, tag = trainer.step, step_name(trainer.step)
        tmp = begin_checkpoint(self.out, step)
        ray.get([lr.save_checkpoint.remote(str(tmp / DEEPSPEED_SUBDIR), tag) for lr in self.pools.learners])
        sums = ray.get([lr.weights_checksum.remote() for lr in self.pools.learners])
        if with_hf:
            ray.get([lr.save_hf.remote(str(tmp / HF_SUBDIR)) for lr in self.pools.learners])
        state = DriverState(
            step=step, seed=self.cfg.train.seed, weight_version=self.pools.version,
            prompts_per_step=self.cfg.train.prompts_per_step, num_records=len(trainer.records),
            init_ckpt=self.init_ckpt, wandb_run_id=self.logger.run_id, wandb_step=self.logger.wandb_step,
            deepspeed_tag=tag, weights_checksum=sums,
        )
        self.last = commit_checkpoint(self.out, step, state)
        removed = prune_checkpoints(self.out, self.cfg.checkpoint.keep_last)
        log.info("checkpoint %s (weight version %d) in %.1fs%s", self.last, state.weight_version,
                 time.perf_counter() - t0, f"; pruned {[r.name for r in removed]}" if removed else "")
        return self.last


def resume_state(cfg: RunConfig, out: Path, resume: str | bool, num_records: int) -> tuple[Path, DriverState]:
    """The checkpoint to continue from (``latest`` or an explicit dir) and its driver state, checked
    against the config: the data order is a function of (seed, prompts_per_step, dataset size)."""
    ck = latest_checkpoint(out) if resume is True or resume == "latest" else Path(str(resume))
    if ck is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    state = read_state(ck)
    got = (state.seed, state.prompts_per_step, state.num_records)
    want = (cfg.train.seed, cfg.train.prompts_per_step, num_records)
    if got != want:
        raise ValueError(f"{ck}: saved (seed, prompts_per_step, records) {got} != this run's {want}; "
                         "resuming would change the data order")
    return ck, state


def run_rlvr(cfg: RunConfig, prepared: Prepared | None = None, init_ckpt: str | None = None,
             logger: RunLogger | None = None, eval_before: bool = False,
             resume: str | bool = False) -> dict[str, Any]:
    """resume: False, True/"latest" (``<output_dir>/checkpoints/latest``) or a checkpoint dir."""
    import ray

    init_ray(cfg)
    prep = prepared or prepare(cfg)
    out = Path(cfg.train.output_dir)
    records = load_split(prep.train_path, prep.labels, cfg)
    eval_records = load_split(prep.eval_path, prep.labels, cfg)
    ck_dir, state = resume_state(cfg, out, resume, len(records)) if resume else (None, None)
    if state is not None and init_ckpt and str(Path(init_ckpt).resolve()) != state.init_ckpt:
        log.warning("--resume: learners start from the saved init checkpoint %s, not %s", state.init_ckpt, init_ckpt)
    # A resumed run rebuilds the learners (and the frozen reference) from the same init checkpoint.
    ckpt = state.init_ckpt if state is not None else str(Path(init_ckpt or prep.ckpt_dir).resolve())
    own_logger = logger is None
    logger = logger or RunLogger(out, cfg.wandb, cfg.to_dict(), resume_id=state.wandb_run_id if state else None,
                                 wandb_step=state.wandb_step if state else 0)
    pools = ActorPools(cfg, ckpt, str(out), prep.labels)
    try:
        result: dict[str, Any] = {}
        if state is not None and ck_dir is not None:
            ray.get([lr.load_checkpoint.remote(str(ck_dir / DEEPSPEED_SUBDIR), state.deepspeed_tag)
                     for lr in pools.learners])
            sums = ray.get([lr.weights_checksum.remote() for lr in pools.learners])
            if state.weights_checksum and sums != state.weights_checksum:
                raise RuntimeError(f"{ck_dir}: loaded learner weights differ from the saved ones "
                                   f"({sums} != {state.weights_checksum})")
            pools.broadcast(state.weight_version)  # workers now hold exactly the saved policy
            log.info("resumed from %s: step %d, weight version %d", ck_dir, state.step, state.weight_version)
            result["resumed_from"] = str(ck_dir)
            result["resume_check"] = {"saved": state.weights_checksum, "loaded": sums}
        trainer = RLVRTrainer(cfg, pools, records, eval_records, prep.labels, logger,
                              start_step=state.step if state else 0)
        trainer.checkpointer = Checkpointer(cfg, pools, out, ckpt, logger)
        if eval_before and eval_records and state is None:
            ev = evaluate_records(pools, eval_records, prep.labels, cfg.rollout.max_new_tokens,
                                  cfg.data.use_video, cfg.data.use_audio)
            result["eval_before"] = ev.metrics.to_dict() | {"format_rate": ev.format_rate}
            logger.log({"eval/war": ev.metrics.war, "eval/uar": ev.metrics.uar, "eval/format_rate": ev.format_rate},
                       step=0)
        result["history"] = trainer.fit()
        result["batches"] = dict(trainer.batches)
        if eval_records:
            ev = evaluate_records(pools, eval_records, prep.labels, cfg.rollout.max_new_tokens,
                                  cfg.data.use_video, cfg.data.use_audio)
            result["eval"] = ev.metrics.to_dict() | {"format_rate": ev.format_rate}
            logger.log({"eval/war": ev.metrics.war, "eval/uar": ev.metrics.uar, "eval/format_rate": ev.format_rate},
                       step=trainer.step)
            logger.summary({"eval/war": ev.metrics.war, "eval/uar": ev.metrics.uar})
        # End of run: a full checkpoint with an HF export; final_model shares its files (hard links).
        final_ckpt = trainer.checkpointer.save(trainer, with_hf=True)
        final_dir = out / "final_model"
        link_or_copy_tree(final_ckpt / HF_SUBDIR, final_dir)
        result["checkpoint"] = str(final_ckpt)
        result["final_model"] = str(final_dir)
        result["weight_version"] = pools.version
        result["wandb_run_id"] = logger.run_id
        return result
    finally:
        pools.shutdown()
        if own_logger:
            logger.finish()


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = base_parser(__doc__ or "")
    parser.add_argument("--init-ckpt", default=None, help="start from this HF-format checkpoint (e.g. the SFT output)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <output_dir>/checkpoints/latest with the same data order, weight "
                             "version and W&B run")
    parser.add_argument("--resume-from", default=None, metavar="CKPT_DIR",
                        help="like --resume, from this checkpoint dir (<output_dir>/checkpoints/step_N)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    cfg = parse_config(args)
    res = run_rlvr(cfg, init_ckpt=args.init_ckpt, resume=args.resume_from or args.resume)
    if "eval" in res:
        e = res["eval"]
        print(f"eval WAR {e['war']:.3f} UAR {e['uar']:.3f} format {e['format_rate']:.3f}")
    print(f"final model: {res['final_model']}")
    return 0


if __name__ == "__main__":
    run_main(main)
