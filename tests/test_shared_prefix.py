"""The learner's fast paths compute what the plain per-completion forward computes: the shared-prefix forward
(each prompt once, its KV cache expanded to its completions) and shipped frozen-tower features (the learner
runs only projectors, gate and LM) give the same log-probs and the same gradients."""

from types import SimpleNamespace

import pytest
import torch

from r1omni_ray.labels import AUDIO_TOKEN_INDEX, VIDEO_TOKEN_INDEX
from r1omni_ray.model.loading import freeze_modules
from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM
from r1omni_ray.model.tiny import tiny_config


def _prompt(seed: int, ids: list[int], video: bool = True, audio: bool = True) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(prompt_ids=ids, bert_input_ids=[1, 5, 6, 2],
                           pixel_values=torch.randn(4, 3, 32, 32, generator=g) if video else None,
                           audio_features=torch.randn(16, 200, generator=g) if audio else None,
                           vision_feats=None, audio_feats=None)


# Prompts of different lengths and modalities (the batch pads them), completions of lengths 1 to 6.
PROMPTS = [
    _prompt(0, [1, 2, VIDEO_TOKEN_INDEX, 3, AUDIO_TOKEN_INDEX, 4, 5]),
    _prompt(1, [1, AUDIO_TOKEN_INDEX, 4, 5, 6, 7, 8, 9, 10], video=False),
    _prompt(2, [3, 4, 5], video=False, audio=False),
]
INDEX = [0, 0, 0, 1, 1, 2, 2]
COMPS = [[7, 8, 9], [7, 10], [11, 12, 13, 14, 15, 16], [5], [9, 9, 9, 9], [20, 21], [22]]


def _model(freeze_towers: bool = True) -> HumanOmniQwen2ForCausalLM:
    torch.manual_seed(0)
    model = HumanOmniQwen2ForCausalLM(tiny_config(120))
    freeze_modules(model, vision=freeze_towers, audio=freeze_towers, bert=True)
    return model.eval()  # no dropout: the two paths must see the same function


def _loss_grads(model, prompts, shared: bool):
    model.zero_grad(set_to_none=True)
    lp, mask, ent = model.completion_logprobs(prompts, INDEX, COMPS, temperature=0.7, with_entropy=True,
                                              shared_prefix=shared)
    weights = torch.linspace(-1.0, 1.0, lp.shape[0])[:, None]
    ((lp * weights).sum() + 0.1 * ent.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), mask, grads


def test_shared_prefix_forward_equals_per_completion_forward():
    model = _model()
    packed_lp, packed_mask, packed_grads = _loss_grads(model, PROMPTS, shared=False)
    shared_lp, shared_mask, shared_grads = _loss_grads(model, PROMPTS, shared=True)
    assert torch.equal(packed_mask, shared_mask)
    # Same weights and inputs, another attention layout (cache + padding gap): fp32 kernel tolerance.
    torch.testing.assert_close(shared_lp, packed_lp, rtol=1e-5, atol=1e-5)
    assert shared_grads.keys() == packed_grads.keys()
    assert any(n.startswith("model.layers.") for n in shared_grads) and "model.mm_projector.readout_video.0.weight" in shared_grads
    for name, g in packed_grads.items():
        torch.testing.assert_close(shared_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def _with_features(model, prompts):
    feats = model.tower_features(prompts, vision=True, audio=True)
    return [SimpleNamespace(**{**vars(p), "pixel_values": None, "audio_features": None,
                               "vision_feats": v, "audio_feats": a}) for p, (v, a) in zip(prompts, feats, strict=True)]


def test_tower_features_shape_and_are_what_the_projectors_take():
    model = _model()
    feats = model.tower_features(PROMPTS, vision=True, audio=True)
    v0, a0 = feats[0]
    assert v0.shape == (4, 16, 32)  # frames x (32/8)^2 patches x SigLIP width
    assert a0.shape == (100 // 3, 32)  # Whisper's 100 states pooled by audio_pool_stride 3 (not the raw states)
    assert feats[1][0] is None and feats[2] == (None, None)
    only_audio = model.tower_features(PROMPTS, vision=False, audio=True)
    assert only_audio[0][0] is None and only_audio[0][1] is not None


@pytest.mark.parametrize("shared", [False, True])
def test_shipped_frozen_tower_features_give_the_same_logprobs_and_gradients(shared):
    model = _model(freeze_towers=True)
    raw_lp, _, raw_grads = _loss_grads(model, PROMPTS, shared)
    feat_lp, _, feat_grads = _loss_grads(model, _with_features(model, PROMPTS), shared)
    torch.testing.assert_close(feat_lp, raw_lp, rtol=1e-5, atol=1e-5)
    assert feat_grads.keys() == raw_grads.keys()
    assert not any("vision_tower" in n or "audio_tower" in n for n in raw_grads)  # frozen: no tower grads
    for name, g in raw_grads.items():
        torch.testing.assert_close(feat_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_trainable_towers_get_gradients_from_raw_media():
    model = _model(freeze_towers=False)
    _, _, grads = _loss_grads(model, PROMPTS, shared=True)
    assert any(n.startswith("model.vision_tower.") for n in grads)
    assert any(n.startswith("model.audio_tower.") for n in grads)


def test_reference_holds_no_shipped_tower_and_matches_the_policy_on_features():
    from r1omni_ray.learner.reference import AbsentTower, frozen_reference

    model = _model(freeze_towers=True)
    ref = frozen_reference(model, drop_vision=True, drop_audio=True, home=torch.device("cpu"))
    assert isinstance(ref.model.vision_tower, AbsentTower) and isinstance(ref.model.audio_tower, AbsentTower)
    assert not any("_tower." in n for n, _ in ref.named_parameters())
    assert any(n.startswith("model.vision_tower.") for n, _ in model.named_parameters())  # the policy keeps its own
    feats = _with_features(model, PROMPTS)
    with torch.no_grad():
        want, _, _ = model.completion_logprobs(feats, INDEX, COMPS)
        got, _, _ = ref.completion_logprobs(feats, INDEX, COMPS)
    assert torch.equal(got, want)  # the same weights and kernels in one process
    with pytest.raises(RuntimeError, match="vision tower is frozen and its features are shipped"):
        ref.completion_logprobs(PROMPTS, INDEX, COMPS)
    kept = frozen_reference(model, drop_vision=False, drop_audio=True, home=torch.device("cpu"))
    assert any(n.startswith("model.vision_tower.") for n, _ in kept.named_parameters())
