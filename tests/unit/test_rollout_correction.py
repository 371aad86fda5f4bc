"""The off-policy correction against float64 references written from the definitions (TIS, MIS, and their
sequence-level forms), with padding, empty and 1-token completions; and the decoupled loss that uses it."""

import math

import pytest
import torch

from r1omni_ray.grpo import LossConfig, flat_groups, group_advantages, policy_loss
from r1omni_ray.rollout_correction import (
    SUM_PREFIX,
    CorrectionConfig,
    correction_means,
    correction_sums,
    correction_weights,
)
from r1omni_ray.step_metrics import learner_metrics, reduce_learner_metrics, reward_metrics, staleness_metrics

# Rows: 3 tokens, 1 token, empty (all padding), 2 tokens. Padding holds garbage that must not leak.
LENS = [3, 1, 0, 2]
PROX = [[-1.0, -0.5, -2.0, 7.0], [-0.1, 9.0, 9.0, 9.0], [5.0, 5.0, 5.0, 5.0], [-3.0, -0.2, -1e9, 0.0]]
BEHAV = [[-1.5, -0.4, -0.5, -7.0], [-0.1, -9.0, 0.0, 0.0], [-5.0, 1.0, 1.0, 1.0], [-1.0, -0.3, 0.0, float("inf")]]


def tensors(dtype=torch.float64):
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(4)] for n in LENS], dtype=dtype)
    return torch.tensor(PROX, dtype=dtype), torch.tensor(BEHAV, dtype=dtype), mask


def reference(mode: str, cap: float, band: tuple[float, float]) -> tuple[list[list[float]], list[list[float]]]:
    """(weights, corrected) token by token, in plain Python floats."""
    lo, hi = band
    weights, corrected = [], []
    for p, b, n in zip(PROX, BEHAV, LENS, strict=True):
        rho = [math.exp(p[t] - b[t]) for t in range(n)]
        if mode.startswith("seq_"):
            seq = math.exp(sum(p[t] - b[t] for t in range(n)))
            rho = [seq] * n
        if mode.endswith("tis"):
            w = [min(r, cap) for r in rho]
            c = [1.0 if r > cap else 0.0 for r in rho]
        elif mode.endswith("mis"):
            w = [r if lo <= r <= hi else 0.0 for r in rho]
            c = [0.0 if lo <= r <= hi else 1.0 for r in rho]
        else:
            w, c = [1.0] * n, [0.0] * n
        weights.append(w + [0.0] * (4 - n))
        corrected.append(c + [0.0] * (4 - n))
    return weights, corrected


@pytest.mark.parametrize("mode", ["none", "tis", "mis", "seq_tis", "seq_mis"])
def test_weights_equal_the_definition_with_padding_empty_and_one_token_rows(mode):
    cfg = CorrectionConfig(mode, cap=1.5, band=(0.7, 1.3))
    prox, behav, mask = tensors()
    corr = correction_weights(prox, behav, mask, cfg)
    want_w, want_c = reference(mode, 1.5, (0.7, 1.3))
    torch.testing.assert_close(corr.weight, torch.tensor(want_w, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(corr.corrected, torch.tensor(want_c, dtype=torch.float64))
    assert torch.isfinite(corr.weight).all() and torch.isfinite(corr.mismatch_kl).all()
    # k3 of KL(behaviour || proximal): rho - 1 - log rho per token, >= 0, zero off the mask.
    for i, n in enumerate(LENS):
        for t in range(4):
            lr = PROX[i][t] - BEHAV[i][t]
            want = math.expm1(lr) - lr if t < n else 0.0
            assert corr.mismatch_kl[i, t].item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_the_ratio_is_exactly_one_on_policy_and_nothing_is_corrected():
    prox, _, mask = tensors()
    for mode in ("tis", "mis", "seq_tis", "seq_mis"):
        corr = correction_weights(prox, prox.clone(), mask, CorrectionConfig(mode))
        assert torch.equal(corr.weight, mask) and not corr.corrected.any() and not corr.mismatch_kl.any()


@pytest.mark.parametrize("bad, needle", [
    (dict(mode="is"), "is not one of"),
    (dict(cap=1.0), "correction_cap: 1.0 must be > 1"),
    (dict(band=(1.1, 2.0)), r"correction_band: \[1.1, 2.0\] must be \[lo, hi\] with 0 <= lo <= 1 <= hi"),
    (dict(band=(0.1, 0.9)), "with 0 <= lo <= 1 <= hi"),
])
def test_bad_correction_settings_are_refused(bad, needle):
    with pytest.raises(ValueError, match=needle):
        CorrectionConfig(**bad)


def test_decoupled_loss_weights_each_token_and_its_gradient():
    """Decoupled PPO: -w * min(r A, clip(r) A) with r = pi/pi_prox and w = proximal/behaviour. At the proximal
    weights (r = 1) the gradient of each token is -w * A * grad log pi; a weight of 0 removes the token."""
    prox, behav, mask = tensors()
    logp = prox.clone().masked_fill(mask == 0, 0.0).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    corr = correction_weights(prox, behav, mask, CorrectionConfig("tis", cap=1.5))
    cfg = LossConfig(beta=0.0, loss_agg="token_mean")
    n_tok = int(mask.sum())
    loss, m = policy_loss(logp, prox.masked_fill(mask == 0, 0.0), adv, mask, cfg, is_weight=corr.weight,
                          num_global_tokens=n_tok)
    loss.backward()
    want_grad = -(corr.weight * adv[:, None] * mask) / n_tok
    torch.testing.assert_close(logp.grad, want_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, (-(corr.weight * adv[:, None]) * mask).sum() / n_tok)
    # Without a weight the same call is plain GRPO: ratio 1, gradient -A per token.
    logp.grad = None
    loss, _ = policy_loss(logp, prox.masked_fill(mask == 0, 0.0), adv, mask, cfg, num_global_tokens=n_tok)
    loss.backward()
    torch.testing.assert_close(logp.grad, -(adv[:, None] * mask) / n_tok)


def test_off_policy_metrics_are_token_means_overall_and_per_modality_across_ranks():
    prox, behav, mask = tensors(torch.float32)
    corr = correction_weights(prox, behav, mask, CorrectionConfig("tis", cap=1.5))
    tags = ["video_audio", "audio", "video_audio", "text"]
    # Two ranks: the first sees rows 0-1, the second rows 2-3.
    ranks = []
    for rows in ((0, 1), (2, 3)):
        sub = correction_weights(prox[list(rows)], behav[list(rows)], mask[list(rows)], CorrectionConfig("tis", cap=1.5))
        sums = correction_sums(sub, mask[list(rows)], [tags[r] for r in rows])
        ranks.append(sums | {"loss": 1.0, "offpolicy/is_ratio_max": float(sub.ratio[mask[list(rows)].bool()].max())})
    m = learner_metrics(reduce_learner_metrics(ranks))
    valid = mask.bool()
    assert m["offpolicy/is_weight_mean"] == pytest.approx(float(corr.weight[valid].mean()), rel=1e-6)
    assert m["offpolicy/mismatch_kl"] == pytest.approx(float(corr.mismatch_kl[valid].mean()), rel=1e-6)
    assert m["offpolicy/corrected_frac"] == pytest.approx(float(corr.corrected[valid].mean()))
    assert m["offpolicy/is_ratio_max"] == pytest.approx(float(corr.ratio[valid].max()))
    assert m["learner/loss"] == 2.0  # still summed
    va = valid.clone()
    va[[1, 3]] = False
    assert m["offpolicy/is_weight_mean/video_audio"] == pytest.approx(float(corr.weight[va].mean()), rel=1e-6)
    assert "offpolicy/is_weight_mean/video" not in m  # no token of that modality this step
    assert not any(k.startswith(SUM_PREFIX) for k in m)
    assert correction_means({}) == {}


def test_one_definition_of_a_flat_group():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 0.0, 0.5, 0.5, 0.5])
    assert flat_groups(rewards, 3).tolist() == [True, False, True]
    adv = group_advantages(rewards, 3)
    assert adv[:3].eq(0).all() and adv[6:].eq(0).all() and adv[3:6].ne(0).all()
    m = reward_metrics(rewards.tolist(), {}, 3, {}, {})
    assert m["reward/zero_std_group_frac"] == pytest.approx(2 / 3)


def test_staleness_metrics():
    m = staleness_metrics(5, [5, 4, 3, 5], ["video_audio", "video_audio", "audio", "audio"])
    assert m["staleness/mean"] == 0.75 and m["staleness/max"] == 2.0
    assert m["staleness/mean/video_audio"] == 0.5 and m["staleness/mean/audio"] == 1.0
