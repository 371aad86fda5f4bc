"""Where one GRPO step's old log-probs come from: the one decision, as a pure function.

The old log-probs are the sampling policy's, the denominator of the importance ratio. Three sources:
- FORWARD: every sample was drawn with the learners' current weights (on-policy): the training forward's own
  log-probs, detached, are the old ones; no extra pass.
- ROLLOUT: some sample was drawn with other weights (the overlapped schedule, a re-issued prompt), and the
  rollout engine recorded its own sampling log-probs for every completion, and the config lets them stand in
  (learner.old_logprobs: rollout, or auto with the hf engine, whose kernels are the learners').
- RECOMPUTE: a no-grad pass on the learners before the update: asked for (learner.recompute_old_logprobs), or
  off-policy without usable engine log-probs.
"""

from __future__ import annotations

from collections.abc import Sequence

from r1omni_ray.config import RunConfig

FORWARD, ROLLOUT, RECOMPUTE = "forward", "rollout", "recompute"
SOURCES = (FORWARD, ROLLOUT, RECOMPUTE)


def engine_logprobs_allowed(cfg: RunConfig) -> bool:
    """Whether off-policy steps may take the old log-probs from the rollout engine (learner.old_logprobs):
    also whether the engine is asked to record them when the schedule is overlapped."""
    src = cfg.learner.old_logprobs
    return src == ROLLOUT or (src == "auto" and cfg.rollout.engine == "hf")


def old_logprob_source(cfg: RunConfig, sample_versions: Sequence[int], learner_version: int,
                       engine_logprobs_present: bool) -> str:
    """FORWARD, ROLLOUT or RECOMPUTE for one step (see the module docstring). sample_versions: the weight
    version each prompt's samples were drawn with; engine_logprobs_present: every completion carries the
    engine's sampling log-probs."""
    if cfg.learner.recompute_old_logprobs:
        return RECOMPUTE
    if all(v == learner_version for v in sample_versions):
        return FORWARD
    if engine_logprobs_allowed(cfg) and engine_logprobs_present:
        return ROLLOUT
    return RECOMPUTE
