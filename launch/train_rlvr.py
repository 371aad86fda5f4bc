"""RLVR (GRPO) training driver: rollout -> rewards -> advantages -> one learner call (reference log-probs,
update) -> broadcast -> log, on Ray role groups. Run embedded (`python -m launch.train_rlvr`) or as a Ray job."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import ray
import torch

from actors.calls import ActorCallError, wire_bytes
from actors.evaluation import EvalResult, evaluate_records
from actors.groups import RLVRGroups
from actors.learner_group import lost_learners, shard_for_learners
from actors.placement import CapacityError
from actors.rollout import PromptSamples, usable_samples
from actors.rollout_group import PendingRollout, wait_with_progress
from actors.scale_control import ScaleChannel
from launch.checkpointer import Checkpointer, resume_state
from launch.common import Prepared, base_parser, init_ray, parse_config, prepare, run_main, setup_logging
from launch.preflight import preflight
from launch.splits import load_split, load_split_counted
from r1omni_ray.checkpointing import HF_SUBDIR, link_or_copy_tree
from r1omni_ray.completions import split_reasoning
from r1omni_ray.config import RunConfig, check_rlvr
from r1omni_ray.data.sampler import batch_indices
from r1omni_ray.engines.base import SamplingParams, step_seed
from r1omni_ray.grpo import group_advantages
from r1omni_ray.learner.grpo_update import StepSpec
from r1omni_ray.learner.old_logprobs import engine_logprobs_allowed, old_logprob_source
from r1omni_ray.step_metrics import advantage_metrics, response_metrics, reward_metrics
from r1omni_ray.timing import PhaseTimer
from r1omni_ray.tracking import RunLogger, progress, truncate_step_log

log = logging.getLogger("r1omni_ray")


class RLVRTrainer:
    def __init__(self, cfg: RunConfig, groups: RLVRGroups, records: list[Any], eval_records: list[Any] | None,
                 labels: list[str], logger: RunLogger, start_step: int = 0, skipped_at_load: int = 0,
                 checkpointer: Checkpointer | None = None, scale: ScaleChannel | None = None) -> None:
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
        self.inflight: list[Any] = []  # the overlapped next rollout, if any
        self._table: tuple[list[str], list[list[Any]]] | None = None  # this step's sample table
        self._diag_keys: set[str] = set()
        self._tokens = 0.0  # completion tokens trained on in the step being logged
        rc = cfg.rollout
        self.params = SamplingParams(n=rc.group_size, temperature=rc.temperature, top_p=rc.top_p,
                                     max_new_tokens=rc.max_new_tokens, min_new_tokens=rc.min_new_tokens,
                                     # only overlapped steps are off-policy: only they use the engine's own
                                     logprobs=rc.sampling_logprobs or (cfg.train.overlap and engine_logprobs_allowed(cfg)))

    def items_for(self, step: int) -> list[tuple[int, Any]]:
        idx = batch_indices(len(self.records), self.cfg.train.prompts_per_step, step, self.cfg.train.seed)
        return [(uid, self.records[i]) for uid, i in enumerate(idx)]

    def submit(self, step: int, total: int | None = None):
        """Step ``step``'s rollout, with the next step's records to decode ahead when there is one before
        ``total`` (default train.steps)."""
        d = self.cfg.data
        total = self.cfg.train.steps if total is None else total
        ahead = self.items_for(step + 1) if step + 1 < total else None
        return self.groups.rollout.submit(self.items_for(step), self._params_for(step), d.use_video, d.use_audio,
                                          ahead)

    def _params_for(self, step: int) -> SamplingParams:
        p = self.params
        return dataclasses.replace(p, seed=step_seed(self.cfg.train.seed, step))

    def fit(self, steps: int | None = None) -> list[dict[str, float]]:
        """Train until ``steps`` steps are done in all (default train.steps); call again to go on (benchmarks:
        warm-up steps, then the measured ones). Returns the history of every step so far. A lost learner
        group is restored in the job (learner.max_restarts); too few rollout workers for too long stops the
        run with a checkpoint to resume from."""
        total = self.cfg.train.steps if steps is None else steps
        bar = progress(total=total, initial=min(self.step, total), desc="RLVR", unit="step", leave=True)
        try:
            pending = self.submit(self.step, total) if self.step < total else None
            while self.step < total:
                try:
                    pending = self._fit_step(pending, total)
                except ActorCallError as e:
                    if not self._may_restart_learners(e):
                        raise
                    pending = self._restart_learners(e, total)
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

    def _fit_step(self, pending: list[PendingRollout] | None, total: int) -> list[PendingRollout] | None:
        """One step: its rollout (submitted before), the update, the log, the periodic work. Returns the
        next step's rollout, submitted."""
        t0 = time.perf_counter()
        d = self.cfg.data
        if self.scale is not None:
            self.scale.serve(self.groups.rollout, self.step)
        with self.timer.phase("rollout"):
            wait_with_progress(pending, f"rollout {self.step + 1}")
            samples = self.groups.rollout.collect(pending or [], self._params_for(self.step), d.use_video, d.use_audio)
        # The records of each step, in order: what a resumed run must reproduce.
        self.batches[self.step] = [g.record_id for g in samples]
        # One-step off-policy: the next rollout runs on the workers while the learners update.
        overlap = self.cfg.train.overlap and self.step + 1 < total
        pending = self.submit(self.step + 1, total) if overlap else None
        self.inflight = pending or []
        metrics = self.train_on(samples)
        metrics |= self.timer.reset()
        metrics["time/step"] = time.perf_counter() - t0
        metrics["throughput/tokens_per_s"] = self._tokens / metrics["time/step"]
        metrics["throughput/samples_per_s"] = metrics.get("samples", 0.0) / metrics["time/step"]
        self.step += 1
        self.log(metrics)
        if not overlap and self.step < total:
            pending = self.submit(self.step, total)
        self.after_step()
        return pending

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

    def _restart_learners(self, e: ActorCallError, total: int) -> list[PendingRollout] | None:
        """Rebuild the learner group from the latest checkpoint and replay the steps since, exactly as
        --resume would: rows logged after it are dropped (W&B keeps its run and counts on)."""
        assert self.checkpointer is not None
        self.learner_restarts += 1
        log.warning("learner lost (%s); restart %d of learner.max_restarts=%d from %s", e,
                    self.learner_restarts, self.cfg.learner.max_restarts, self.checkpointer.last or "the start")
        self.inflight = []  # the overlapped rollout (if any) was drawn from weights that are rolled back
        step = self.checkpointer.restore_learners()
        out = self.logger.metrics_path.parent
        for name in ("metrics.jsonl", "completions.jsonl"):
            truncate_step_log(out / name, step)
        self.history = [h for h in self.history if h["step"] <= step]
        self.batches = {k: v for k, v in self.batches.items() if k < step}
        self.step = step
        log.info("learners restored: continuing at step %d, weight version %d", step, self.groups.sync.version)
        return self.submit(self.step, total) if self.step < total else None

    def _stop_for_capacity(self, e: CapacityError) -> CapacityError:
        """Too few rollout workers for rollout.capacity_timeout_s: the learners hold the weights after
        self.step steps; save them so the run resumes from here."""
        if self.checkpointer is None:
            return e
        ck = self.checkpointer.save(self.step, len(self.records))
        return CapacityError(f"{e}; stopped at step {self.step} with checkpoint {ck}: continue with --resume once "
                             "the cluster has room")

    def after_step(self) -> None:
        """Periodic evaluation, then periodic checkpoints (after everything this step logs, so the saved
        W&B step counter is final). The end-of-run eval and checkpoint are run_rlvr's."""
        tc, every = self.cfg.train, self.cfg.checkpoint.every
        if tc.eval_every > 0 and self.eval_records and self.step % tc.eval_every == 0 and self.step < tc.steps:
            self.evaluate()
        if self.checkpointer is not None and every > 0 and self.step % every == 0 and self.step < tc.steps:
            self.checkpointer.save(self.step, len(self.records))

    def evaluate(self) -> EvalResult:
        """Greedy evaluation of the eval split on the rollout workers, logged at the current step."""
        d = self.cfg.data
        ev = evaluate_records(self.groups.rollout, self.eval_records or [], self.labels,
                              self.cfg.rollout.max_new_tokens, d.use_video, d.use_audio)
        self.logger.log({"eval/war": ev.metrics.war, "eval/uar": ev.metrics.uar, "eval/format_rate": ev.format_rate},
                        step=self.step)
        return ev

    def train_on(self, samples: list[PromptSamples]) -> dict[str, float]:
        """Score, advantages, one learner call, broadcast, metrics. Heavy media never pass through here: the
        learners fetch them by reference."""
        # Bad media: logged and counted (data.on_error=skip) or a DataError naming the file (raise).
        samples, data_errors = usable_samples(samples, self.cfg.data.on_error)
        if not samples:
            log.warning("step %d: every record failed to load; no update this step", self.step + 1)
            # The same counters as any other row (a skipped step has no rewards: diagnostics count 0).
            self._tokens = 0.0
            return self._counters(len(data_errors)) | {"data/skipped_steps": 1.0} | {
                f"reward/diag_{k}": 0.0 for k in sorted(self._diag_keys)}
        completions = [c for g in samples for c in g.completions]
        lens = [len(c.token_ids) for c in completions]
        rb = self._score(samples, completions)
        adv = group_advantages(torch.tensor(rb.total, dtype=torch.float32), self.cfg.rollout.group_size,
                               scale=self.cfg.grpo.advantage_scale, eps=self.cfg.grpo.advantage_eps)
        version = self.groups.sync.version
        learner, shards = self._update(samples, completions, lens, adv, version)
        self._wait_for_overlapped_rollout()
        self._membership_boundary()
        with self.timer.phase("broadcast"):
            self.groups.sync.broadcast(version + 1)
        m = self._step_metrics(samples, completions, lens, rb, adv, learner, shards, version, len(data_errors))
        self._warn(rb, m)
        self._table = self._samples_table(samples, rb)
        self._tokens = float(sum(lens))
        return m

    def _score(self, samples: list[PromptSamples], completions: list[Any]) -> Any:
        with self.timer.phase("reward"):
            return self.groups.rewards.score([c.text for c in completions],
                                             [g.inputs.solution for g in samples for _ in g.completions])

    def _update(self, samples: list[PromptSamples], completions: list[Any], lens: list[int], adv: torch.Tensor,
                version: int) -> tuple[dict[str, float], list[Any]]:
        """One learner call: the shards, where the old log-probs come from, the update on every rank."""
        cfg = self.cfg
        shards, num_micro = shard_for_learners(samples, adv.tolist(), cfg.learner.num_learners,
                                               cfg.learner.micro_batch_size)
        old = old_logprob_source(cfg, [g.weight_version for g in samples], version,
                                 all(c.logprobs is not None for c in completions))
        spec = StepSpec(num_micro, sum(lens), len(lens), cfg.rollout.max_new_tokens, old)
        with self.timer.phase("train"):
            return self.groups.learners.train(shards, spec), shards

    def _wait_for_overlapped_rollout(self) -> None:
        """A worker takes weights only between rollouts: the overlapped rollout must end first."""
        if self.inflight:
            with self.timer.phase("rollout_wait"):
                ray.wait([p.ref for p in self.inflight], num_returns=len(self.inflight), fetch_local=False)
            self.inflight = []

    def _membership_boundary(self) -> None:
        """No rollout in flight: workers leave or join here; the broadcast that follows re-forms its group
        and gives the joiners this step's weights (no extra broadcast)."""
        if self.scale is not None:
            self.scale.serve(self.groups.rollout, self.step)
        self.groups.rollout.at_boundary()

    def _step_metrics(self, samples: list[PromptSamples], completions: list[Any], lens: list[int], rb: Any,
                      adv: torch.Tensor, learner: dict[str, float], shards: list[Any], version: int,
                      skipped_records: int) -> dict[str, float]:
        m = reward_metrics(rb.total, rb.per_reward, self.cfg.rollout.group_size, rb.errors, rb.diagnostics)
        m |= advantage_metrics(adv)
        m |= response_metrics(lens, [c.finish_reason for c in completions])
        m |= {f"learner/{k}": v for k, v in learner.items()}
        # Inside the learner call: the frozen passes (reference, and old log-probs off-policy), then the update.
        m["time/logprob"] = learner.get("frozen_logprob_s", 0.0)
        m["time/update"] = learner.get("update_s", 0.0)
        m |= self.groups.sync.byte_metrics()
        m["weight_version"] = float(version + 1)
        m["weight_version_lag"] = float(version - min(g.weight_version for g in samples))
        m |= self._counters(skipped_records)
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
                              checkpointer=checkpointer, scale=scale)
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
        final_ckpt = trainer.checkpointer.save(trainer.step, len(records), with_hf=True)
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
