"""The HumanOmni-style policy: checkpoint layout, save/load round trip, multimodal splice."""

import json
from types import SimpleNamespace

import pytest
import torch

from r1omni_ray.labels import AUDIO_TOKEN_INDEX, VIDEO_TOKEN_INDEX
from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM
from r1omni_ray.tiny.model import tiny_config


def _prompt(seed=0, ids=None):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        prompt_ids=ids or [1, 2, VIDEO_TOKEN_INDEX, 3, AUDIO_TOKEN_INDEX, 4, 5],
        pixel_values=torch.randn(4, 3, 32, 32, generator=g),
        audio_features=torch.randn(16, 200, generator=g),
        bert_input_ids=[1, 5, 6, 2],
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HumanOmniQwen2ForCausalLM(tiny_config(120)).eval()


def test_parameter_names_follow_humanomni_layout(model):
    names = set(model.state_dict())
    for prefix in ("model.vision_tower.vision_tower.vision_model.embeddings.",
                   "model.audio_tower.audio_tower.encoder.conv1.",
                   "model.mm_projector.", "model.audio_projector.0.", "model.bert_model.embeddings.",
                   "model.bert_gate.0.", "model.layers.0.self_attn.q_proj.", "model.embed_tokens."):
        assert any(n.startswith(prefix) for n in names), prefix


def test_splice_lengths(model):
    e = model.embed_prompts([_prompt()])[0]
    v = model.encode_video(_prompt().pixel_values[None], [[1, 2]])
    a = model.encode_audio(_prompt().audio_features[None])
    assert v.shape[1] == 4 * 2 * 2  # 4 frames x (4x4 patches pooled to 2x2)
    assert a.shape[1] == 100 // 3
    assert e.shape == (5 + v.shape[1] + a.shape[1], 64)


@torch.no_grad()
def test_video_changes_logits_and_causality(model):
    p, q = _prompt(0), _prompt(0)
    q.pixel_values = q.pixel_values + 1.0
    lp1, _, _ = model.completion_logprobs([p], [0], [[7, 8, 9]])
    lp2, _, _ = model.completion_logprobs([q], [0], [[7, 8, 9]])
    assert not torch.allclose(lp1, lp2)
    # changing a later completion token leaves earlier positions unchanged
    lp3, _, _ = model.completion_logprobs([p], [0], [[7, 8, 10]])
    assert torch.allclose(lp1[0, :2], lp3[0, :2], atol=1e-6)
    assert not torch.allclose(lp1[0, 2], lp3[0, 2])


@torch.no_grad()
def test_padding_does_not_change_logprobs(model):
    p = _prompt(1)
    single, _, _ = model.completion_logprobs([p], [0], [[7, 8]])
    batch, mask, _ = model.completion_logprobs([p, _prompt(2)], [0, 1], [[7, 8], [9, 10, 11, 12]])
    assert torch.allclose(single[0], batch[0, :2], atol=1e-5)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_missing_media_for_placeholder_is_a_clear_error(model):
    p = _prompt()
    p.pixel_values = None
    with pytest.raises(ValueError, match="video"):
        model.embed_prompts([p])


@torch.no_grad()
def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "HumanOmni_qwen2"
    assert cfg["architectures"] == ["HumanOmniQwen2ForCausalLM"]
    for key in ("mm_vision_tower", "mm_audio_tower", "mm_projector_type", "mm_audio_projector_type",
                "mm_vision_select_layer", "num_frames", "mm_hidden_size", "audio_hidden_size"):
        assert key in cfg
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert isinstance(loaded, HumanOmniQwen2ForCausalLM)
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    a, _, _ = model.completion_logprobs([_prompt()], [0], [[7, 8, 9]])
    b, _, _ = loaded.completion_logprobs([_prompt()], [0], [[7, 8, 9]])
    # Weights are bit-identical; the forward may pick other CPU kernels
    # after a reload (memory layout), so log-probs compare at fp32 tolerance.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_grad_flows_to_projectors_not_frozen_towers(model):
    from r1omni_ray.model.loading import freeze_modules

    m = HumanOmniQwen2ForCausalLM(model.config).train()
    freeze_modules(m, vision=True, audio=True, bert=True)
    lp, mask, _ = m.completion_logprobs([_prompt()], [0], [[7, 8, 9]])
    (lp * mask).sum().backward()
    assert m.model.audio_projector[0].weight.grad.abs().sum() > 0
    assert m.model.mm_projector.readout_video[0].weight.grad.abs().sum() > 0
    assert m.model.bert_gate[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.model.vision_tower.parameters())


@torch.no_grad()
def test_loads_an_export_in_the_earlier_flat_tower_layout(model, tmp_path):
    """Exports written before the reference layout had SigLIP and the Whisper encoder directly under their
    tower (no `vision_model.` / `encoder.` level); load_policy renames them."""
    from safetensors.torch import load_file, save_file

    from r1omni_ray.model.loading import load_policy

    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    flat = {k.replace("vision_tower.vision_tower.vision_model.", "vision_tower.vision_tower.")
             .replace("audio_tower.audio_tower.encoder.", "audio_tower.audio_tower."): v for k, v in sd.items()}
    assert not any(".vision_model." in k or ".audio_tower.encoder." in k for k in flat)
    save_file(flat, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = load_policy(tmp_path, "float32")
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_learner_attention_takes_flash_only_where_it_can_run():
    import pytest as _pytest

    from r1omni_ray.model.loading import learner_attention

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert learner_attention("auto", gpu, torch.bfloat16, flash_installed=True) == "flash_attention_2"
    assert learner_attention("auto", gpu, torch.float32, flash_installed=True) == "sdpa"  # flash: half only
    assert learner_attention("auto", gpu, torch.bfloat16, flash_installed=False) == "sdpa"
    assert learner_attention("auto", cpu, torch.bfloat16, flash_installed=True) == "sdpa"
    assert learner_attention("sdpa", gpu, torch.bfloat16, flash_installed=True) == "sdpa"
    with _pytest.raises(ValueError, match="flash_attention_2: the flash-attn package is not installed"):
        learner_attention("flash_attention_2", gpu, torch.bfloat16, flash_installed=False)
