"""A user's own recipe module (named in grpo.modules / reward.modules): an advantage estimator, a policy loss and a
reward that reads the sample's context, registered by decorator. Used by tests/unit/test_recipes.py,
tests/unit/test_reward_context.py and the recipe matrix in tests/system."""

import torch

from r1omni_ray.advantages import AdvantageArgs, register_advantage
from r1omni_ray.policy_losses import PGTerms, register_policy_loss
from r1omni_ray.rewards import SampleContext, register_reward


@register_advantage("test_centered")
def centered(rewards: torch.Tensor, args: AdvantageArgs) -> torch.Tensor:
    """The group mean subtracted, nothing else."""
    g = rewards.view(-1, args.group_size)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)


@register_policy_loss("test_vanilla_pg", clip_eps=(0.0, 0.0))
def vanilla_pg(logp, old_logp, adv, valid, lo, hi) -> PGTerms:
    """REINFORCE on the sampled tokens: -A log pi (no ratio, no clip)."""
    ratio = torch.exp((logp - old_logp).detach()).masked_fill(~valid, 1.0)
    return PGTerms(-adv * logp.masked_fill(~valid, 0.0), ratio, torch.zeros_like(valid))


@register_reward("test_audio_bonus", context=True)
def audio_bonus(completion: str, ctx: SampleContext, bonus: float = 1.0) -> float:
    """A reward that reads the sample's context: ``bonus`` when the prompt carried audio and the answer is right."""
    return bonus if ctx.has_audio and ctx.solution in completion else 0.0
