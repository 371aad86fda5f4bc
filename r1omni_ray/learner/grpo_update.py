"""One GRPO update on one data-parallel rank: reference log-probs, old log-probs only when the batch is
off-policy, then the clipped policy loss over micro-batches. Ray-free; the learner actor wraps it."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from r1omni_ray.config import RunConfig
from r1omni_ray.grpo import policy_loss
from r1omni_ray.learner.old_logprobs import FORWARD, RECOMPUTE, ROLLOUT, SOURCES
from r1omni_ray.learner.policy import DeepSpeedPolicy, micro_slices
from r1omni_ray.learner.reference import ParkedWeights
from r1omni_ray.step_metrics import GLOBALLY_NORMALISED


@dataclass
class TrainBatch:
    """One rank's share of a step: prompts (media resolved) and the completions that refer to them."""

    prompts: list[Any]  # OmniInputs
    prompt_index: list[int]
    completions: list[list[int]]
    advantages: list[float]
    sampling_logprobs: list[list[float]] | None = None  # per completion token, when the engine recorded them
    # 0.0 marks a padding copy (a rank with no sample of its own still runs every collective), else 1.0.
    weights: list[float] | None = None

    def sub(self, sl: slice) -> TrainBatch:
        idx = self.prompt_index[sl]
        used = sorted(set(idx))
        remap = {p: j for j, p in enumerate(used)}
        lps = self.sampling_logprobs[sl] if self.sampling_logprobs is not None else None
        return TrainBatch([self.prompts[p] for p in used], [remap[p] for p in idx], self.completions[sl],
                          self.advantages[sl], lps, self.weights[sl] if self.weights is not None else None)

    def loss_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The token mask with padding copies zeroed: they add nothing to the loss, its counts or metrics."""
        if self.weights is None:
            return mask
        return mask * torch.tensor(self.weights, dtype=mask.dtype, device=mask.device)[:, None]

    def rollout_old_logprobs(self, width: int) -> torch.Tensor:
        """The sampling log-probs as a right-padded [N, width] tensor (padding is masked by the loss)."""
        if self.sampling_logprobs is None:
            raise ValueError("StepSpec.old_logprobs is rollout but the batch carries no sampling log-probs "
                             "(the rollout engine was not asked for them)")
        out = torch.zeros(len(self.completions), width)
        for i, (lp, c) in enumerate(zip(self.sampling_logprobs, self.completions, strict=True)):
            if len(lp) != len(c):
                raise ValueError(f"completion {i}: {len(lp)} sampling log-probs for {len(c)} tokens")
            out[i, : len(lp)] = torch.tensor(lp)
        return out


@dataclass(frozen=True)
class StepSpec:
    """What every rank must agree on (ZeRO-3 forwards are collective): micro-batches per rank, where the old
    log-probs come from (a RECOMPUTE pass runs on every rank), and the global counts the loss divides by."""

    num_micro: int
    num_global_tokens: int
    num_global_seqs: int
    max_len: int
    old_logprobs: str = FORWARD  # learner/old_logprobs.py: FORWARD | ROLLOUT | RECOMPUTE

    def __post_init__(self) -> None:
        if self.old_logprobs not in SOURCES:
            raise ValueError(f"StepSpec.old_logprobs: {self.old_logprobs!r} is not one of {SOURCES}")


class GRPOUpdate:
    def __init__(self, policy: DeepSpeedPolicy, reference: Any | None, cfg: RunConfig,
                 parked: ParkedWeights | None = None) -> None:
        """parked: the reference's weights when they wait in host memory between steps (learner.ref_offload
        below ZeRO-3; see learner/reference.py)."""
        self.policy, self.reference, self.cfg, self.parked = policy, reference, cfg, parked

    def _logprobs(self, model: Any, batch: TrainBatch, with_entropy: bool = False):
        return model.completion_logprobs(batch.prompts, batch.prompt_index, batch.completions,
                                         temperature=self.cfg.rollout.temperature, with_entropy=with_entropy,
                                         shared_prefix=self.cfg.learner.shared_prefix)

    @torch.no_grad()
    def _frozen_logprobs(self, model: Any, batch: TrainBatch, slices: Sequence[slice]) -> list[torch.Tensor]:
        out = []
        for sl in slices:
            lp, _, _ = self._logprobs(model, batch.sub(sl))
            out.append(lp)
        return out

    def logprobs(self, batch: TrainBatch, num_micro: int) -> list[list[float]]:
        """Each completion's log-probs under the current weights (eval mode, no update)."""
        self.policy.module.eval()
        slices = micro_slices(len(batch.completions), num_micro, batch.prompt_index, self.cfg.learner.micro_batch_size)
        out: list[list[float]] = []
        for sl, lp in zip(slices, self._frozen_logprobs(self.policy.module, batch, slices), strict=True):
            out += [lp[i, : len(c)].tolist() for i, c in enumerate(batch.completions[sl])]
        return out

    def train(self, batch: TrainBatch, spec: StepSpec) -> dict[str, float]:
        """Returns this rank's metrics (token means, or globally normalised loss terms)."""
        t0 = time.perf_counter()
        slices = micro_slices(len(batch.completions), spec.num_micro, batch.prompt_index,
                              self.cfg.learner.micro_batch_size)
        module = self.policy.module
        ref: list[torch.Tensor] | None = None
        if self.reference is not None:
            with self.parked.on(self.policy.device) if self.parked is not None else contextlib.nullcontext():
                ref = self._frozen_logprobs(self.reference, batch, slices)
        old: list[torch.Tensor] | None = None
        if spec.old_logprobs == RECOMPUTE:
            module.eval()
            old = self._frozen_logprobs(module, batch, slices)
        t_frozen = time.perf_counter() - t0
        loss_cfg = self.cfg.grpo.loss_config(spec.max_len, with_reference=ref is not None)
        scale = self.policy.begin_update(spec.num_micro)
        sums: dict[str, float] = {}
        summed: dict[str, float] = {}
        total_loss, nonfinite, skipped = 0.0, 0, False
        for k, sl in enumerate(slices):
            sub = batch.sub(sl)
            lp, mask, ent = self._logprobs(module, sub, with_entropy=True)
            mask = sub.loss_mask(mask)
            # FORWARD: the sampling weights are these weights, the old log-probs are this forward's own.
            if spec.old_logprobs == RECOMPUTE:
                old_lp = old[k].to(lp)
            elif spec.old_logprobs == ROLLOUT:
                old_lp = sub.rollout_old_logprobs(lp.shape[1]).to(lp)
            else:
                old_lp = lp.detach()
            ref_lp = ref[k].to(lp) if ref is not None else None
            adv = torch.tensor(sub.advantages, dtype=lp.dtype, device=lp.device)
            loss, metrics = policy_loss(lp, old_lp, adv, mask, loss_cfg, ref_logp=ref_lp, entropy=ent,
                                        num_global_tokens=spec.num_global_tokens,
                                        num_global_seqs=spec.num_global_seqs)
            loss, bad, step_skipped = self.policy.backward_micro(loss, lp, scale, nonfinite > 0)
            nonfinite += bad
            skipped = step_skipped or skipped
            total_loss += float(loss.detach())
            w = float(mask.sum())
            for name, v in metrics.items():
                if not (isinstance(v, float) and math.isfinite(v)):
                    continue
                if name in GLOBALLY_NORMALISED:  # already divided by global counts: they add up
                    summed[name] = summed.get(name, 0.0) + v
                else:
                    sums[name] = sums.get(name, 0.0) + v * w
            sums["_tokens"] = sums.get("_tokens", 0.0) + w
        tokens = max(sums.pop("_tokens", 1.0), 1.0)
        out = {k: v / tokens for k, v in sums.items()} | summed
        out["loss"] = total_loss
        out |= self.policy.end_update()
        out["nonfinite_microbatches"] = float(nonfinite)
        out["skipped_update"] = float(skipped)  # same on every rank (all-reduced decision)
        out["recomputed_old_logprobs"] = float(spec.old_logprobs == RECOMPUTE)
        out["rollout_old_logprobs"] = float(spec.old_logprobs == ROLLOUT)
        out["frozen_logprob_s"] = t_frozen
        out["update_s"] = time.perf_counter() - t0 - t_frozen
        return out
