"""On-policy GRPO needs no separate old-log-prob pass: the training forward's own log-probs, detached, give
the same loss and gradients as a no-grad pass before it (what r1omni_ray.learner.grpo_update relies on)."""

from types import SimpleNamespace

import torch

from r1omni_ray.grpo import LossConfig, policy_loss
from r1omni_ray.labels import AUDIO_TOKEN_INDEX, VIDEO_TOKEN_INDEX
from r1omni_ray.model.loading import freeze_modules, set_train_mode
from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM
from r1omni_ray.tiny.model import tiny_config


def _prompt(seed: int) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(prompt_ids=[1, 2, VIDEO_TOKEN_INDEX, 3, AUDIO_TOKEN_INDEX, 4, 5],
                           pixel_values=torch.randn(4, 3, 32, 32, generator=g),
                           audio_features=torch.randn(16, 200, generator=g), bert_input_ids=[1, 5, 6, 2])


def _loss_and_grads(model, old_from_separate_pass: bool, cfg: LossConfig):
    prompts = [_prompt(0), _prompt(1)]
    index, comps = [0, 0, 1, 1], [[7, 8, 9], [7, 10], [11, 12, 13, 14], [5]]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    n_tok = sum(len(c) for c in comps)
    model.zero_grad(set_to_none=True)
    old = None
    if old_from_separate_pass:
        model.eval()
        with torch.no_grad():
            old, _, _ = model.completion_logprobs(prompts, index, comps)
    set_train_mode(model)
    lp, mask, ent = model.completion_logprobs(prompts, index, comps, with_entropy=True)
    with torch.no_grad():  # a frozen reference that differs from the policy, so the KL term is live
        ref = lp.detach() - 0.05 * torch.arange(lp.shape[1], dtype=lp.dtype)
    loss, _ = policy_loss(lp, old if old is not None else lp.detach(), adv, mask, cfg, ref_logp=ref, entropy=ent,
                          num_global_tokens=n_tok, num_global_seqs=len(comps))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_training_forward_old_logprobs_equal_a_separate_pass():
    torch.manual_seed(0)
    model = HumanOmniQwen2ForCausalLM(tiny_config(120))
    freeze_modules(model, vision=True, audio=True, bert=True)
    for agg in ("seq_mean_token_mean", "token_mean"):
        cfg = LossConfig(beta=0.04, loss_agg=agg, max_len=4)
        two_loss, two_grads = _loss_and_grads(model, True, cfg)
        one_loss, one_grads = _loss_and_grads(model, False, cfg)
        # Same weights, same inputs; only eval vs train mode and kernel order differ: fp32 tolerance.
        torch.testing.assert_close(one_loss, two_loss, rtol=1e-5, atol=1e-6)
        assert one_grads.keys() == two_grads.keys() and len(one_grads) > 10
        for name, g in two_grads.items():
            torch.testing.assert_close(one_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
