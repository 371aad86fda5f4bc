"""Rewards that see the whole sample (register_reward(context=True)): the context the pipeline builds, arguments
from the config checked at start-up, and DAPO's overlong shaping against its formula."""

from types import SimpleNamespace

import pytest

from actors.batch_pipeline import BatchPipeline
from actors.rollout import PromptSamples
from r1omni_ray.config import ConfigError, config_from_dict, load_config
from r1omni_ray.engines.base import Completion
from r1omni_ray.labels import AUDIO_TOKEN_INDEX, VIDEO_TOKEN_INDEX
from r1omni_ray.rewards import (
    RewardSpec,
    SampleContext,
    check_reward_specs,
    overlong_reward,
    score_completions,
)

GOOD = "<think>x</think><answer>sad</answer>"


def dapo_overlong(length: int, max_len: int, cache: int) -> float:
    """DAPO eq. 13: R_length(y) = 0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache if
    L_max - L_cache < |y| <= L_max; -1 if L_max < |y|."""
    if length <= max_len - cache:
        return 0.0
    if length <= max_len:
        return ((max_len - cache) - length) / cache
    return -1.0


@pytest.mark.parametrize("length", [0, 1, 50, 60, 61, 75, 99, 100, 120])
def test_overlong_follows_dapo(length):
    ctx = SampleContext("<answer>sad</answer>", length=length, finish_reason="stop", max_new_tokens=100)
    assert overlong_reward(GOOD, ctx, buffer=40) == pytest.approx(dapo_overlong(length, 100, 40), abs=1e-12)
    # its own max_len beats the run's limit; a completion cut at the limit is the longest kind: -1
    assert overlong_reward(GOOD, ctx, buffer=10, max_len=80) == pytest.approx(dapo_overlong(length, 80, 10))
    cut = SampleContext("<answer>sad</answer>", length=length, finish_reason="length", max_new_tokens=100)
    assert overlong_reward(GOOD, cut, buffer=40) == -1.0


def test_context_rewards_get_the_context_and_plain_ones_the_solution():
    import tests.custom_recipes  # noqa: F401 - registers test_audio_bonus

    specs = [RewardSpec("accuracy"), RewardSpec("test_audio_bonus", 1.0, {"bonus": 0.5}),
             RewardSpec("overlong", 2.0, {"buffer": 4})]
    ctxs = [SampleContext("<answer>sad</answer>", has_audio=True, length=3, finish_reason="stop", max_new_tokens=10),
            SampleContext("<answer>sad</answer>", has_audio=False, length=10, finish_reason="length",
                          max_new_tokens=10)]
    b = score_completions([GOOD, GOOD], ctxs, specs)
    assert b.per_reward == {"accuracy": [1.0, 1.0], "test_audio_bonus": [0.5, 0.0], "overlong": [0.0, -1.0]}
    assert b.total == [1.5, -1.0] and b.errors == {"accuracy": 0, "test_audio_bonus": 0, "overlong": 0}
    # bare solutions still work: a context reward then sees a context with the solution only
    b = score_completions([GOOD], ["<answer>sad</answer>"], [RewardSpec("overlong", 1.0, {"buffer": 4})])
    assert b.per_reward["overlong"] == [0.0] and b.errors["overlong"] == 1  # no max_len anywhere: counted, 0


def test_reward_arguments_come_from_the_config_and_are_checked_at_start():
    cfg = load_config(None, ["reward.rewards=[{name: accuracy}, {name: overlong, weight: 0.5, args: {buffer: 64}}]"])
    assert cfg.reward.rewards[1].args == {"buffer": 64}
    specs = [RewardSpec(r.name, r.weight, r.args) for r in cfg.reward.rewards]
    check_reward_specs(specs)
    with pytest.raises(ValueError, match=r"reward.rewards\[1\].args: 'overlong' does not take \['bufer'\]"):
        check_reward_specs([RewardSpec("accuracy"), RewardSpec("overlong", 1.0, {"bufer": 64})])
    with pytest.raises(ValueError, match=r"reward.rewards\[0\].args: 'accuracy' does not take \['x'\]"):
        check_reward_specs([RewardSpec("accuracy", 1.0, {"x": 1})])
    with pytest.raises(ConfigError, match=r"reward.rewards\[0\].args: expected a mapping"):
        load_config(None, ["reward.rewards=[{name: overlong, args: 3}]"])


def test_the_pipeline_gives_each_completion_its_context():
    cfg = config_from_dict({"rollout": {"group_size": 2, "max_new_tokens": 9}})
    pipe = BatchPipeline(cfg, SimpleNamespace(), [])
    inputs = SimpleNamespace(solution="<answer>sad</answer>", label="sad", prompt_ids=[1, AUDIO_TOKEN_INDEX, 2])
    both = SimpleNamespace(solution="<answer>joy</answer>", label="joy",
                           prompt_ids=[VIDEO_TOKEN_INDEX, AUDIO_TOKEN_INDEX])
    g1 = PromptSamples(0, "rec-a", inputs, [Completion([5, 6], "a", "stop"), Completion([5] * 9, "b", "length")])
    g2 = PromptSamples(1, "rec-b", both, [Completion([], "", "stop"), Completion([7], "c", "stop")])
    ctxs = pipe.contexts([g1, g2])
    assert [(c.record_id, c.label, c.has_video, c.has_audio, c.length, c.finish_reason) for c in ctxs] == [
        ("rec-a", "sad", False, True, 2, "stop"), ("rec-a", "sad", False, True, 9, "length"),
        ("rec-b", "joy", True, True, 0, "stop"), ("rec-b", "joy", True, True, 1, "stop")]
    assert {c.max_new_tokens for c in ctxs} == {9} and ctxs[2].solution == "<answer>joy</answer>"
