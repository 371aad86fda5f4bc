"""Custom rewards for the system and fault-injection tests, registered in whichever process imports this module
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


@register_reward("test_slow_parity")
def slow_parity(completion: str, solution: str) -> float:
    """Slow enough for a test to kill its actor mid-call."""
    time.sleep(2.0)
    return float(len(completion) % 2)


@register_reward("test_letter_e")
def letter_e_rate(completion: str, solution: str) -> float:
    """Share of the completion's characters that are 'e': dense, varies within a group and rises as soon as
    the policy favours tokens with an 'e' in them, so a short run shows learning (the emotion task needs
    hundreds of steps)."""
    return completion.count("e") / max(1, len(completion))


@register_reward("test_paced")
def paced(completion: str, solution: str) -> float:
    """Scores 0; while the file named by R1OMNI_TEST_PACE_FILE exists, takes 50 ms per sample: a test holds a
    submitted job's steps long enough to act on it mid-run, then lets it finish at full speed."""
    import os

    flag = os.environ.get("R1OMNI_TEST_PACE_FILE")
    if flag and os.path.exists(flag):
        time.sleep(0.05)
    return 0.0
