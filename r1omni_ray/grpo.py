"""GRPO maths: group advantages, KL estimators, clipped policy loss (log-probs: model/logprobs.py).

Pure torch, no Ray/DeepSpeed, so every piece can be unit-tested on CPU in float64.

Loss normalisation under gradient accumulation / data parallel
---------------------------------------------------------------
``policy_loss`` normalises by *global* counts (``num_global_tokens`` / ``num_global_seqs``): the
totals over every micro-batch of the optimizer step on every data-parallel rank. With those, the
SUM of the per-micro-batch losses over all ranks is exactly the full-batch loss, whatever the
micro-batch sizes or padding. Frameworks do not sum, though: DDP/DeepSpeed all-reduce gradients
with a MEAN over ``dp_world_size`` ranks, and DeepSpeed/Accelerate divide each micro-batch loss by
``grad_accum``. A caller using such a framework must therefore multiply each micro-batch loss by
``grad_scale_for_framework(dp_world_size, grad_accum) == dp_world_size * grad_accum`` before
``backward()`` to recover the exact global gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from r1omni_ray.policy_losses import POLICY_LOSSES, token_log_ratio

ADVANTAGE_SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


# ----------------------------------------------------------------------------- advantages


def flat_groups(rewards: Tensor, group_size: int) -> Tensor:
    """``[B]`` booleans: the groups of flat, group-contiguous rewards ``[B*G]`` whose rewards are all equal. Such
    a group has zero advantage and no learning signal: the one definition behind the advantages, the
    zero-signal metric and DAPO's group filter."""
    grouped = rewards.view(-1, group_size)
    return grouped.amax(dim=1) == grouped.amin(dim=1)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages for flat, group-contiguous rewards ``[B*G]`` -> ``[B*G]``.

    * ``"group"``: ``(r - mean_g) / (std_g + eps)``, unbiased std as ``Tensor.std`` (R1-Omni/TRL).
    * ``"batch"``: ``(r - mean_g) / (std over the whole batch + eps)``.
    * ``"none"``:  ``r - mean_g`` (Dr. GRPO).

    A group whose rewards are all equal gets exactly 0 (no rounding noise amplified by 1/eps), and
    ``group_size == 1`` gives zeros rather than NaN.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; expected one of {ADVANTAGE_SCALES}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be flat [B*G], got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) is not divisible by group_size ({group_size})"
        )
    if not torch.is_floating_point(rewards):
        rewards = rewards.to(torch.get_default_dtype())
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf")
    if group_size == 1 or rewards.numel() == 0:
        return torch.zeros_like(rewards)

    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (rewards.std() + eps)
    # mean() of identical floats need not equal them exactly (and eps=0 would give 0/0):
    # force flat groups to exact zero after the division.
    return centered.masked_fill(flat_groups(rewards, group_size)[:, None], 0.0).reshape(-1)


# ----------------------------------------------------------------------------- KL


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k3", clamp: float | None = 10.0) -> Tensor:
    """Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    With ``log_ratio = ref_logp - logp``: k1 = -log_ratio, k2 = log_ratio**2 / 2,
    k3 = exp(log_ratio) - log_ratio - 1 (unbiased and >= 0). The log-ratio and the result are
    clamped to ``[-clamp, clamp]`` so one wild token cannot blow up the loss.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape")
    log_ratio = ref_logp - logp
    if clamp is not None:
        log_ratio = log_ratio.clamp(-clamp, clamp)
    if kind == "k1":
        kl = -log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio.square()
    else:
        kl = torch.expm1(log_ratio) - log_ratio  # expm1 keeps precision for small ratios
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl


# ----------------------------------------------------------------------------- loss


@dataclass
class LossConfig:
    policy_loss: str = "ppo_clip"  # a key of r1omni_ray.policy_losses.POLICY_LOSSES
    clip_eps_low: float | None = None  # None: the policy loss's own default
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    beta: float = 0.04
    kl_estimator: str = "k3"
    loss_agg: str = "seq_mean_token_mean"
    max_len: int | None = None
    kl_clamp: float | None = 10.0

    def __post_init__(self) -> None:
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"policy_loss: {self.policy_loss!r} is not one of {sorted(POLICY_LOSSES)}")
        lo, hi = POLICY_LOSSES[self.policy_loss].clip_eps
        self.clip_eps_low = lo if self.clip_eps_low is None else self.clip_eps_low
        self.clip_eps_high = hi if self.clip_eps_high is None else self.clip_eps_high
        if not 0.0 <= self.clip_eps_low < 1.0:
            raise ValueError(f"clip_eps_low: {self.clip_eps_low} must be in [0, 1) so that 1 - eps > 0")
        if self.clip_eps_high < 0.0:
            raise ValueError(f"clip_eps_high: {self.clip_eps_high} must be >= 0")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip: {self.dual_clip} must be > 1 (or null)")
        if self.beta < 0.0:
            raise ValueError(f"beta: {self.beta} must be >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator: {self.kl_estimator!r} is not one of {list(KL_ESTIMATORS)}")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg: {self.loss_agg!r} is not one of {list(LOSS_AGGS)}")
        if self.loss_agg == "seq_mean_token_sum_norm":
            if self.max_len is None or not isinstance(self.max_len, int) or self.max_len < 1:
                raise ValueError(
                    f"loss_agg='seq_mean_token_sum_norm' (Dr. GRPO) needs a positive int max_len, "
                    f"got {self.max_len!r}"
                )
        elif self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 0):
            # Unused outside Dr. GRPO; callers may pass the batch width, 0 for an empty batch.
            raise ValueError(f"max_len must be a non-negative int or None, got {self.max_len!r}")
        if self.kl_clamp is not None and not self.kl_clamp > 0.0:
            raise ValueError(f"kl_clamp: {self.kl_clamp} must be > 0 (or null)")


def grad_scale_for_framework(dp_world_size: int, grad_accum: int) -> float:
    """Factor to multiply each micro-batch loss by when the framework AVERAGES gradients.

    ``policy_loss`` with global counts is built to be SUMMED over micro-batches and ranks;
    DDP/DeepSpeed instead average over ``dp_world_size`` ranks and ``grad_accum`` steps.
    """
    if dp_world_size < 1 or grad_accum < 1:
        raise ValueError(f"dp_world_size and grad_accum must be >= 1, got {dp_world_size}, {grad_accum}")
    return float(dp_world_size * grad_accum)


def _check_count(name: str, value: float | int | Tensor | None) -> None:
    if value is None:
        return
    v = float(value.detach()) if isinstance(value, Tensor) else float(value)
    if not v > 0.0:
        raise ValueError(f"{name} must be > 0, got {v}")


def _aggregate(
    per_token: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    num_global_tokens: float | int | Tensor | None,
    num_global_seqs: float | int | Tensor | None,
) -> Tensor:
    masked = per_token * mask
    if cfg.loss_agg == "token_mean":
        denom = mask.sum().clamp(min=1.0) if num_global_tokens is None else num_global_tokens
        return masked.sum() / denom
    seqs = per_token.shape[0] if num_global_seqs is None else num_global_seqs
    if cfg.loss_agg == "seq_mean_token_mean":
        # Empty rows: 0 / 1 = 0, never NaN.
        per_seq = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    else:  # seq_mean_token_sum_norm: a constant length normaliser removes GRPO's length bias
        per_seq = masked.sum(dim=1) / float(cfg.max_len)  # type: ignore[arg-type]
    return per_seq.sum() / seqs


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    num_global_tokens: float | int | Tensor | None = None,
    num_global_seqs: float | int | Tensor | None = None,
    is_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The policy-gradient surrogate ``cfg.policy_loss`` (+ beta * KL) for ``[B, T]`` token log-probs.

    ``old_logp`` is the clip's anchor: the proximal policy's log-probs (decoupled PPO). ``is_weight`` (``[B, T]``,
    detached) multiplies each token's policy-gradient term: the off-policy correction proximal/behaviour of
    r1omni_ray.rollout_correction (a weight of 0 drops a token; the KL term is not reweighted).

    ``advantages`` is ``[B]`` (one per sequence) or ``[B, T]``; ``mask`` is 1 on completion tokens.
    Per token (ppo_clip; the others: r1omni_ray/policy_losses.py): ``-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)``;
    with ``dual_clip=c`` the loss of
    tokens with ``A < 0`` is additionally capped at ``-c*A`` (dual-clip PPO). Aggregation follows
    ``cfg.loss_agg``; pass ``num_global_tokens`` / ``num_global_seqs`` (totals over all
    micro-batches and ranks) to make the per-micro-batch losses sum to the global loss — see the
    module docstring for frameworks that average instead.

    Metrics: "loss", "policy_loss" and "kl_loss" use the loss's aggregation (so they also sum
    across micro-batches); the others are local masked token means/extremes (0.0 when no token).
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp), ("entropy", entropy),
                    ("is_weight", is_weight)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(logp.shape)} like logp")
    if advantages.shape == logp.shape[:1]:
        adv = advantages.unsqueeze(1)
    elif advantages.shape == logp.shape:
        adv = advantages
    else:
        raise ValueError(
            f"advantages must be [B]={tuple(logp.shape[:1])} or [B, T], got {tuple(advantages.shape)}"
        )
    _check_count("num_global_tokens", num_global_tokens)
    _check_count("num_global_seqs", num_global_seqs)

    adv = adv.to(logp.dtype).detach()
    valid = mask.bool()
    m = valid.to(logp.dtype)
    old_logp = old_logp.detach()

    # The surrogate (r1omni_ray/policy_losses.py); padding's log-ratio is 0 there, so no NaN leaks through 0 * inf.
    assert cfg.clip_eps_low is not None and cfg.clip_eps_high is not None  # resolved by LossConfig
    terms = POLICY_LOSSES[cfg.policy_loss].fn(logp, old_logp, adv, valid, cfg.clip_eps_low, cfg.clip_eps_high)
    pg, ratio = terms.pg, terms.ratio
    dual_active = torch.zeros_like(valid)
    if cfg.dual_clip is not None:
        bound = -cfg.dual_clip * adv  # > 0 where adv < 0
        dual_active = (adv < 0) & (pg > bound)
        pg = torch.where(dual_active, bound, pg)
    if is_weight is not None:
        pg = pg * torch.where(valid, is_weight.detach().to(pg.dtype), torch.zeros_like(pg))

    kl = None
    if cfg.beta > 0.0 and ref_logp is not None:
        safe_ref = torch.where(valid, ref_logp.detach(), logp.detach())
        safe_logp = torch.where(valid, logp, logp.detach())
        kl = kl_estimate(safe_logp, safe_ref, cfg.kl_estimator, cfg.kl_clamp)
        kl = torch.where(valid, kl, torch.zeros_like(kl))
        per_token = pg + cfg.beta * kl
    else:
        per_token = pg

    loss = _aggregate(per_token, m, cfg, num_global_tokens, num_global_seqs)

    with torch.no_grad():
        n_tok = int(valid.sum())

        def tmean(x: Tensor) -> float:
            return float(torch.where(valid, x, 0.0).sum() / n_tok) if n_tok else 0.0

        clip_active = terms.clipped  # the clipped branch won: the token's gradient is cut
        if kl is not None:
            kl_loss = _aggregate(cfg.beta * kl, m, cfg, num_global_tokens, num_global_seqs)
            kl_tok = tmean(kl)
        else:
            kl_loss, kl_tok = torch.zeros(()), 0.0
        metrics: dict[str, float] = {
            "loss": float(loss),
            "policy_loss": float(_aggregate(pg, m, cfg, num_global_tokens, num_global_seqs)),
            "kl_loss": float(kl_loss),
            "kl": kl_tok,
            "clip_frac": tmean(clip_active.to(m.dtype)),
            "dual_clip_frac": tmean(dual_active.to(m.dtype)),
            "ratio_mean": tmean(ratio),
            "ratio_max": float(ratio[valid].max()) if n_tok else 0.0,
            "ratio_min": float(ratio[valid].min()) if n_tok else 0.0,
            "approx_kl": 0.5 * tmean(token_log_ratio(logp, old_logp, valid).square()),
            "num_tokens": float(n_tok),
        }
        if entropy is not None:
            metrics["entropy"] = tmean(entropy.detach())
    return loss, metrics
