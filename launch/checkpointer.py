"""The RLVR run's checkpoints: writing one (learners' DeepSpeed state + the driver state, atomically) and
choosing and checking the one a resumed run continues from."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from actors.groups import RLVRGroups
from actors.learner_group import LearnerGroup
from r1omni_ray.checkpointing import (
    DEEPSPEED_SUBDIR,
    HF_SUBDIR,
    DriverState,
    begin_checkpoint,
    commit_checkpoint,
    latest_checkpoint,
    prune_checkpoints,
    read_state,
    step_name,
)
from r1omni_ray.config import ConfigError, RunConfig
from r1omni_ray.tracking import RunLogger

log = logging.getLogger("r1omni_ray")


class Checkpointer:
    """Writes ``<out>/checkpoints/step_N`` atomically: every learner's DeepSpeed state (a collective save;
    on a multi-node cluster output_dir must be a shared filesystem, each rank writes its own shards) plus
    the driver state, then moves ``latest`` and prunes to ``checkpoint.keep_last``."""

    def __init__(self, cfg: RunConfig, groups: RLVRGroups, out: Path, init_ckpt: str, logger: RunLogger) -> None:
        self.cfg, self.groups, self.out, self.init_ckpt, self.logger = cfg, groups, out, init_ckpt, logger
        self.last: Path | None = None
        self.last_state: DriverState | None = None  # of ``last``
        self.loaded_checksums: list[list[float]] | None = None  # of the last load

    def save(self, step: int, num_records: int, with_hf: bool = False, pipeline: dict | None = None) -> Path:
        """A checkpoint after ``step`` steps of a run over ``num_records`` records; pipeline: the batch
        pipeline's state (BatchPipeline.state)."""
        t0 = time.perf_counter()
        tag = step_name(step)
        tmp = begin_checkpoint(self.out, step)
        learners = self.groups.learners
        learners.save_checkpoint(str(tmp / DEEPSPEED_SUBDIR), tag)
        sums = learners.checksums()
        if with_hf:
            learners.save_hf(str(tmp / HF_SUBDIR))
        state = DriverState(
            step=step, seed=self.cfg.train.seed, weight_version=self.groups.sync.version,
            prompts_per_step=self.cfg.train.prompts_per_step, num_records=num_records,
            init_ckpt=self.init_ckpt, wandb_run_id=self.logger.run_id, wandb_step=self.logger.wandb_step,
            deepspeed_tag=tag, weights_checksum=sums, pipeline=pipeline,
        )
        self.last, self.last_state = commit_checkpoint(self.out, step, state), state
        removed = prune_checkpoints(self.out, self.cfg.checkpoint.keep_last)
        log.info("checkpoint %s (weight version %d) in %.1fs%s", self.last, state.weight_version,
                 time.perf_counter() - t0, f"; pruned {[r.name for r in removed]}" if removed else "")
        return self.last

    def load(self, ck_dir: Path) -> DriverState:
        """Load a checkpoint into the learners (checked against the saved checksums) and send its weights to
        the rollout workers: they then hold exactly the saved policy."""
        state = read_state(ck_dir)
        learners = self.groups.learners
        learners.load_checkpoint(str(ck_dir / DEEPSPEED_SUBDIR), state.deepspeed_tag)
        sums = learners.checksums()
        if state.weights_checksum and sums != state.weights_checksum:
            raise RuntimeError(f"{ck_dir}: loaded learner weights differ from the saved ones "
                               f"({sums} != {state.weights_checksum})")
        self.groups.sync.broadcast(state.weight_version)
        self.last, self.last_state, self.loaded_checksums = ck_dir, state, sums
        return state

    def restore_learners(self) -> int:
        """A learner was lost: a new learner group (placed when the cluster can, within
        ray.placement_timeout_s) from the init checkpoint, then the latest checkpoint of this run if there is
        one, re-formed broadcast groups and re-synced workers. Returns the step to continue from (the batch
        pipeline's state to continue with is ``last_state``'s)."""
        g = self.groups
        g.learners.shutdown()
        g.learners = LearnerGroup(self.cfg, self.init_ckpt)
        g.sync.attach(g.learners)
        if self.last is None:
            g.sync.broadcast(0)  # the init checkpoint's weights, as at the start
            return 0
        return self.load(self.last).step


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
        raise ConfigError(f"{ck}: saved (seed, prompts_per_step, records) {got} != this run's {want}; "
                         "resuming would change the data order")
    if state.pipeline is not None and not cfg.train.stream_groups:
        raise ConfigError(f"{ck}: saved by a run with train.stream_groups=true; resuming without it would skip or "
                          "repeat the prompts that were ahead of the learners (set train.stream_groups=true)")
    return ck, state
