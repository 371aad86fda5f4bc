"""RLVR (GRPO) training driver: rollout -> rewards -> advantages -> one learner call (reference log-probs,
update) -> broadcast -> log, on Ray role groups. Run embedded (`python -m launch.train_rlvr`) or as a Ray job."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from actors.batch_pipeline import BatchPipeline, StepBatch
from actors.calls import ActorCallError, wire_bytes
from actors.evaluation import EvalResult, evaluate_records
from actors.groups import RLVRGroups
from actors.learner_group import lost_learners, shard_for_learners
from actors.placement import CapacityError
from actors.rollout import PromptSamples
from actors.scale_control import ScaleChannel
from launch.checkpointer import Checkpointer, resume_state
from launch.common import Prepared, base_parser, init_ray, parse_config, prepare, run_main, setup_logging
from launch.preflight import preflight
from launch.splits import load_split, load_split_counted
from r1omni_ray.checkpointing import HF_SUBDIR, link_or_copy_tree
from r1omni_ray.completions import split_reasoning
from r1omni_ray.config import RunConfig, check_rlvr
from r1omni_ray.data.bad_records import FILE_NAME as BAD_RECORDS_FILE
from r1omni_ray.data.bad_records import BadRecords
from r1omni_ray.learner.grpo_update import StepSpec, mini_batch_counts
from r1omni_ray.learner.old_logprobs import old_logprob_source
from r1omni_ray.rollout_correction import modality_tag
from r1omni_ray.step_metrics import (
    advantage_metrics,
    learner_metrics,
    response_metrics,
    reward_metrics,
    staleness_metrics,
)
from r1omni_ray.timing import PhaseTimer
from r1omni_ray.tracking import RunLogger, progress, truncate_step_log

log = logging.getLogger("r1omni_ray")


class RLVRTrainer:
    def __init__(self, cfg: RunConfig, groups: RLVRGroups, records: list[Any], eval_records: list[Any] | None,
                 labels: list[str], logger: RunLogger, start_step: int = 0, skipped_at_load: int = 0,
                 checkpointer: Checkpointer | None = None, scale: ScaleChannel | None = None,
                 pipeline_state: dict[str, Any] | None = None) -> None:
        """skipped_at_load: records dropped when the dataset was read (counted on every row). checkpointer:
        periodic checkpoints, and what a lost learner group is restored from (without one a lost learner ends
        the run). scale: the run's scale channel, served at every step."""
        self.cfg, self.groups, self.records, self.eval_records = cfg, groups, records, eval_records
        self.labels, self.logger = labels, logger
        self.step = start_step
        self.history: list[dict[str, float]] = []
        self.batches: dict[int, list[str]] = {}  # step index -> record ids of its prompts
        self.checkpointer, self.scale = checkpointer, scale
        self.learner_restarts = 0
        self.skipped_at_load = skipped_at_load
        self.timer = PhaseTimer()
        # Records that fail to decode, remembered for the run and across --resume (the run dir's list).
        bad = BadRecords(Path(cfg.train.output_dir) / BAD_RECORDS_FILE, "rlvr", start_step if start_step else None)
        self.pipeline = BatchPipeline(cfg, groups, records, self.timer, bad)
        self.pipeline.restore(pipeline_state, start_step)
        self._table: tuple[list[str], list[list[Any]]] | None = None  # this step's sample table
        self._diag_keys: set[str] = set()
        self._tokens = 0.0  # completion tokens trained on in the step being logged

    def fit(self, steps: int | None = None) -> list[dict[str, float]]:
        """Train until ``steps`` steps are done in all (default train.steps); call again to go on (benchmarks:
        warm-up steps, then the measured ones). Returns the history of every step so far. A lost learner
        group is restored in the job (learner.max_restarts); too few rollout workers for too long stops the
        run with a checkpoint to resume from."""
        total = self.cfg.train.steps if steps is None else steps
        bar = progress(total=total, initial=min(self.step, total), desc="RLVR", unit="step", leave=True)
        try:
            while self.step < total:
                try:
                    self._fit_step(total)
                except ActorCallError as e:
                    if not self._may_restart_learners(e):
                        raise
                    self._restart_learners(e)
                    bar.n = self.step
                    bar.refresh()
                    continue
                bar.update(1)
                h = self.history[-1]
                bar.set_postfix(reward=f"{h.get('reward/total_mean', float('nan')):.3f}",
                                acc=f"{h.get('accuracy', float('nan')):.3f}")
        except CapacityError as e:
            raise self._stop_for_capacity(e) from e
        finally:
            bar.close()
        return self.history

    def _fit_step(self, total: int) -> None:
        """One step: its batch from the pipeline, rollouts ahead within the staleness window, the update, the
        membership boundary, the broadcast, the log and the periodic work."""
        t0 = time.perf_counter()
        if self.scale is not None:
            self.scale.serve(self.groups.rollout, self.step)
        self.pipeline.fill(self.step, total)
        batch = self.pipeline.next_batch(self.step, self.groups.sync.version)
        # The records of each step, in order: what a resumed run must reproduce.
        self.batches[self.step] = [g.record_id for g in sorted(batch.samples + batch.skipped, key=lambda g: g.uid)]
        metrics = self.train_on(batch)
        metrics |= self.timer.reset()
        metrics["time/step"] = time.perf_counter() - t0
        metrics["throughput/tokens_per_s"] = self._tokens / metrics["time/step"]
        metrics["throughput/samples_per_s"] = metrics.get("samples", 0.0) / metrics["time/step"]
        self.step += 1
        self.log(metrics)  # before anything that can stop the run: a checkpoint never holds an unlogged step
        self.pipeline.fill(self.step, total)  # the window moves with the new weights
        self.after_step()

    def _may_restart_learners(self, e: ActorCallError) -> bool:
        """A learner died (not merely raised), and restarts are left and possible."""
        if not e.actor.startswith("learner-") or self.checkpointer is None:
            return False
        lost = lost_learners(self.groups.learners)
        if not lost:
            return False
        if self.learner_restarts >= self.cfg.learner.max_restarts:
            log.error("learners %s lost; learner.max_restarts=%d restarts already used", lost,
                      self.cfg.learner.max_restarts)
            return False
        return True

    def _restart_learners(self, e: ActorCallError) -> None:
        """Rebuild the learner group from the latest checkpoint and replay the steps since, exactly as
        --resume would: rows logged after it are dropped (W&B keeps its run and counts on)."""
        assert self.checkpointer is not None
        self.learner_restarts += 1
        log.warning("learner lost (%s); restart %d of learner.max_restarts=%d from %s", e,
                    self.learner_restarts, self.cfg.learner.max_restarts, self.checkpointer.last or "the start")
        self.pipeline.discard()  # rollouts ahead were drawn from weights that are rolled back
        step = self.checkpointer.restore_learners()
        last = self.checkpointer.last_state
        self.pipeline.restore(last.pipeline if last is not None else None, step)
        out = self.logger.metrics_path.parent
        for name in ("metrics.jsonl", "completions.jsonl"):
            truncate_step_log(out / name, step)
        self.history = [h for h in self.history if h["step"] <= step]
        self.batches = {k: v for k, v in self.batches.items() if k < step}
        self.step = step
        log.info("learners restored: continuing at step %d, weight version %d", step, self.groups.sync.version)

    def _stop_for_capacity(self, e: CapacityError) -> CapacityError:
        """Too few rollout workers for rollout.capacity_timeout_s: the learners hold the weights after
        self.step steps; save them so the run resumes from here."""
        if self.checkpointer is None:
            return e
        ck = self.checkpointer.save(self.step, len(self.records), pipeline=self.pipeline.state())
        return CapacityError(f"{e}; stopped at step {self.step} with checkpoint {ck}: continue with --resume once "
                             "the cluster has room")

    def after_step(self) -> None:
        """Periodic evaluation, then periodic checkpoints (after everything this step logs, so the saved
        W&B step counter is final). The end-of-run eval and checkpoint are run_rlvr's."""
        tc, every = self.cfg.train, self.cfg.checkpoint.every
        if tc.eval_every > 0 and self.eval_records and self.step % tc.eval_every == 0 and self.step < tc.steps:
            self.evaluate()
        if self.checkpointer is not None and every > 0 and self.step % every == 0 and self.step < tc.steps:
            self.checkpointer.save(self.step, len(self.records), pipeline=self.pipeline.state())

    def evaluate(self) -> EvalResult:
        """Greedy evaluation of the eval split on the rollout workers, logged at the current step."""
        d = self.cfg.data
        ev = evaluate_records(self.groups.rollout, self.eval_records or [], self.labels,
                              self.cfg.rollout.max_new_tokens, d.use_video, d.use_audio)
        self.logger.log({"eval/war": ev.metrics.war, "eval/uar": ev.metrics.uar, "eval/format_rate": ev.format_rate},
                        step=self.step)
        return ev

    def train_on(self, batch: StepBatch) -> dict[str, float]:
        """One learner call, the membership boundary, the broadcast, metrics. Heavy media never pass through
        here: the learners fetch them by reference."""
        samples = batch.samples
        if not samples:
            log.warning("step %d: every record failed to load; no update this step", self.step + 1)
            # The same counters as any other row (a skipped step has no rewards: diagnostics count 0).
            self._tokens = 0.0
            return self._counters(len(batch.skipped)) | {"data/skipped_steps": 1.0} | batch.counters | {
                f"reward/diag_{k}": 0.0 for k in sorted(self._diag_keys)}
        version = self.groups.sync.version
        learner, shards = self._update(batch, version)
        self._membership_boundary()
        with self.timer.phase("broadcast"):
            self.groups.sync.broadcast(version + 1)
        m = self._step_metrics(batch, learner, shards, version)
        self._warn(batch.rewards, m)
        self._table = self._samples_table(samples, batch.rewards)
        self._tokens = float(sum(batch.lengths))
        return m

    def _update(self, batch: StepBatch, version: int) -> tuple[dict[str, float], list[Any]]:
        """One learner call: the shards, which log-probs the step uses, the update on every rank."""
        cfg, lens = self.cfg, batch.lengths
        shards, num_micro = shard_for_learners(batch.samples, batch.advantages.tolist(), cfg.learner.num_learners,
                                               cfg.learner.micro_batch_size)
        plan = old_logprob_source(cfg, [g.weight_version for g in batch.samples], version,
                                  all(c.logprobs is not None for c in batch.completions))
        minis = mini_batch_counts(shards, num_micro, cfg.learner.micro_batch_size, cfg.grpo.mini_batches)
        spec = StepSpec(num_micro, sum(lens), len(lens), cfg.rollout.max_new_tokens, plan, minis)
        with self.timer.phase("train"):
            return self.groups.learners.train(shards, spec), shards

    def _membership_boundary(self) -> None:
        """Workers leave or join here; the broadcast that follows re-forms its group and gives the joiners this
        step's weights (no extra broadcast). A worker leaves only with no rollout running (the queued ones
        wait)."""
        if self.scale is not None:
            self.scale.serve(self.groups.rollout, self.step)
        if self.groups.rollout.leaving():
            with self.timer.phase("rollout_wait"):
                self.pipeline.drain()
        self.groups.rollout.at_boundary()

    def _step_metrics(self, batch: StepBatch, learner: dict[str, float], shards: list[Any],
                      version: int) -> dict[str, float]:
        samples, rb, lens = batch.samples, batch.rewards, batch.lengths
        seen = batch.scored or rb  # with the group filter: every group sampled, the dropped ones included
        m = reward_metrics(seen.total, seen.per_reward, self.cfg.rollout.group_size, rb.errors, rb.diagnostics)
        m |= advantage_metrics(batch.advantages)
        m |= response_metrics(lens, [c.finish_reason for c in batch.completions])
        m |= learner_metrics(learner)
        # Inside the learner call: the frozen passes (reference, and a recompute if asked), then the update.
        m["time/logprob"] = learner.get("frozen_logprob_s", 0.0)
        m["time/update"] = learner.get("update_s", 0.0)
        m |= self.groups.sync.byte_metrics()
        m["weight_version"] = float(version + 1)
        tags = [modality_tag(*g.modalities()) for g in samples]
        m |= staleness_metrics(version, [g.weight_version for g in samples], tags)
        m["weight_version_lag"] = m["staleness/max"]
        m |= self._counters(len(batch.skipped)) | batch.counters
        m["data/skipped_steps"] = 0.0
        self._diag_keys |= set(rb.diagnostics)
        # What crossed the driver this step (prompt metadata, completions, shards with refs) against the
        # media that went from the rollout workers to the learners by reference.
        m["data/driver_bytes"] = float(wire_bytes(samples) + wire_bytes(shards))
        m["data/media_bytes"] = float(sum(g.media_bytes for g in samples))
        return m

    def _warn(self, rb: Any, m: dict[str, float]) -> None:
        for k, v in rb.errors.items():
            if v:
                log.warning("step %d: reward %r failed on %d samples (they score 0): %s", self.step + 1, k, v,
                            rb.error_examples.get(k, "?"))
        if m.get("learner/skipped_update"):
            log.warning("step %d: non-finite loss or gradient on a learner; update skipped on every rank, "
                        "weights unchanged", self.step + 1)

    def _counters(self, skipped_records: int) -> dict[str, float]:
        g = self.groups
        return {"data/skipped_records": float(skipped_records), "data/skipped_at_load": float(self.skipped_at_load),
                "faults/worker_restarts": float(g.rollout.restarts), "faults/reissued_prompts": float(g.rollout.reissued),
                "faults/reward_actor_restarts": float(g.rewards.restarts),
                "faults/learner_restarts": float(self.learner_restarts)} | g.rollout.metrics()

    def _samples_table(self, samples: list[PromptSamples], rb) -> tuple[list[str], list[list[Any]]] | None:
        n = self.cfg.train.log_samples
        if n <= 0:
            return None
        rows, k = [], 0
        names = list(rb.per_reward)
        for g in samples:
            for c in g.completions:
                if len(rows) < n and c is g.completions[0]:
                    parsed = split_reasoning(c.text)
                    rows.append([g.record_id, g.inputs.label, parsed.answer, parsed.reasoning, c.text, rb.total[k]]
                                + [rb.per_reward[x][k] for x in names])
                k += 1
        cols = ["id", "label", "prediction", "reasoning", "completion", "reward"] + names
        return cols, rows

    def log(self, m: dict[str, float]) -> None:
        nan = float("nan")  # a step whose records all failed to load has no reward/response metrics
        m = dict(m, step=float(self.step))
        self.history.append(m)
        # The step's sample table goes in the same W&B step ("completions": a metric is called "samples").
        table, self._table = self._table, None
        self.logger.log(m, step=self.step, tables={"completions": table} if table else None)
        log.info(
            "step %d | reward %.3f acc %.3f fmt %.3f | kl %.4f loss %.4f | len %.1f | %.1fs",
            self.step, m.get("reward/total_mean", nan), m.get("accuracy", nan), m.get("format_rate", nan),
            m.get("learner/kl", 0.0), m.get("learner/loss", 0.0), m.get("response/length_mean", nan), m["time/step"],
        )


def run_rlvr(cfg: RunConfig, prepared: Prepared | None = None, init_ckpt: str | None = None,
             logger: RunLogger | None = None, eval_before: bool = False,
             resume: str | bool = False) -> dict[str, Any]:
    """resume: False, True/"latest" (``<output_dir>/checkpoints/latest``) or a checkpoint dir. Data and the
    checkpoint to resume are read and checked before Ray starts."""
    check_rlvr(cfg)
    prep = prepared or prepare(cfg, init_ckpt)
    out = Path(cfg.train.output_dir)
    records, skipped_at_load = load_split_counted(prep.train_path, prep.labels, cfg)
    eval_records = load_split(prep.eval_path, prep.labels, cfg)
    ck_dir, state = resume_state(cfg, out, resume, len(records)) if resume else (None, None)
    init_ray(cfg)
    if state is not None and init_ckpt and str(Path(init_ckpt).resolve()) != state.init_ckpt:
        log.warning("--resume: learners start from the saved init checkpoint %s, not %s", state.init_ckpt, init_ckpt)
    # A resumed run rebuilds the learners (and the frozen reference) from the same init checkpoint.
    ckpt = state.init_ckpt if state is not None else str(Path(init_ckpt or prep.ckpt_dir).resolve())
    if state is not None:
        # Steps the interrupted run logged after its last checkpoint are replayed: drop their old rows.
        for name in ("metrics.jsonl", "completions.jsonl"):
            if dropped := truncate_step_log(out / name, state.step):
                log.info("--resume: dropped %d rows after step %d from %s", dropped, state.step, name)
    own_logger = logger is None
    logger = logger or RunLogger(out, cfg.wandb, cfg.to_dict(), resume_id=state.wandb_run_id if state else None,
                                 wandb_step=state.wandb_step if state else 0)
    groups = RLVRGroups.build(cfg, ckpt, prep.labels)
    scale = None
    try:
        scale = ScaleChannel(cfg)
        result: dict[str, Any] = {}
        checkpointer = Checkpointer(cfg, groups, out, ckpt, logger)
        if state is not None and ck_dir is not None:
            checkpointer.load(ck_dir)  # workers now hold exactly the saved policy
            log.info("resumed from %s: step %d, weight version %d", ck_dir, state.step, state.weight_version)
            result["resumed_from"] = str(ck_dir)
            result["resume_check"] = {"saved": state.weights_checksum, "loaded": checkpointer.loaded_checksums}
        trainer = RLVRTrainer(cfg, groups, records, eval_records, prep.labels, logger,
                              start_step=state.step if state else 0, skipped_at_load=skipped_at_load,
                              checkpointer=checkpointer, scale=scale,
                              pipeline_state=state.pipeline if state else None)
        if eval_before and eval_records and state is None:
            ev = trainer.evaluate()  # at step 0
            result["eval_before"] = ev.metrics.to_dict() | {"format_rate": ev.format_rate}
        result["history"] = trainer.fit()
        result["batches"] = dict(trainer.batches)
        if eval_records:
            ev = trainer.evaluate()
            result["eval"] = ev.metrics.to_dict() | {"format_rate": ev.format_rate}
            logger.summary({"eval/war": ev.metrics.war, "eval/uar": ev.metrics.uar})
        # End of run: a full checkpoint with an HF export; final_model shares its files (hard links).
        final_ckpt = trainer.checkpointer.save(trainer.step, len(records), with_hf=True,
                                               pipeline=trainer.pipeline.state())
        final_dir = out / "final_model"
        link_or_copy_tree(final_ckpt / HF_SUBDIR, final_dir)
        result["checkpoint"] = str(final_ckpt)
        result["final_model"] = str(final_dir)
        result["weight_version"] = groups.sync.version
        result["wandb_run_id"] = logger.run_id
        result["learner_restarts"] = trainer.learner_restarts
        return result
    finally:
        if scale is not None:
            scale.shutdown()
        groups.shutdown()
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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run's outputs in train.output_dir (refused without it)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    cfg = parse_config(args)
    check_rlvr(cfg)
    preflight(cfg, args.init_ckpt, resume=bool(args.resume_from or args.resume), overwrite=args.overwrite)
    res = run_rlvr(cfg, init_ckpt=args.init_ckpt, resume=args.resume_from or args.resume)
    if "eval" in res:
        e = res["eval"]
        print(f"eval WAR {e['war']:.3f} UAR {e['uar']:.3f} format {e['format_rate']:.3f}")
    print(f"final model: {res['final_model']}")
    return 0


if __name__ == "__main__":
    run_main(main, resumable=True)
