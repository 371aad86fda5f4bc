"""The registered advantage estimators and policy losses against float64 references written from their papers'
formulas (loops over samples and tokens, no shared code), on the edges real batches have: padding holding
garbage, empty and 1-token completions, flat groups, G = 1, and off-policy log-probs (on-policy, GSPO's
gradient equals GRPO's with sequence-mean aggregation, so only off-policy ones tell them apart)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from r1omni_ray.advantages import ADVANTAGES, AdvantageArgs, compute_advantages, register_advantage
from r1omni_ray.config import ConfigError, load_config
from r1omni_ray.grpo import LossConfig, group_advantages, policy_loss
from r1omni_ray.policy_losses import POLICY_LOSSES, register_policy_loss

D = torch.float64


# ----------------------------------------------------------------------------- advantages

REWARDS = [1.0, 0.0, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 1.0, 0.0, 0.0]  # 3 groups of 4, the middle one flat


def ref_rloo(r: list[float], G: int) -> list[float]:
    out = []
    for k in range(0, len(r), G):
        g = r[k:k + G]
        out += [g[i] - (sum(g) - g[i]) / (G - 1) if G > 1 else 0.0 for i in range(G)]
    return out


def ref_whiten(x: list[float], eps: float) -> list[float]:
    m, s = statistics.fmean(x), statistics.stdev(x)
    return [(v - m) / (s + eps) for v in x]


def ref_baseline(r: list[float], G: int, eps: float) -> list[float]:
    centered = []
    for k in range(0, len(r), G):
        g = r[k:k + G]
        centered += [v - statistics.fmean(g) for v in g]
    return ref_whiten(centered, eps)


def test_each_estimator_matches_its_formula():
    r, a = torch.tensor(REWARDS, dtype=D), AdvantageArgs(4, eps=1e-4)
    assert torch.allclose(compute_advantages("rloo", r, a), torch.tensor(ref_rloo(REWARDS, 4), dtype=D), atol=1e-12)
    assert torch.allclose(compute_advantages("reinforce_pp", r, a), torch.tensor(ref_whiten(REWARDS, 1e-4), dtype=D),
                          atol=1e-12)
    assert torch.allclose(compute_advantages("reinforce_pp_baseline", r, a),
                          torch.tensor(ref_baseline(REWARDS, 4, 1e-4), dtype=D), atol=1e-12)
    for scale in ("group", "batch", "none"):
        assert torch.equal(compute_advantages("grpo", r, AdvantageArgs(4, scale)), group_advantages(r, 4, scale))


def test_group_relative_estimators_give_flat_groups_exactly_zero_and_g1_zeros():
    r = torch.tensor(REWARDS, dtype=D)
    for name in ("grpo", "rloo"):
        assert torch.equal(compute_advantages(name, r, AdvantageArgs(4))[4:8], torch.zeros(4, dtype=D))
    base = compute_advantages("reinforce_pp_baseline", r, AdvantageArgs(4))[4:8]
    assert base.abs().max() < 1e-12  # 0 minus a batch mean of (exactly) centred groups
    # REINFORCE++ has no group baseline: a flat group keeps its whitened reward
    assert compute_advantages("reinforce_pp", r, AdvantageArgs(4))[4:8].abs().min() > 0.1
    for name in ADVANTAGES:
        if name.startswith("test_"):
            continue
        assert torch.equal(compute_advantages(name, torch.tensor([3.0]), AdvantageArgs(1)), torch.zeros(1)), name
        assert compute_advantages(name, torch.zeros(0), AdvantageArgs(4)).numel() == 0


def test_bad_rewards_and_names_are_refused():
    with pytest.raises(ValueError, match="unknown advantage estimator 'nope'"):
        compute_advantages("nope", torch.zeros(4), AdvantageArgs(2))
    with pytest.raises(ValueError, match="NaN or inf"):
        compute_advantages("rloo", torch.tensor([1.0, math.nan]), AdvantageArgs(2))
    with pytest.raises(ValueError, match=r"flat \[B\*G\] with G=3"):
        compute_advantages("rloo", torch.zeros(4), AdvantageArgs(3))
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("rloo")(lambda r, a: r)
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("gspo")(lambda *a: None)


# ----------------------------------------------------------------------------- policy losses

def batch(seed: int = 0, spread: float = 0.3):
    """4 completions of lengths 3, 1, 0 (empty), 5 in width 5; padding holds inf / garbage."""
    g = torch.Generator().manual_seed(seed)
    lens = [3, 1, 0, 5]
    mask = torch.zeros(4, 5, dtype=D)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    logp = -torch.rand(4, 5, generator=g, dtype=D) * 2
    old = logp + (torch.rand(4, 5, generator=g, dtype=D) - 0.5) * 2 * spread  # off-policy
    logp = torch.where(mask.bool(), logp, torch.full_like(logp, -math.inf))
    old = torch.where(mask.bool(), old, torch.full_like(old, 7.0))
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2], dtype=D)
    return logp, old, adv, mask, lens


def ref_gspo_loss(logp, old, adv, lens, lo, hi):
    """-1/B sum_i min(s_i A_i, clip(s_i, 1-lo, 1+hi) A_i), s_i = exp(mean_t log pi/pi_old) (GSPO eq. 5-7);
    an empty completion contributes 0."""
    total = 0.0
    for i, n in enumerate(lens):
        if n == 0:
            continue
        s = torch.exp(sum(logp[i, t] - old[i, t] for t in range(n)) / n)
        total = total + torch.minimum(s * adv[i], s.clamp(1 - lo, 1 + hi) * adv[i])
    return -total / len(lens)


@pytest.mark.parametrize("eps", [(0.2, 0.2), (3e-4, 4e-4)])  # mostly unclipped; mostly clipped
@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_gspo_loss_and_gradient_match_the_paper_off_policy(name, eps):
    logp, old, adv, mask, lens = batch(spread=0.3)
    cfg = LossConfig(policy_loss=name, clip_eps_low=eps[0], clip_eps_high=eps[1], beta=0.0)
    x = logp.clone().requires_grad_(True)
    loss, m = policy_loss(x, old, adv, mask, cfg)
    loss.backward()
    y = torch.where(mask.bool(), logp, torch.zeros_like(logp)).clone().requires_grad_(True)
    want = ref_gspo_loss(y, old, adv, lens, *eps)
    want.backward()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), abs=1e-12)
    assert torch.allclose(torch.where(mask.bool(), x.grad, 0.0), torch.where(mask.bool(), y.grad, 0.0), atol=1e-12)
    assert torch.isfinite(x.grad).all() and (x.grad[~mask.bool()] == 0).all()
    if eps[0] < 1e-3:
        assert m["clip_frac"] > 0


def test_gspo_equals_grpo_on_policy_and_differs_off_policy():
    logp, _, adv, mask, _ = batch()
    grads = {}
    for name, old in (("gspo", "on"), ("ppo_clip", "on"), ("gspo", "off"), ("ppo_clip", "off")):
        lp, off, *_ = batch()
        x = lp.clone().requires_grad_(True)
        anchor = lp.detach() if old == "on" else off
        cfg = LossConfig(policy_loss=name, clip_eps_low=0.2, clip_eps_high=0.2, beta=0.0)
        policy_loss(x, anchor, adv, mask, cfg)[0].backward()
        grads[name, old] = torch.where(mask.bool(), x.grad, 0.0)
    assert torch.allclose(grads["gspo", "on"], grads["ppo_clip", "on"], atol=1e-12)
    assert not torch.allclose(grads["gspo", "off"], grads["ppo_clip", "off"], atol=1e-6)


def test_gspo_takes_one_advantage_per_sequence_and_the_loss_defaults_its_clip():
    logp, old, _, mask, _ = batch()
    with pytest.raises(ValueError, match="one advantage per sequence; use gspo_token"):
        policy_loss(logp, old, torch.rand(4, 5, dtype=D), mask, LossConfig(policy_loss="gspo", beta=0.0))
    assert (LossConfig(policy_loss="gspo").clip_eps_low, LossConfig(policy_loss="gspo").clip_eps_high) == (3e-4, 4e-4)
    assert (LossConfig().clip_eps_low, LossConfig().clip_eps_high) == (0.2, 0.2)
    assert set(POLICY_LOSSES) >= {"ppo_clip", "gspo", "gspo_token"}


def test_gspo_token_with_token_advantages_weights_each_token_by_the_sequence_ratio():
    logp, old, _, mask, lens = batch(spread=0.05)
    adv = torch.rand(4, 5, dtype=D) - 0.5
    x = logp.clone().requires_grad_(True)
    cfg = LossConfig(policy_loss="gspo_token", clip_eps_low=0.5, clip_eps_high=0.5, beta=0.0)  # nothing clipped
    policy_loss(x, old, adv, mask, cfg)[0].backward()
    for i, n in enumerate(lens):
        if not n:
            continue
        s = math.exp(float(sum(logp[i, t] - old[i, t] for t in range(n))) / n)
        for t in range(n):  # d/d logp_t of -(1/B)(1/n) sum_t s A_t  with s's own gradient stopped
            assert float(x.grad[i, t]) == pytest.approx(-s * float(adv[i, t]) / n / 4, abs=1e-12)


# ----------------------------------------------------------------------------- config


def test_recipes_are_chosen_by_registered_name_and_checked_before_anything_starts():
    cfg = load_config(None, ["grpo.advantage=rloo", "grpo.policy_loss=gspo"])
    assert cfg.grpo.loss_config(8).clip_eps_low == 3e-4 and cfg.grpo.advantage_args(4).group_size == 4
    custom = load_config(None, ["grpo.modules=[tests.custom_recipes]", "grpo.advantage=test_centered",
                                "grpo.policy_loss=test_vanilla_pg"])
    assert custom.grpo.policy_loss == "test_vanilla_pg" and "test_centered" in ADVANTAGES


@pytest.mark.parametrize("overrides, msg", [
    (["grpo.clip_eps_low=1.5", "grpo.dual_clip=0.5"], r"grpo.clip_eps_low: 1.5 must be in \[0, 1\)"),
    (["grpo.dual_clip=0.5"], "grpo.dual_clip: 0.5 must be > 1"),
    (["grpo.policy_loss=gspo", "grpo.clip_eps_high=-1"], r"grpo.clip_eps_high: -1.0 must be >= 0 \(grpo.policy_loss=gspo\)"),
    (["grpo.advantage=ppo"], r"grpo.advantage: 'ppo' is not one of \['grpo', "),
    (["grpo.policy_loss=dapo"], r"grpo.policy_loss: 'dapo' is not one of "),
    (["grpo.modules=[no_such_recipes]"], "grpo.modules: cannot import 'no_such_recipes'"),
])
def test_bad_recipe_settings_fail_at_load_with_one_line_naming_the_key(overrides, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_the_grpo_section_carries_each_loss_knob_once_with_the_loss_defaults():
    import dataclasses

    from r1omni_ray.config import LOSS_KNOBS, GRPOConfig

    own = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    for f in dataclasses.fields(LossConfig):
        if f.name in LOSS_KNOBS:
            assert own[f.name] == f.default, f.name  # the default is the loss's
        else:
            assert f.name not in own, f.name  # the learner sets it
    cfg = load_config(None, ["grpo.policy_loss=gspo", "grpo.dual_clip=3", "grpo.loss_agg=token_mean"])
    lc = cfg.grpo.loss_config(7, with_reference=False)
    assert (lc.policy_loss, lc.dual_clip, lc.loss_agg, lc.max_len, lc.beta) == ("gspo", 3.0, "token_mean", 7, 0.0)
