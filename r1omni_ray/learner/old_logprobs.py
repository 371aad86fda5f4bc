"""Which log-probs one GRPO step uses, as a pure function: the one decision.

Three policies stand behind a step (r1omni_ray/rollout_correction.py): behaviour (the weights that sampled),
proximal (the learners' weights before this update: the PPO clip's anchor) and the one being optimised.
The proximal log-probs come from:
- FORWARD: the training forward's own, detached. With one optimizer step per step, the weights of that
  forward ARE the learners' current weights, on-policy or not: no extra pass (learner.old_logprobs: auto).
- RECOMPUTE: a no-grad pass on the learners before the update (learner.old_logprobs: recompute): the same
  values up to kernel order; and always with several optimizer steps per batch (grpo.num_iterations,
  grpo.mini_batches), whose later forwards run on weights already updated.
- BEHAVIOUR: the engine's own sampling log-probs (learner.old_logprobs: behaviour): the clip is then around
  the behaviour policy (plain off-policy PPO) and no separate correction applies.
The behaviour log-probs (recorded by the rollout engine as it samples) weight every token by
proximal/behaviour (learner.rollout_correction) whenever a sample was drawn by other weights than the
learners' (the step is off-policy: they are then required), and on-policy too whenever the engine recorded
them (another engine's kernels, vLLM in bf16, are corrected the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from r1omni_ray.config import RunConfig
from r1omni_ray.rollout_correction import CORRECTIONS

FORWARD, RECOMPUTE, BEHAVIOUR = "forward", "recompute", "behaviour"
PROXIMAL_SOURCES = (FORWARD, RECOMPUTE, BEHAVIOUR)


@dataclass(frozen=True)
class LogprobPlan:
    """Where a step's proximal log-probs come from, whether the behaviour log-probs are compared with them (the
    off-policy metrics), and the correction applied with them ("none": measured, not applied)."""

    proximal: str = FORWARD
    correction: str = "none"
    behaviour: bool = False

    def __post_init__(self) -> None:
        if self.proximal not in PROXIMAL_SOURCES:
            raise ValueError(f"LogprobPlan.proximal: {self.proximal!r} is not one of {PROXIMAL_SOURCES}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"LogprobPlan.correction: {self.correction!r} is not one of {CORRECTIONS}")

        if self.correction != "none" and not self.behaviour:
            raise ValueError("LogprobPlan: a correction needs the behaviour log-probs (behaviour=True)")

    @property
    def needs_behaviour(self) -> bool:
        return self.proximal == BEHAVIOUR or self.behaviour


class MissingBehaviourLogprobs(ValueError):
    """An off-policy step whose completions lack the engine's sampling log-probs: training on them without a
    correction would treat stale samples as on-policy."""


def behaviour_logprobs_requested(cfg: RunConfig) -> bool:
    """Whether the rollout engine records its sampling log-probs: always when steps may be off-policy
    (train.max_staleness > 0), else on request (rollout.sampling_logprobs)."""
    return cfg.rollout.sampling_logprobs or cfg.train.max_staleness > 0


def old_logprob_source(cfg: RunConfig, sample_versions: Sequence[int], learner_version: int,
                       behaviour_present: bool) -> LogprobPlan:
    """The LogprobPlan of one step (module docstring). sample_versions: the weight version each prompt's
    samples were drawn with; behaviour_present: every completion carries the engine's sampling log-probs."""
    off_policy = any(v != learner_version for v in sample_versions)
    if off_policy and not behaviour_present:
        raise MissingBehaviourLogprobs(
            f"samples drawn with weight versions {sorted(set(sample_versions))} but the learners are at "
            f"{learner_version}, and the rollout engine did not record its sampling log-probs")
    src = cfg.learner.old_logprobs
    if src == BEHAVIOUR and off_policy:
        return LogprobPlan(BEHAVIOUR, "none")  # the ratio itself is against the behaviour policy
    proximal = RECOMPUTE if src == RECOMPUTE or cfg.grpo.updates_per_step() > 1 else FORWARD
    if not behaviour_present:
        return LogprobPlan(proximal)
    return LogprobPlan(proximal, cfg.learner.rollout_correction, behaviour=True)
