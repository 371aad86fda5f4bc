"""The trainable policy of one data-parallel rank on DeepSpeed (ZeRO 0-3): optimizer, micro-batch backward,
and the non-finite skip that every rank decides together. Owns the engine; knows nothing of GRPO or SFT.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import torch

from r1omni_ray.config import RunConfig
from r1omni_ray.data.sampler import split_by_groups, split_even
from r1omni_ray.grpo import grad_scale_for_framework
from r1omni_ray.model.loading import set_train_mode
from r1omni_ray.safe_load import install_safe_checkpoint_loading
from r1omni_ray.weight_broadcast import CollectiveError


def micro_slices(n: int, num_micro: int, groups: Sequence[Any] | None = None,
                 micro_batch_size: int | None = None) -> list[slice]:
    """Exactly num_micro contiguous slices: every DP rank must run the same number of forward/backward
    passes (ZeRO-3 gathers parameters collectively inside each forward). Balanced; with ``groups`` (each
    item's prompt) cut between prompt groups where one is near, none larger than ``micro_batch_size`` unless
    num_micro slices cannot hold n items at that size."""
    if groups is None:
        parts = split_even(n, num_micro)
    else:
        parts = split_by_groups(groups, num_micro, max_size=micro_batch_size)
    return [slice(r.start, r.stop) for r in parts]


def forward_modalities(cfg: RunConfig) -> dict[str, str]:
    """What every policy forward on a learner runs per modality in use, whether or not its micro-batch has
    that input (see HumanOmniQwen2ForCausalLM.every_forward_runs): the projector on shipped tower features,
    or the tower and projector on raw media."""
    ship_vision, ship_audio = cfg.model.shipped_tower_features()
    out = {}
    if cfg.data.use_video:
        out["video"] = "features" if ship_vision else "raw"
    if cfg.data.use_audio:
        out["audio"] = "features" if ship_audio else "raw"
    return out


def set_dp_timeouts(timeout: datetime.timedelta) -> None:
    """DeepSpeed builds its data-parallel groups with new_group() and torch's default timeout (30 min for
    gloo), whatever init_distributed got: give every group learner.dist_timeout_s, so a hung or dead peer
    surfaces as an error instead of a silent half-hour stall."""
    from torch.distributed import distributed_c10d as c10d

    for pg in list(c10d._world.pg_map):
        try:
            c10d._set_pg_timeout(timeout, pg)
        except Exception:  # noqa: BLE001 - a group this rank is not in, or a backend without timeouts
            pass


def deepspeed_config(cfg: RunConfig, bf16: bool, on_gpu: bool, grad_accum: int = 1) -> dict[str, Any]:
    """The DeepSpeed config of one learner. overlap_comm (learner.overlap_comm; None: on GPUs only) overlaps
    ZeRO's gradient reduction with the backward, at the cost of its buckets' memory; on CPU (gloo) it only
    adds copies."""
    lc = cfg.learner
    overlap = on_gpu if lc.overlap_comm is None else lc.overlap_comm
    return {
        "train_micro_batch_size_per_gpu": lc.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": {"stage": lc.zero_stage, "overlap_comm": overlap},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedPolicy:
    def __init__(self, model: Any, cfg: RunConfig, lr: float, rank: int, world_size: int,
                 device: torch.device) -> None:
        import deepspeed

        lc = cfg.learner
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.grad_accum = 1
        bf16 = self.bf16 = device.type == "cuda" and model.dtype == torch.bfloat16
        ds_config = deepspeed_config(cfg, bf16, device.type == "cuda", self.grad_accum)
        params = [p for p in model.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=lr, weight_decay=lc.weight_decay, betas=(0.9, 0.99))
        # Every ZeRO stage ends its step in this optimizer's step(): gating it skips an update with
        # weights and Adam state untouched, while DeepSpeed still clears grads and counters.
        self._skip_step = False
        base_step = optim.step

        def gated_step(*args: Any, **kwargs: Any) -> Any:
            return None if self._skip_step else base_step(*args, **kwargs)

        optim.step = gated_step  # type: ignore[method-assign]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optim, config=ds_config, model_parameters=params
        )
        set_dp_timeouts(datetime.timedelta(seconds=lc.dist_timeout_s))
        install_safe_checkpoint_loading(self.engine)  # resume reads torch pickles: weights_only=True
        self.zero3 = lc.zero_stage == 3
        self.version = 0  # weights version: +1 per update (skipped ones included), set by restores
        self.skipped_updates = 0
        self.at_boundary = False  # whether the last micro-batch's engine step was an optimizer step
        # Local gradients are checked as autograd produces them, before ZeRO reduces/partitions them.
        self._grad_bad = torch.zeros((), dtype=torch.bool, device=device)
        self._inject_grad: float | None = None
        for p in self.engine.module.parameters():
            if p.requires_grad:
                p.register_hook(self._check_grad)

    @property
    def module(self) -> Any:
        return self.engine.module

    def _check_grad(self, g: torch.Tensor) -> torch.Tensor:
        if self._inject_grad is not None:
            g = g + self._inject_grad
        self._grad_bad.logical_or_(~torch.isfinite(g).all())
        return g

    def inject_nonfinite_grad(self, value: float) -> None:
        """Fault injection (tests): the next update's gradients on this rank get ``value`` added."""
        self._inject_grad = value

    def seed_step(self, sub_step: int = 0) -> None:
        """Dropout (e.g. in the BERT gate) draws from (train.seed, weight version, optimizer step within the
        update, rank), not from the process's history: a resumed run repeats an uninterrupted run's masks."""
        seed = (self.cfg.train.seed * 1_000_003 + self.version) * 1_009 + self.rank
        torch.manual_seed(seed * 101 + sub_step if sub_step else seed)  # the first step's seed as before

    def dp_any(self, flag: bool) -> bool:
        """True if any data-parallel rank raised ``flag`` (every rank takes the same decision)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        timeout = datetime.timedelta(seconds=self.cfg.learner.dist_timeout_s)
        try:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, async_op=True).wait(timeout)
        except Exception as e:
            raise CollectiveError(
                f"learner-{self.rank}: data-parallel all-reduce (rank {self.rank}/{self.world_size}) failed or "
                f"timed out after {timeout.total_seconds():.0f}s: {e}"
            ) from e
        return bool(t.item() > 0)

    def begin_update(self, num_micro: int, sub_step: int = 0) -> float:
        """Train mode, seed and accumulation over ``num_micro`` micro-batches for one optimizer step (the
        ``sub_step``-th of an update); returns the loss scale that undoes DeepSpeed's own averaging (see
        grpo.grad_scale_for_framework)."""
        if num_micro != self.grad_accum:
            self.engine.set_train_batch_size(self.cfg.learner.micro_batch_size * num_micro * self.world_size)
            self.grad_accum = num_micro
        # DeepSpeed finds the accumulation boundary from its running micro-step count modulo the accumulation
        # steps: after steps of another size (2, then 3 micro-batches) it would fall mid-step. Each optimizer
        # step ends on a boundary, so counting from this step's first micro-batch is exact.
        self.engine.micro_steps = 0
        set_train_mode(self.engine.module)
        self.seed_step(sub_step)
        return grad_scale_for_framework(self.world_size, self.grad_accum)

    def _optimizer_step(self, local_bad: bool) -> bool | None:
        """engine.step() after a micro-batch's backward. At the accumulation boundary a non-finite loss or
        gradient on any rank skips the update on all ranks; returns whether it did (None off-boundary)."""
        self.at_boundary = bool(self.engine.is_gradient_accumulation_boundary())
        if not self.at_boundary:
            self.engine.step()
            return None
        skip = self.dp_any(local_bad or bool(self._grad_bad))
        self._skip_step = skip
        try:
            self.engine.step()
        finally:
            self._skip_step = False
            self._grad_bad.zero_()
            self._inject_grad = None
        if skip:
            self.skipped_updates += 1
        return skip

    def backward_micro(self, loss: torch.Tensor, lp: torch.Tensor, scale: float,
                       bad_so_far: bool) -> tuple[torch.Tensor, bool, bool]:
        """Backward + engine step of one micro-batch. A non-finite loss becomes a zero loss on the same
        graph, so every rank still runs the same collectives; the update is then skipped at the
        accumulation boundary. Returns (loss used, this loss was non-finite, update skipped)."""
        bad = not bool(torch.isfinite(loss))
        if bad:
            loss = (lp * 0.0).nan_to_num(0.0).sum()
        self.engine.backward(loss * scale)
        return loss, bad, bool(self._optimizer_step(bad_so_far or bad))

    def end_update(self) -> dict[str, float]:
        self.version += 1
        return {
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "skipped_updates": float(self.skipped_updates),  # cumulative
        }
