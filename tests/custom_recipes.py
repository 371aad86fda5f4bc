"""A user's own recipe module (named in grpo.modules): one advantage estimator and one policy loss, registered
by decorator. Used by tests/unit/test_recipes.py and the recipe matrix in tests/system."""

import torch

from r1omni_ray.advantages import AdvantageArgs, register_advantage
from r1omni_ray.policy_losses import PGTerms, register_policy_loss


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
