"""Custom rewards for the fault-injection tests, registered in whichever process imports this module
(the driver and, through reward.modules, the reward actors)."""

import time

from r1omni_ray.rewards import register_reward


@register_reward("test_parity")
def parity_reward(completion: str, solution: str) -> float:
    """Varies between samples of a group on a random model, so advantages (and updates) are non-zero."""
    return float(len(completion) % 2)


@register_reward("test_always_raises")
def always_raises(completion: str, solution: str) -> float:
    raise RuntimeError("injected reward failure")


@register_reward("test_hangs")
def hangs(completion: str, solution: str) -> float:
    time.sleep(3600)
    return 1.0
