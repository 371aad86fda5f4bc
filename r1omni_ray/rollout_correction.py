"""Off-policy correction: importance weights between the proximal and the behaviour policy. Pure torch.

Three policies stand behind an off-policy step's log-probs:
- behaviour: the weights that sampled the completion (the rollout engine records its log-probs as it samples);
- proximal: the learners' current weights before this update, the anchor of the PPO clip (decoupled PPO);
- the policy being optimised, whose log-probs carry the gradient.
The clip keeps the update near the proximal policy; the correction here reweights each token (or sequence)
by proximal / behaviour, so samples drawn by older weights (or by another engine's kernels: vLLM in bf16)
count as the proximal policy would have drawn them. Modes:
- ``tis``: token weights ``min(rho_t, cap)`` (truncated importance sampling);
- ``mis``: token weights ``rho_t`` inside ``band = [lo, hi]``, 0 outside (masked importance sampling);
- ``seq_tis`` / ``seq_mis``: the same with the sequence ratio ``prod_t rho_t`` applied to all its tokens;
- ``none``: weight 1 everywhere.
These are verl's token/sequence IS (``min(rho, C)``, ``min(prod rho, C)``) and its token/sequence rejection
combined with IS inside the band (docs/algo/rollout_corr_math.md). One difference: a masked token here keeps
its place in the loss's normaliser (the global token count is fixed before the learners see the ratios), where
verl drops it from the denominator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

CORRECTIONS = ("none", "tis", "mis", "seq_tis", "seq_mis")
# Beyond exp(20) a weight is truncated or masked anyway; bounding the log-ratio only keeps exp() finite.
_MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class CorrectionConfig:
    mode: str = "tis"
    cap: float = 2.0  # tis / seq_tis: weights truncated at cap (> 1)
    band: tuple[float, float] = (0.5, 2.0)  # mis / seq_mis: ratios outside [lo, hi] are masked (lo <= 1 <= hi)

    def __post_init__(self) -> None:
        if self.mode not in CORRECTIONS:
            raise ValueError(f"rollout_correction: {self.mode!r} is not one of {list(CORRECTIONS)}")
        if not self.cap > 1.0:
            raise ValueError(f"correction_cap: {self.cap!r} must be > 1 (a cap <= 1 truncates every on-policy token)")
        lo, hi = self.band
        if not 0.0 <= lo <= 1.0 <= hi:
            raise ValueError(f"correction_band: {list(self.band)} must be [lo, hi] with 0 <= lo <= 1 <= hi (it must "
                             "hold ratio 1, the on-policy value)")


@dataclass
class Correction:
    """Per-token tensors ``[B, T]`` (zero off the mask)."""

    weight: Tensor  # applied to each token's policy-gradient term (detached)
    ratio: Tensor  # the raw ratio the weight came from: rho_t, or the sequence's prod rho_t on each token
    corrected: Tensor  # 1.0 where the weight was truncated or the token masked
    mismatch_kl: Tensor  # k3 estimate of KL(behaviour || proximal) per token


def correction_weights(proximal: Tensor, behaviour: Tensor, mask: Tensor, cfg: CorrectionConfig) -> Correction:
    """The importance weights of ``cfg.mode`` for completion tokens where ``mask`` is 1."""
    if proximal.shape != behaviour.shape or proximal.shape != mask.shape:
        raise ValueError(f"proximal {tuple(proximal.shape)}, behaviour {tuple(behaviour.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    valid = mask.bool()
    zero = torch.zeros_like(proximal)
    log_ratio = torch.where(valid, proximal.detach() - behaviour.detach(), zero)
    # Samples of the behaviour policy: E_b[p/b - 1 - log(p/b)] = KL(b || p), >= 0 per token.
    kl = torch.where(valid, torch.expm1(log_ratio) - log_ratio, zero)
    if cfg.mode.startswith("seq_"):
        seq = log_ratio.sum(dim=1, keepdim=True).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        log_ratio = torch.where(valid, seq.expand_as(log_ratio), zero)
    ratio = torch.where(valid, log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp(), zero)
    if cfg.mode == "none":
        weight, corrected = valid.to(ratio.dtype), torch.zeros_like(ratio)
    elif cfg.mode.endswith("tis"):
        weight = ratio.clamp(max=cfg.cap)
        corrected = (valid & (ratio > cfg.cap)).to(ratio.dtype)
    else:  # mis, seq_mis
        lo, hi = cfg.band
        inside = (ratio >= lo) & (ratio <= hi)
        weight = torch.where(inside, ratio, zero)
        corrected = (valid & ~inside).to(ratio.dtype)
    return Correction(weight, ratio, corrected, kl)


# ----------------------------------------------------------------------------- metrics

SUM_PREFIX = "offpolicy_sum/"  # learner outputs summed over micro-batches and ranks, made means by the driver
RATIO_MAX_KEY = "offpolicy/is_ratio_max"
MAX_KEYS = frozenset({RATIO_MAX_KEY})  # learner outputs reduced by max over ranks
# Each summed per-token quantity and the name of its mean.
_MEAN_NAMES = {"mismatch_kl": "mismatch_kl", "is_ratio": "is_ratio_mean", "is_weight": "is_weight_mean",
               "corrected": "corrected_frac"}


def modality_tag(has_video: bool, has_audio: bool) -> str:
    """The split the off-policy and staleness metrics are reported under."""
    return {(True, True): "video_audio", (True, False): "video", (False, True): "audio"}.get(
        (has_video, has_audio), "text")


MODALITY_TAGS = ("video_audio", "video", "audio", "text")


def correction_sums(corr: Correction, mask: Tensor, row_tags: Sequence[str]) -> dict[str, float]:
    """Token sums of one micro-batch, overall and per modality tag of each row, under SUM_PREFIX keys (every
    key always present: every rank reports the same keys)."""
    valid = mask.bool()
    out: dict[str, float] = {}
    for tag in ("all", *MODALITY_TAGS):
        rows = torch.tensor([tag in ("all", t) for t in row_tags], dtype=torch.bool, device=valid.device)
        sel = valid & rows[:, None]
        vals = {"mismatch_kl": corr.mismatch_kl, "is_ratio": corr.ratio, "is_weight": corr.weight,
                "corrected": corr.corrected}
        assert vals.keys() == _MEAN_NAMES.keys()
        for name, t in vals.items():
            out[f"{SUM_PREFIX}{name}/{tag}"] = float(torch.where(sel, t, 0.0).sum())
        out[f"{SUM_PREFIX}tokens/{tag}"] = float(sel.sum())
    return out


def correction_means(sums: dict[str, float]) -> dict[str, float]:
    """SUM_PREFIX token sums (over micro-batches and ranks) -> per-token means: ``offpolicy/<name>`` overall and
    ``offpolicy/<name>/<modality>`` for the modalities that had tokens this step."""
    out: dict[str, float] = {}
    for tag in ("all", *MODALITY_TAGS):
        n = sums.get(f"{SUM_PREFIX}tokens/{tag}", 0.0)
        if n <= 0:
            continue
        suffix = "" if tag == "all" else f"/{tag}"
        for name, mean in _MEAN_NAMES.items():
            out[f"offpolicy/{mean}{suffix}"] = sums[f"{SUM_PREFIX}{name}/{tag}"] / n
    return out
