"""Policy-gradient surrogates by name (``grpo.policy_loss``): each turns token log-probs into a per-token loss
``[B, T]`` that ``grpo.policy_loss`` then weights (off-policy correction), adds the KL to and aggregates
(``grpo.loss_agg``). A new one is a decorated function (``register_policy_loss``) with its own default clip
range; the config's choices are this registry's keys, and a user's own module is named in ``grpo.modules``.

* ``ppo_clip``: the token-level clipped ratio of PPO/GRPO, ``-min(r_t A, clip(r_t, 1-lo, 1+hi) A)``; clip 0.2.
* ``gspo``: GSPO (Zheng et al. 2025): one ratio per sequence, the length-normalised likelihood ratio
  ``s = exp(mean_t(log pi - log pi_old))`` over the completion's tokens, clipped as a whole:
  ``-min(s A, clip(s, 1-lo, 1+hi) A)``, the same value on each of its tokens (so ``seq_mean_token_mean`` gives
  the paper's sequence mean). The paper's clip range: 3e-4 below, 4e-4 above.
* ``gspo_token``: GSPO-token: ``s_t = sg[s] * pi_t / sg[pi_t]``, the sequence's ratio as a value and each
  token's own gradient, for token-level advantages; with one advantage per sequence its gradient is GSPO's.

On-policy (old = current) every ratio is 1 and GSPO's gradient equals GRPO's with ``seq_mean_token_mean``:
only off-policy log-probs tell them apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# exp() of a log-ratio beyond this overflows float16/bfloat16 ranges; such tokens are always clipped anyway, so
# bounding the log-ratio only removes inf/NaN, not useful gradient.
MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class PGTerms:
    pg: Tensor  # [B, T] per-token loss (0 or anything on padding: the caller masks)
    ratio: Tensor  # [B, T] the ratio the clip looked at
    clipped: Tensor  # [B, T] bool: the clipped branch won (the gradient is cut)


# fn(logp, old_logp, adv [B, 1] or [B, T], valid [B, T] bool, lo, hi) with the clip range [1 - lo, 1 + hi]
PolicyLossFn = Callable[[Tensor, Tensor, Tensor, Tensor, float, float], PGTerms]


@dataclass(frozen=True)
class PolicyLoss:
    fn: PolicyLossFn
    clip_eps: tuple[float, float]  # its default (low, high) clip range


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str, clip_eps: tuple[float, float] = (0.2, 0.2)) -> Callable[[PolicyLossFn],
                                                                                            PolicyLossFn]:
    """Register a surrogate under ``name`` with its default clip range (a name is registered once)."""

    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES and POLICY_LOSSES[name].fn is not fn:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = PolicyLoss(fn, clip_eps)
        return fn

    return deco


def _clipped_objective(ratio: Tensor, adv: Tensor, lo: float, hi: float) -> PGTerms:
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - lo, 1.0 + hi) * adv
    active = ((ratio < 1.0 - lo) & (adv < 0)) | ((ratio > 1.0 + hi) & (adv > 0))
    return PGTerms(torch.maximum(unclipped, clipped), ratio, active)


def token_log_ratio(logp: Tensor, old_logp: Tensor, valid: Tensor) -> Tensor:
    """log pi - log pi_old on completion tokens, 0 on padding (which may hold garbage or inf), bounded."""
    lr = torch.where(valid, logp - old_logp.detach(), torch.zeros_like(logp))
    return lr.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, valid: Tensor) -> Tensor:
    """``[B, 1]``: the mean token log-ratio over each completion (0 for an empty one)."""
    m = valid.to(logp.dtype)
    return (token_log_ratio(logp, old_logp, valid) * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(
        min=1.0)


@register_policy_loss("ppo_clip", clip_eps=(0.2, 0.2))
def ppo_clip(logp: Tensor, old_logp: Tensor, adv: Tensor, valid: Tensor, lo: float, hi: float) -> PGTerms:
    return _clipped_objective(torch.exp(token_log_ratio(logp, old_logp, valid)), adv, lo, hi)


@register_policy_loss("gspo", clip_eps=(3e-4, 4e-4))
def gspo(logp: Tensor, old_logp: Tensor, adv: Tensor, valid: Tensor, lo: float, hi: float) -> PGTerms:
    if adv.shape[1] != 1 and not bool((adv == adv[:, :1]).all()):
        raise ValueError("gspo takes one advantage per sequence; use gspo_token for token-level advantages")
    s = torch.exp(sequence_log_ratio(logp, old_logp, valid))  # [B, 1]
    t = _clipped_objective(s, adv[:, :1], lo, hi)
    shape = logp.shape
    return PGTerms(t.pg.expand(shape), t.ratio.expand(shape), t.clipped.expand(shape))


@register_policy_loss("gspo_token", clip_eps=(3e-4, 4e-4))
def gspo_token(logp: Tensor, old_logp: Tensor, adv: Tensor, valid: Tensor, lo: float, hi: float) -> PGTerms:
    s = torch.exp(sequence_log_ratio(logp, old_logp, valid)).detach()
    own = torch.where(valid, logp - logp.detach(), torch.zeros_like(logp))  # 0 in value, each token's gradient
    return _clipped_objective(s * torch.exp(own), adv, lo, hi)
