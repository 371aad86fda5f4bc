"""GRPO maths checked against hand computations, autograd and invariances."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1omni_ray.grpo import (
    LossConfig,
    grad_scale_for_framework,
    group_advantages,
    kl_estimate,
    policy_loss,
)
from r1omni_ray.model.logprobs import entropy_from_logits, sequence_logprobs

D = torch.float64

# ----------------------------------------------------------------------------- advantages


def hand_advantages(rewards: list[float], g: int, scale: str, eps: float = 1e-4) -> list[float]:
    out: list[float] = []
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    for i in range(0, len(rewards), g):
        grp = rewards[i : i + g]
        mu = sum(grp) / g
        if g == 1 or max(grp) == min(grp):
            out += [0.0] * g
            continue
        denom = {"group": statistics.stdev(grp) + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        out += [(r - mu) / denom for r in grp]
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_hand(scale: str) -> None:
    rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.5, 3.0, 1.0]
    adv = group_advantages(torch.tensor(rewards, dtype=D), 4, scale)
    assert adv.shape == (12,)
    torch.testing.assert_close(adv, torch.tensor(hand_advantages(rewards, 4, scale), dtype=D))


def test_group_advantages_literal_values() -> None:
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=D), 4)
    s = math.sqrt(1 / 3)  # unbiased std of {1, 0, 0, 1}
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=D) / (s + 1e-4)
    torch.testing.assert_close(adv, expected)
    none = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, "none")
    assert none.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_group_advantages_edge_cases() -> None:
    # mean(0.1, 0.1, 0.1) != 0.1 in floating point; flat groups must still be exactly zero.
    flat = torch.full((6,), 0.1)
    for scale in ("group", "batch", "none"):
        assert torch.equal(group_advantages(flat, 3, scale), torch.zeros(6))
    # G = 1: unbiased std is NaN, we return zeros.
    g1 = group_advantages(torch.tensor([0.0, 1.0, 5.0]), 1)
    assert torch.equal(g1, torch.zeros(3))
    # Integer rewards are promoted, empty input passes through.
    assert group_advantages(torch.tensor([0, 1]), 2).dtype == torch.get_default_dtype()
    assert group_advantages(torch.zeros(0), 4).shape == (0,)
    # Mixed batch: one flat group, one informative group.
    mixed = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2)
    assert mixed[:2].tolist() == [0.0, 0.0] and mixed[2] < 0 < mixed[3]


def test_group_advantages_validation() -> None:
    with pytest.raises(ValueError, match="not divisible by group_size"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="flat"):
        group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 4, "bogus")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(4), 4, eps=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([0.0, math.nan]), 2)


groups = st.integers(1, 4).flatmap(
    lambda b: st.integers(2, 6).flatmap(
        lambda g: st.tuples(
            st.just(g),
            st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0]), min_size=b * g, max_size=b * g),
        )
    )
)


@settings(max_examples=60, deadline=None)
@given(groups, st.floats(-5, 5), st.floats(0.5, 50))
def test_group_advantages_invariances(gr: tuple[int, list[float]], shift: float, k: float) -> None:
    g, rewards = gr
    r = torch.tensor(rewards, dtype=D)
    base = group_advantages(r, g, "group")
    # Adding a constant leaves every scale unchanged.
    for scale in ("group", "batch", "none"):
        torch.testing.assert_close(group_advantages(r + shift, g, scale), group_advantages(r, g, scale))
    # Positive scaling: exact with eps=0, up to eps otherwise (std of these rewards is >= ~0.2).
    nz = group_advantages(r, g, "group", eps=0.0)
    torch.testing.assert_close(group_advantages(k * r, g, "group", eps=0.0), nz)
    torch.testing.assert_close(group_advantages(k * r, g, "group"), base, rtol=2e-3, atol=1e-6)
    # Advantages are centred per group.
    assert torch.allclose(base.view(-1, g).sum(1), torch.zeros(len(rewards) // g, dtype=D), atol=1e-9)
    torch.testing.assert_close(base, torch.tensor(hand_advantages(rewards, g, "group"), dtype=D))


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_hand() -> None:
    logp = torch.tensor([math.log(0.5), math.log(0.2)], dtype=D)
    ref = torch.tensor([math.log(0.25), math.log(0.2)], dtype=D)
    lr = math.log(0.5)  # ref - logp for the first token
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([-lr, 0.0], dtype=D))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([0.5 * lr * lr, 0.0], dtype=D))
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.tensor([0.5 - lr - 1, 0.0], dtype=D))
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(logp, ref, "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_estimate(logp, ref[:1])


def test_kl_clamp() -> None:
    logp = torch.tensor([0.0, 0.0, -30.0], dtype=D)
    ref = torch.tensor([30.0, -30.0, 0.0], dtype=D)
    k3 = kl_estimate(logp, ref, "k3", clamp=10.0)
    assert k3.tolist() == [10.0, pytest.approx(math.exp(-10) + 9), 10.0]
    assert torch.isfinite(kl_estimate(logp, ref, "k3", clamp=None)).all()
    assert kl_estimate(logp, ref, "k1", clamp=10.0).tolist() == [-10.0, 10.0, -10.0]


def test_kl_monte_carlo_matches_exact() -> None:
    # k1 and k3 are unbiased estimators of KL(p || q) when tokens are sampled from p.
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=D)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=D)
    exact = float((p * (p / q).log()).sum())
    idx = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    logp, ref = p.log()[idx], q.log()[idx]
    for kind in ("k1", "k3"):
        assert float(kl_estimate(logp, ref, kind).mean()) == pytest.approx(exact, abs=5e-3)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"clip_eps_low": 1.0}, "clip_eps_low"),
        ({"clip_eps_low": -0.1}, "clip_eps_low"),
        ({"clip_eps_high": -0.1}, "clip_eps_high"),
        ({"dual_clip": 1.0}, "dual_clip"),
        ({"beta": -1.0}, "beta"),
        ({"kl_estimator": "k9"}, "kl_estimator"),
        ({"loss_agg": "mean"}, "loss_agg"),
        ({"loss_agg": "seq_mean_token_sum_norm"}, "max_len"),
        ({"loss_agg": "seq_mean_token_sum_norm", "max_len": 0}, "max_len"),
        ({"max_len": -3}, "max_len"),
        ({"kl_clamp": 0.0}, "kl_clamp"),
    ],
)
def test_loss_config_validation(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        LossConfig(**kwargs)


def test_loss_config_defaults() -> None:
    cfg = LossConfig()
    assert (cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip, cfg.beta) == (0.2, 0.2, None, 0.04)
    assert cfg.kl_estimator == "k3" and cfg.loss_agg == "seq_mean_token_mean"
    LossConfig(loss_agg="seq_mean_token_sum_norm", max_len=128, dual_clip=3.0, clip_eps_high=0.28)


# ----------------------------------------------------------------------------- policy loss: values

# Row 0 (A=+1): ratios 1, 1.5 (clipped to 1.2), 0.5.  Row 1 (A=-1): ratios 1, 1.5, [masked 0.5].
RATIOS = [[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def small_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.1, -3.0]], dtype=D)
    logp = old + torch.tensor(RATIOS, dtype=D).log()
    return logp, old, torch.tensor([1.0, -1.0], dtype=D), torch.tensor(MASK, dtype=D)


@pytest.mark.parametrize(
    ("agg", "max_len", "expected"),
    [
        # per-token surrogate: row0 [-1, -1.2, -0.5], row1 [1, 1.5]
        ("seq_mean_token_mean", None, ((-2.7 / 3) + (2.5 / 2)) / 2),
        ("token_mean", None, (-2.7 + 2.5) / 5),
        ("seq_mean_token_sum_norm", 4, (-2.7 / 4 + 2.5 / 4) / 2),
    ],
)
def test_policy_loss_hand(agg: str, max_len: int | None, expected: float) -> None:
    logp, old, adv, mask = small_case()
    loss, met = policy_loss(logp, old, adv, mask, LossConfig(beta=0.0, loss_agg=agg, max_len=max_len))
    assert float(loss) == pytest.approx(expected)
    assert met["policy_loss"] == pytest.approx(expected) and met["loss"] == pytest.approx(expected)
    assert met["clip_frac"] == pytest.approx(1 / 5)  # only row0/token1 (ratio 1.5 > 1.2, A > 0)
    assert met["dual_clip_frac"] == 0.0
    assert met["ratio_mean"] == pytest.approx((1 + 1.5 + 0.5 + 1 + 1.5) / 5)
    assert met["ratio_max"] == pytest.approx(1.5) and met["ratio_min"] == pytest.approx(0.5)
    l15, l05 = math.log(1.5), math.log(0.5)
    assert met["approx_kl"] == pytest.approx(0.5 * (2 * l15**2 + l05**2) / 5)
    assert met["kl"] == 0.0 and met["kl_loss"] == 0.0 and "entropy" not in met
    assert all(isinstance(v, float) for v in met.values())


def test_policy_loss_asymmetric_and_dual_clip() -> None:
    logp, old, adv, mask = small_case()
    # clip-higher (DAPO): eps_high=0.6 leaves ratio 1.5 unclipped for A>0.
    loss, met = policy_loss(logp, old, adv, mask, LossConfig(beta=0.0, clip_eps_high=0.6))
    assert float(loss) == pytest.approx(((-1 - 1.5 - 0.5) / 3 + 2.5 / 2) / 2)
    assert met["clip_frac"] == 0.0
    # eps_low=0.6 -> lower bound 0.4: ratio 0.5 with A>0 still unclipped (min picks 0.5*A).
    loss, _ = policy_loss(logp, old, adv, mask, LossConfig(beta=0.0, clip_eps_low=0.6))
    assert float(loss) == pytest.approx(((-1 - 1.2 - 0.5) / 3 + 2.5 / 2) / 2)
    # dual clip c=1.4 caps row1/token1 (A=-1, ratio 1.5): loss 1.5 -> 1.4.
    loss, met = policy_loss(logp, old, adv, mask, LossConfig(beta=0.0, dual_clip=1.4))
    assert float(loss) == pytest.approx(((-2.7 / 3) + (1 + 1.4) / 2) / 2)
    assert met["dual_clip_frac"] == pytest.approx(1 / 5)


def test_policy_loss_with_kl_and_entropy() -> None:
    logp, old, adv, mask = small_case()
    ref = old + torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.4, 9.0]], dtype=D)
    ent = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]], dtype=D)
    beta = 0.1
    cfg = LossConfig(beta=beta, loss_agg="token_mean")
    loss, met = policy_loss(logp, old, adv, mask, cfg, ref_logp=ref, entropy=ent)
    kls = []
    for b in range(2):
        for t in range(3):
            if MASK[b][t]:
                x = float(ref[b, t] - logp[b, t])
                kls.append(math.exp(x) - x - 1)
    assert met["kl"] == pytest.approx(sum(kls) / 5)
    assert met["kl_loss"] == pytest.approx(beta * sum(kls) / 5)
    assert float(loss) == pytest.approx((-2.7 + 2.5) / 5 + beta * sum(kls) / 5)
    assert met["policy_loss"] + met["kl_loss"] == pytest.approx(met["loss"])
    assert met["entropy"] == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)
    # beta = 0 ignores ref_logp; beta > 0 without ref_logp has no KL term.
    l0, m0 = policy_loss(logp, old, adv, mask, LossConfig(beta=0.0, loss_agg="token_mean"), ref_logp=ref)
    l1, m1 = policy_loss(logp, old, adv, mask, cfg)
    assert float(l0) == pytest.approx(-0.04) and float(l1) == pytest.approx(-0.04)
    assert m0["kl"] == 0.0 == m1["kl"]


def test_policy_loss_shape_validation() -> None:
    logp, old, adv, mask = small_case()
    cfg = LossConfig()
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(logp, old[:, :2], adv, mask, cfg)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, adv[:1], mask, cfg)
    with pytest.raises(ValueError, match="logp must be"):
        policy_loss(logp[0], old[0], adv, mask[0], cfg)
    with pytest.raises(ValueError, match="num_global_tokens"):
        policy_loss(logp, old, adv, mask, cfg, num_global_tokens=0)
    with pytest.raises(ValueError, match="num_global_seqs"):
        policy_loss(logp, old, adv, mask, cfg, num_global_seqs=-1)
    # Per-token advantages [B, T] are accepted and equal the broadcast [B] version.
    a, _ = policy_loss(logp, old, adv, mask, cfg)
    b, _ = policy_loss(logp, old, adv[:, None].expand(2, 3), mask, cfg)
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- masking / NaN safety


@pytest.mark.parametrize("kl_clamp", [10.0, None])
@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_fully_masked_rows_and_garbage_padding(agg: str, kl_clamp: float | None) -> None:
    logp, old, adv, mask = small_case()
    pad_logp = torch.cat([logp, torch.full((1, 3), math.nan, dtype=D)])
    pad_old = torch.cat([old, torch.full((1, 3), -math.inf, dtype=D)])
    pad_ref = torch.cat([old, torch.full((1, 3), math.inf, dtype=D)])
    pad_ent = torch.cat([torch.ones(2, 3, dtype=D), torch.full((1, 3), math.nan, dtype=D)])
    pad_mask = torch.cat([mask, torch.zeros(1, 3, dtype=D)])
    pad_adv = torch.cat([adv, torch.tensor([5.0], dtype=D)])
    x = pad_logp.clone().requires_grad_(True)
    cfg = LossConfig(loss_agg=agg, max_len=3, dual_clip=3.0, kl_clamp=kl_clamp)
    loss, met = policy_loss(x, pad_old, pad_adv, pad_mask, cfg, ref_logp=pad_ref, entropy=pad_ent)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert x.grad[2].abs().sum() == 0
    assert all(math.isfinite(v) for v in met.values())
    # The masked row only changes the sequence count for per-sequence modes.
    ref_loss, _ = policy_loss(logp, old, adv, mask, cfg, ref_logp=old, num_global_seqs=3)
    torch.testing.assert_close(loss.detach(), ref_loss)
    # Everything masked: loss 0, metrics 0.
    z, mz = policy_loss(logp, old, adv, torch.zeros_like(mask), cfg)
    assert float(z) == 0.0 and mz["ratio_max"] == 0.0 and mz["clip_frac"] == 0.0


def test_extreme_log_ratios_stay_finite() -> None:
    logp = torch.tensor([[200.0, -200.0]], dtype=torch.float32, requires_grad=True)
    old = torch.zeros(1, 2)
    loss, met = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 2), LossConfig(), ref_logp=old)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()


# ----------------------------------------------------------------------------- gradients


def _away_from_kinks(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    # log-ratios in {-0.6, -0.1, 0.05, 0.5} stay >= 0.07 away from log(0.8) and log(1.2).
    choices = torch.tensor([-0.6, -0.1, 0.05, 0.5], dtype=D)
    return choices[torch.randint(0, 4, shape, generator=gen)]


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_policy_loss_gradcheck(agg: str, kl: str) -> None:
    gen = torch.Generator().manual_seed(1)
    old = torch.randn(3, 4, generator=gen, dtype=D)
    logp = (old + _away_from_kinks(gen, (3, 4))).requires_grad_(True)
    ref = old + 0.3 * torch.randn(3, 4, generator=gen, dtype=D)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=D)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=D)
    cfg = LossConfig(loss_agg=agg, max_len=6, kl_estimator=kl, beta=0.3, dual_clip=1.5)
    assert torch.autograd.gradcheck(
        lambda x: policy_loss(x, old, adv, mask, cfg, ref_logp=ref)[0], (logp,), eps=1e-6, atol=1e-6
    )


def test_unclipped_gradient_matches_formula() -> None:
    # No clipping, no KL: d/dlogp of -(ratio*A) masked-mean = -ratio*A/n_tokens_in_row/B.
    old = torch.zeros(2, 2, dtype=D)
    lr = torch.tensor([[0.05, -0.1], [0.1, 0.0]], dtype=D)
    logp = lr.clone().requires_grad_(True)
    adv = torch.tensor([2.0, -1.0], dtype=D)
    loss, _ = policy_loss(logp, old, adv, torch.ones(2, 2, dtype=D), LossConfig(beta=0.0))
    loss.backward()
    expected = -lr.exp() * adv[:, None] / 2 / 2
    torch.testing.assert_close(logp.grad, expected)


@pytest.mark.parametrize(
    ("ratio", "adv", "cfg", "zero"),
    [
        (1.5, 1.0, LossConfig(beta=0.0), True),  # above 1+eps with A>0: clipped
        (0.5, -1.0, LossConfig(beta=0.0), True),  # below 1-eps with A<0: clipped
        (1.5, -1.0, LossConfig(beta=0.0), False),  # PPO does not clip this side
        (0.5, 1.0, LossConfig(beta=0.0), False),
        (1.1, 1.0, LossConfig(beta=0.0), False),  # inside the trust region
        (2.0, -1.0, LossConfig(beta=0.0, dual_clip=1.5), True),  # dual clip caps it
        (1.3, -1.0, LossConfig(beta=0.0, dual_clip=1.5), False),  # below c: ordinary
        (1.5, 1.0, LossConfig(beta=0.0, clip_eps_high=0.6), False),  # clip-higher
    ],
)
def test_gradient_zero_where_clipped(ratio: float, adv: float, cfg: LossConfig, zero: bool) -> None:
    logp = torch.tensor([[math.log(ratio)]], dtype=D, requires_grad=True)
    loss, met = policy_loss(logp, torch.zeros(1, 1, dtype=D), torch.tensor([adv], dtype=D),
                            torch.ones(1, 1, dtype=D), cfg)
    loss.backward()
    assert (float(logp.grad) == 0.0) is zero
    if zero:
        assert met["clip_frac"] + met["dual_clip_frac"] == 1.0


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_gradient_step_direction(agg: str) -> None:
    gen = torch.Generator().manual_seed(2)
    old = torch.randn(4, 5, generator=gen, dtype=D)
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=D)
    mask = torch.ones(4, 5, dtype=D)
    mask[2, 3:] = 0
    loss, _ = policy_loss(logp, old, adv, mask, LossConfig(beta=0.0, loss_agg=agg, max_len=5))
    loss.backward()
    with torch.no_grad():
        new = logp - 0.1 * logp.grad
    delta = new - old
    valid = mask.bool()
    assert (delta[0][valid[0]] > 0).all() and (delta[2][valid[2]] > 0).all()
    assert (delta[1] < 0).all() and (delta[3] < 0).all()
    assert (delta[~valid] == 0).all()


def test_kl_gradient_pulls_towards_reference() -> None:
    old = torch.zeros(1, 3, dtype=D)
    ref = torch.tensor([[-0.5, 0.0, 0.5]], dtype=D)
    logp = old.clone().requires_grad_(True)
    for kind in ("k1", "k2", "k3"):
        logp.grad = None
        cfg = LossConfig(beta=1.0, kl_estimator=kind)
        loss, _ = policy_loss(logp, old, torch.zeros(1, dtype=D), torch.ones(1, 3, dtype=D), cfg, ref_logp=ref)
        loss.backward()
        step = -logp.grad
        if kind == "k1":  # k1's gradient is a constant push down, independent of ref
            assert (step < 0).all()
        else:
            assert step[0, 0] < 0 and step[0, 1] == 0 and step[0, 2] > 0


# ----------------------------------------------------------------------------- micro-batching


def _split(x: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    return torch.split(x, sizes, dim=0)


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("sizes", [[2, 1, 3], [1, 1, 1, 1, 1, 1], [6]])
def test_micro_batches_sum_to_full_batch(agg: str, sizes: list[int]) -> None:
    gen = torch.Generator().manual_seed(3)
    B, T = 6, 5
    old = torch.randn(B, T, generator=gen, dtype=D)
    base = old + 0.4 * torch.randn(B, T, generator=gen, dtype=D)
    ref = old + 0.2 * torch.randn(B, T, generator=gen, dtype=D)
    adv = torch.randn(B, generator=gen, dtype=D)
    mask = (torch.rand(B, T, generator=gen) > 0.3).to(D)
    mask[4] = 0  # a fully masked row
    cfg = LossConfig(loss_agg=agg, max_len=T, beta=0.05)

    full_x = base.clone().requires_grad_(True)
    full, _ = policy_loss(full_x, old, adv, mask, cfg, ref_logp=ref)
    full.backward()

    x = base.clone().requires_grad_(True)
    n_tok, n_seq = mask.sum(), B
    total = torch.zeros((), dtype=D)
    for xs, os_, as_, ms, rs in zip(*(_split(t, sizes) for t in (x, old, adv, mask, ref)), strict=True):
        part, _ = policy_loss(xs, os_, as_, ms, cfg, ref_logp=rs, num_global_tokens=n_tok, num_global_seqs=n_seq)
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(x.grad, full_x.grad)


def test_grad_scale_for_framework_recovers_sum() -> None:
    # Simulate DP=2 ranks x 2 accumulation steps with a framework that averages both.
    dp, ga = 2, 2
    assert grad_scale_for_framework(dp, ga) == 4.0
    gen = torch.Generator().manual_seed(4)
    old = torch.randn(8, 3, generator=gen, dtype=D)
    base = old + 0.1 * torch.randn(8, 3, generator=gen, dtype=D)
    adv = torch.randn(8, generator=gen, dtype=D)
    mask = torch.ones(8, 3, dtype=D)
    mask[1, 2] = 0
    cfg = LossConfig(loss_agg="token_mean", beta=0.0)
    full_x = base.clone().requires_grad_(True)
    policy_loss(full_x, old, adv, mask, cfg)[0].backward()

    x = base.clone().requires_grad_(True)
    scale = grad_scale_for_framework(dp, ga)
    for sl in (slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)):  # rank-major micro-batches
        part, _ = policy_loss(x[sl], old[sl], adv[sl], mask[sl], cfg, num_global_tokens=mask.sum())
        (part * scale / ga / dp).backward()  # framework: 1/ga per step, mean over ranks
    torch.testing.assert_close(x.grad, full_x.grad)
    with pytest.raises(ValueError):
        grad_scale_for_framework(0, 1)


# ----------------------------------------------------------------------------- log-probs / entropy


def test_sequence_logprobs_matches_log_softmax() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 7, generator=gen, dtype=D)
    ids = torch.randint(0, 7, (2, 4), generator=gen)
    for temp in (1.0, 0.7):
        expected = torch.log_softmax(logits / temp, -1).gather(-1, ids[..., None]).squeeze(-1)
        torch.testing.assert_close(sequence_logprobs(logits, ids, temp), expected)
    # Probabilities of all tokens at a position sum to one.
    lp = torch.stack([sequence_logprobs(logits, torch.full((2, 4), v), 1.3) for v in range(7)])
    torch.testing.assert_close(lp.exp().sum(0), torch.ones(2, 4, dtype=D))


def test_sequence_logprobs_half_precision_upcasts() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = 5 * torch.randn(2, 3, 11, generator=gen)
    ids = torch.randint(0, 11, (2, 3), generator=gen)
    out = sequence_logprobs(logits.bfloat16(), ids)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(out, expected)
    assert sequence_logprobs(torch.zeros(0, 3, 5, dtype=torch.bfloat16), torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3)


def test_entropy_from_logits() -> None:
    uniform = torch.zeros(1, 2, 8, dtype=D)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((1, 2), math.log(8), dtype=D))
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3, 6, generator=gen, dtype=D)
    p = torch.softmax(logits / 0.5, -1)
    torch.testing.assert_close(entropy_from_logits(logits, 0.5), -(p * p.log()).sum(-1))
    # Banned tokens (-inf logits) are ignored rather than producing NaN.
    banned = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf]]], dtype=D)
    torch.testing.assert_close(entropy_from_logits(banned), torch.tensor([[math.log(2)]], dtype=D))


def test_logprob_and_entropy_gradcheck() -> None:
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 5, generator=gen, dtype=D, requires_grad=True)
    ids = torch.randint(0, 5, (2, 3), generator=gen)
    assert torch.autograd.gradcheck(lambda x: sequence_logprobs(x, ids, 0.8), (logits,))
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, 1.3), (logits,))


def test_logprob_validation() -> None:
    with pytest.raises(ValueError, match="temperature"):
        sequence_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="token_ids"):
        sequence_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must be"):
        entropy_from_logits(torch.zeros(2, 3))


@pytest.mark.parametrize("dtype,temperature", [(torch.float64, 1.0), (torch.float32, 0.7), (torch.bfloat16, 1.3)])
def test_sequence_logprobs_gradients_equal_autograd_through_log_softmax(dtype, temperature) -> None:
    """The row-at-a-time function's backward (recomputed softmax) equals autograd through the plain float32+
    expression, also with a banned (-inf) token in the vocabulary; float64 passes torch's gradcheck."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    base[:, :, 4] = float("-inf")
    ids = torch.randint(0, 4, (3, 5), generator=g)
    upstream = torch.randn(3, 5, generator=g, dtype=torch.float64)
    ours = base.clone().to(dtype).requires_grad_(True)
    plain = base.clone().to(dtype).requires_grad_(True)
    (sequence_logprobs(ours, ids, temperature) * upstream).sum().backward()
    wide = torch.float32 if dtype == torch.bfloat16 else dtype
    expected = torch.log_softmax(plain.to(wide) / temperature, -1).gather(-1, ids[..., None]).squeeze(-1)
    (expected * upstream.to(wide)).sum().backward()
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(ours.grad, plain.grad, atol=tol, rtol=0)
    if dtype == torch.float64:
        finite = base[:, :, :4].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: sequence_logprobs(x, ids, temperature), (finite,))


def test_sequence_logprobs_keeps_only_the_logits_for_backward() -> None:
    """What autograd holds for backward: the bf16 logits as given (plus [B, T] normalisers), not a float32
    copy of every row (which would be twice the logits)."""
    logits = torch.randn(4, 16, 1000, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 1000, (4, 16))
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = sequence_logprobs(logits, ids)
    held = sum(t.numel() * t.element_size() for t in {id(t): t for t in saved}.values())
    logits_bytes = logits.numel() * logits.element_size()
    assert logits_bytes <= held <= logits_bytes + 4 * 16 * (8 + 4)
    lp.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
