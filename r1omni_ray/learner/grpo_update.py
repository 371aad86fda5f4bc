"""One GRPO update on one data-parallel rank: reference log-probs, old log-probs only when the batch is
off-policy, then the clipped policy loss over micro-batches. Ray-free; the learner actor wraps it."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from r1omni_ray.config import RunConfig
from r1omni_ray.data.processor import prompt_modalities
from r1omni_ray.data.sampler import split_even
from r1omni_ray.grpo import policy_loss
from r1omni_ray.learner.old_logprobs import BEHAVIOUR, FORWARD, RECOMPUTE, LogprobPlan
from r1omni_ray.learner.policy import DeepSpeedPolicy, micro_slices
from r1omni_ray.learner.reference import ParkedWeights
from r1omni_ray.rollout_correction import (
    RATIO_MAX_KEY,
    Correction,
    correction_sums,
    correction_weights,
    modality_tag,
)
from r1omni_ray.step_metrics import GLOBALLY_NORMALISED


@dataclass
class TrainBatch:
    """One rank's share of a step: prompts (media resolved) and the completions that refer to them."""

    prompts: list[Any]  # OmniInputs
    prompt_index: list[int]
    completions: list[list[int]]
    advantages: list[float]
    # The behaviour log-probs: per completion token, as the rollout engine recorded them while sampling.
    sampling_logprobs: list[list[float]] | None = None
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

    def behaviour_logprobs(self, width: int) -> torch.Tensor:
        """The behaviour (sampling) log-probs as a right-padded [N, width] tensor (padding is masked)."""
        if self.sampling_logprobs is None:
            raise ValueError("the step's LogprobPlan needs behaviour log-probs but the batch carries none "
                             "(the rollout engine was not asked to record them)")
        out = torch.zeros(len(self.completions), width)
        for i, (lp, c) in enumerate(zip(self.sampling_logprobs, self.completions, strict=True)):
            if len(lp) != len(c):
                raise ValueError(f"completion {i}: {len(lp)} sampling log-probs for {len(c)} tokens")
            out[i, : len(lp)] = torch.tensor(lp)
        return out

    def row_modalities(self) -> list[str]:
        """Each completion's prompt modality (metrics split: which modality drifts)."""
        tags = [modality_tag(*prompt_modalities(p)) for p in self.prompts]
        return [tags[i] for i in self.prompt_index]


@dataclass(frozen=True)
class StepSpec:
    """What every rank must agree on (ZeRO-3 forwards are collective): micro-batches per rank, which log-probs
    the step uses (a RECOMPUTE pass runs on every rank), and the global counts the loss divides by."""

    num_micro: int
    num_global_tokens: int
    num_global_seqs: int
    max_len: int
    logprobs: LogprobPlan = LogprobPlan()  # learner/old_logprobs.py
    # grpo.mini_batches > 1: each mini-batch's global (tokens, sequences), what its optimizer step's loss divides
    # by (mini_batch_counts); empty: one mini-batch, the whole step.
    mini_counts: tuple[tuple[int, int], ...] = ()

    def mini_batches(self) -> list[tuple[range, int, int]]:
        """(micro-batch indices, global tokens, global sequences) of each optimizer step of one pass."""
        if not self.mini_counts:
            return [(range(self.num_micro), self.num_global_tokens, self.num_global_seqs)]
        parts = split_even(self.num_micro, len(self.mini_counts))
        return [(r, t, n) for r, (t, n) in zip(parts, self.mini_counts, strict=True)]


def mini_batch_counts(shards: Sequence[Any], num_micro: int, micro_batch_size: int,
                      mini_batches: int) -> tuple[tuple[int, int], ...]:
    """Each mini-batch's (tokens, sequences) over every rank: mini-batch j is the same contiguous run of
    micro-batches on each rank (split_even of num_micro), cut as the learners cut them (micro_slices); padding
    copies (weight 0) count nothing. At most num_micro mini-batches; () for one."""
    m = min(mini_batches, num_micro)
    if m <= 1:
        return ()
    counts = [[0, 0] for _ in range(m)]
    parts = split_even(num_micro, m)
    for sh in shards:
        slices = micro_slices(len(sh.completions), num_micro, sh.prompt_index, micro_batch_size)
        weights = sh.weights or [1.0] * len(sh.completions)
        for j, part in enumerate(parts):
            for k in part:
                for i in range(slices[k].start, slices[k].stop):
                    if weights[i] > 0:
                        counts[j][0] += len(sh.completions[i])
                        counts[j][1] += 1
    # an optimizer step over only empty completions still divides by something (its loss is 0 anyway)
    return tuple((max(t, 1), max(n, 1)) for t, n in counts)


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
        plan = spec.logprobs
        recomputed: list[torch.Tensor] | None = None
        if plan.proximal == RECOMPUTE:
            module.eval()
            recomputed = self._frozen_logprobs(module, batch, slices)
        t_frozen = time.perf_counter() - t0
        loss_cfg = self.cfg.grpo.loss_config(spec.max_len, with_reference=ref is not None)
        corr_cfg = dataclasses.replace(self.cfg.learner.correction(), mode=plan.correction)
        corr_sums: dict[str, float] = {}
        corrs: dict[int, Correction] = {}  # micro-batch index -> its correction
        ratio_max = 0.0
        passes, minis = self.cfg.grpo.num_iterations, spec.mini_batches()
        if (passes > 1 or len(minis) > 1) and plan.proximal == FORWARD:
            raise ValueError("several optimizer steps per batch need proximal log-probs fixed before the first "
                             f"(a {RECOMPUTE} or {BEHAVIOUR} plan), got {plan}")
        sums: dict[str, float] = {}
        summed: dict[str, float] = {}
        total_loss, nonfinite, skipped = 0.0, 0, False
        # grpo.num_iterations passes over the batch, each mini-batch one optimizer step; the proximal log-probs,
        # the reference's and the correction's stay those computed before the first.
        for sub_step, (micros, n_tokens, n_seqs) in enumerate(m for _ in range(passes) for m in minis):
            scale = self.policy.begin_update(len(micros), sub_step)
            bad_here = 0
            for k in micros:
                sub = batch.sub(slices[k])
                lp, mask, ent = self._logprobs(module, sub, with_entropy=True)
                mask = sub.loss_mask(mask)
                # float32 as the engine recorded them: a bf16 copy would move the importance ratios by ~1%.
                behaviour = sub.behaviour_logprobs(lp.shape[1]).to(lp.device) if plan.needs_behaviour else None
                # The proximal policy (the clip's anchor) is the learners' weights before this step's first
                # update: FORWARD: this forward's own log-probs, detached (one optimizer step per batch only);
                # RECOMPUTE: the pass before the update; BEHAVIOUR clips around the policy that sampled instead.
                if plan.proximal == RECOMPUTE:
                    assert recomputed is not None
                    prox = recomputed[k].to(lp)
                elif plan.proximal == BEHAVIOUR:
                    assert behaviour is not None
                    prox = behaviour.to(lp)
                else:
                    prox = lp.detach()
                weight = None
                if plan.behaviour:  # measured whenever the engine recorded them; applied unless correction is none
                    assert behaviour is not None
                    # Once per micro-batch: with several optimizer steps the proximal log-probs are fixed
                    # (a pass before the first), so later passes reuse the weights and count nothing twice.
                    if k not in corrs:
                        corrs[k] = correction_weights(prox.float(), behaviour, mask.float(), corr_cfg)
                        for name, v in correction_sums(corrs[k], mask, sub.row_modalities()).items():
                            corr_sums[name] = corr_sums.get(name, 0.0) + v
                        if bool(mask.bool().any()):
                            ratio_max = max(ratio_max, float(corrs[k].ratio[mask.bool()].max()))
                    weight = corrs[k].weight if plan.correction != "none" else None
                ref_lp = ref[k].to(lp) if ref is not None else None
                adv = torch.tensor(sub.advantages, dtype=lp.dtype, device=lp.device)
                loss, metrics = policy_loss(lp, prox, adv, mask, loss_cfg, ref_logp=ref_lp, entropy=ent,
                                            num_global_tokens=n_tokens, num_global_seqs=n_seqs, is_weight=weight)
                loss, bad, step_skipped = self.policy.backward_micro(loss, lp, scale, bad_here > 0)
                if self.policy.at_boundary != (k == micros[-1]):  # an optimizer step must end each mini-batch
                    raise RuntimeError(f"DeepSpeed's accumulation boundary fell at micro-batch {k} of {list(micros)}")
                bad_here += bad
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
            nonfinite += bad_here
        # Each optimizer step's globally normalised terms sum to its loss: report their mean over the steps.
        n_steps = passes * len(minis)
        summed = {k: v / n_steps for k, v in summed.items()}
        total_loss /= n_steps
        tokens = max(sums.pop("_tokens", 1.0), 1.0)
        out = {k: v / tokens for k, v in sums.items()} | summed
        out["loss"] = total_loss
        out |= self.policy.end_update()
        out["nonfinite_microbatches"] = float(nonfinite)
        out["skipped_update"] = float(skipped)  # same on every rank (all-reduced decision)
        out["optimizer_steps"] = float(n_steps)
        out["recomputed_old_logprobs"] = float(plan.proximal == RECOMPUTE)
        out["behaviour_old_logprobs"] = float(plan.proximal == BEHAVIOUR)
        out["corrected_step"] = float(plan.correction != "none")
        if plan.behaviour:  # the same keys on every rank (the plan is the step's)
            out |= corr_sums
            out[RATIO_MAX_KEY] = ratio_max
        out["frozen_logprob_s"] = t_frozen
        out["update_s"] = time.perf_counter() - t0 - t_frozen
        return out
