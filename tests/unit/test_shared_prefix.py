"""The learner's fast paths compute what the plain per-completion forward computes: the shared-prefix forward
(each prompt once, its KV cache expanded to its completions) and shipped frozen-tower features (the learner
runs only projectors, gate and LM) give the same log-probs and the same gradients."""

from types import SimpleNamespace

import pytest
import torch

from r1omni_ray.labels import AUDIO_TOKEN_INDEX, VIDEO_TOKEN_INDEX
from r1omni_ray.model.loading import freeze_modules
from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM
from r1omni_ray.tiny.model import tiny_config


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


def _loss_grads(model, prompts, shared: bool, index=INDEX, comps=COMPS):
    model.zero_grad(set_to_none=True)
    lp, mask, ent = model.completion_logprobs(prompts, index, comps, temperature=0.7, with_entropy=True,
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


# Completions a real run produces: empty (a row of only padding, pad != eos), 1 token, longer ones.
EDGE_INDEX = [0, 0, 0, 1, 1, 2]
EDGE_COMPS = [[], [7], [7, 8, 9], [5], [], [22, 23]]


@pytest.mark.parametrize("comps", [EDGE_COMPS, [[], [7], [5], [], [22], [3]]], ids=["mixed", "all-at-most-1"])
def test_shared_prefix_accepts_empty_and_one_token_completions(comps):
    model = _model()
    packed_lp, packed_mask, packed_grads = _loss_grads(model, PROMPTS, False, EDGE_INDEX, comps)
    shared_lp, shared_mask, shared_grads = _loss_grads(model, PROMPTS, True, EDGE_INDEX, comps)
    assert torch.equal(packed_mask, shared_mask) and packed_mask[0].sum() == 0
    torch.testing.assert_close(shared_lp, packed_lp, rtol=1e-5, atol=1e-5)
    for name, g in packed_grads.items():
        torch.testing.assert_close(shared_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def _forward_modules(model, prompts, index, comps) -> list[str]:
    """Names of the modules whose forward ran, in order (what ZeRO-3 gathers parameters for)."""
    ran: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: ran.append(name))
             for n, m in model.named_modules() if n and not list(m.children())]
    try:
        lp, _, _ = model.completion_logprobs(prompts, index, comps, shared_prefix=True)
        lp.sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return ran


@pytest.mark.parametrize("mode", ["features", "raw"])
def test_every_micro_batch_runs_the_same_modules_whatever_it_holds(mode):
    """Under ZeRO-3 each module's forward gathers its parameters collectively: a rank whose micro-batch has
    no audio, no video, or only 1-token completions must still run the same modules as its peers."""
    model = _model(freeze_towers=True)
    model.every_forward_runs = {"video": mode, "audio": mode}
    full = PROMPTS[:1] if mode == "raw" else _with_features(model, PROMPTS[:1])
    text = [PROMPTS[2]]
    want = set(_forward_modules(model, full, [0, 0], [[7, 8, 9], [7]]))
    assert any("audio_projector" in n for n in want) and any("mm_projector" in n for n in want)
    assert any("bert_model" in n for n in want) and (mode == "raw") == any("audio_tower" in n for n in want)
    got = set(_forward_modules(model, text, [0, 0], [[7], []]))  # no media at all, at most 1 token
    assert got == want
    # The anchors are exact zeros: values and gradients are those of the plain forward.
    plain = _model(freeze_towers=True)
    with torch.no_grad():
        a, _, _ = model.completion_logprobs(text, [0, 0], [[7], [3, 4]])
        b, _, _ = plain.completion_logprobs(text, [0, 0], [[7], [3, 4]])
    assert torch.equal(a, b)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "per-completion"])
def test_gradient_checkpointing_keeps_logprobs_and_gradients(shared):
    """Checkpointed layers are replayed in backward; transformers would drop their KV cache, and the shared
    prefix would silently attend to nothing. Same values and gradients as without checkpointing."""
    from r1omni_ray.model.loading import set_train_mode

    plain, ckpt = _model(freeze_towers=False), _model(freeze_towers=False)
    ckpt.enable_gradient_checkpointing()
    for m in (plain, ckpt):
        set_train_mode(m)  # checkpointing acts in train mode only; the tiny LM has no dropout
    calls = []
    for layer in ckpt.model.layers:
        layer.register_forward_pre_hook(lambda mod, args: calls.append(1))
    want_lp, want_mask, want_grads = _loss_grads(plain, PROMPTS, shared, EDGE_INDEX, EDGE_COMPS)
    calls.clear()
    got_lp, got_mask, got_grads = _loss_grads(ckpt, PROMPTS, shared, EDGE_INDEX, EDGE_COMPS)
    passes = 2 if shared else 1  # prompt pass + completion pass, or one packed pass
    assert len(calls) == 2 * passes * ckpt.config.num_hidden_layers  # forward, then each layer replayed once
    assert torch.equal(got_mask, want_mask)
    torch.testing.assert_close(got_lp, want_lp, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys() and any(n.startswith("model.vision_tower.") for n in got_grads)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
