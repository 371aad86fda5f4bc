"""HumanOmni's all_in_one_small vision projector: timm-compatible names, shapes, wiring into the policy."""

import json
from types import SimpleNamespace

import pytest
import torch

from r1omni_ray.labels import AUDIO_TOKEN_INDEX, VIDEO_TOKEN_INDEX
from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM
from r1omni_ray.model.projectors import AllInOneSmall, RegStage
from r1omni_ray.tiny.model import TinySizes, tiny_config

# state_dict of timm 1.0.3 `RegStage(depth=2, in_chs=C, out_chs=H, stride=1, dilation=1, act_layer=nn.SiLU,
# norm_layer=LayerNorm2d)` (Bottleneck defaults: bottle_ratio=1, group_size=1 -> depthwise 3x3, se_ratio=0.25
# of the block's input width), for the real HumanOmni-0.5B sizes C=768 (SigLIP-base), H=896 (Qwen2-0.5B).
TIMM_REGSTAGE_768_896 = {
    "b1.conv1.conv.weight": (896, 768, 1, 1), "b1.conv1.bn.weight": (896,), "b1.conv1.bn.bias": (896,),
    "b1.conv2.conv.weight": (896, 1, 3, 3), "b1.conv2.bn.weight": (896,), "b1.conv2.bn.bias": (896,),
    "b1.se.fc1.weight": (192, 896, 1, 1), "b1.se.fc1.bias": (192,),
    "b1.se.fc2.weight": (896, 192, 1, 1), "b1.se.fc2.bias": (896,),
    "b1.conv3.conv.weight": (896, 896, 1, 1), "b1.conv3.bn.weight": (896,), "b1.conv3.bn.bias": (896,),
    "b1.downsample.conv.weight": (896, 768, 1, 1), "b1.downsample.bn.weight": (896,),
    "b1.downsample.bn.bias": (896,),
    "b2.conv1.conv.weight": (896, 896, 1, 1), "b2.conv1.bn.weight": (896,), "b2.conv1.bn.bias": (896,),
    "b2.conv2.conv.weight": (896, 1, 3, 3), "b2.conv2.bn.weight": (896,), "b2.conv2.bn.bias": (896,),
    "b2.se.fc1.weight": (224, 896, 1, 1), "b2.se.fc1.bias": (224,),
    "b2.se.fc2.weight": (896, 224, 1, 1), "b2.se.fc2.bias": (896,),
    "b2.conv3.conv.weight": (896, 896, 1, 1), "b2.conv3.bn.weight": (896,), "b2.conv3.bn.bias": (896,),
}


def test_regstage_state_dict_matches_timm_names_and_shapes():
    with torch.device("meta"):
        s1 = RegStage(2, 768, 896)
        s2 = RegStage(2, 896, 896)
    assert {k: tuple(v.shape) for k, v in s1.state_dict().items()} == TIMM_REGSTAGE_768_896
    # in == out: identity shortcut, so no downsample weights; SE width from the 896-wide input.
    expect2 = {k: v for k, v in TIMM_REGSTAGE_768_896.items() if not k.startswith("b1.downsample.")}
    expect2 |= {"b1.conv1.conv.weight": (896, 896, 1, 1), "b1.se.fc1.weight": (224, 896, 1, 1),
                "b1.se.fc1.bias": (224,), "b1.se.fc2.weight": (896, 224, 1, 1)}
    assert {k: tuple(v.shape) for k, v in s2.state_dict().items()} == expect2


def test_all_in_one_small_keys_at_checkpoint_sizes():
    with torch.device("meta"):
        p = AllInOneSmall(768, 896)
    sd = {k: tuple(v.shape) for k, v in p.state_dict().items()}
    for branch in ("video", "body"):
        for k, shape in TIMM_REGSTAGE_768_896.items():
            assert sd[f"s1_{branch}.{k}"] == shape
        assert sd[f"sampler_{branch}.0.weight"] == (896, 896, 2, 2, 2)
        assert sd[f"sampler_{branch}.0.bias"] == (896,)
        assert sd[f"s2_{branch}.b2.se.fc1.weight"] == (224, 896, 1, 1)
        assert f"s2_{branch}.b1.downsample.conv.weight" not in sd
        assert sd[f"readout_{branch}.0.weight"] == sd[f"readout_{branch}.2.weight"] == (896, 896)
    assert sd["mlp_2xgelu_face.0.weight"] == (896, 768)
    assert sd["mlp_2xgelu_face.2.weight"] == (896, 896)
    assert not any("running_" in k or "num_batches" in k for k in sd)  # LayerNorm, no BN buffers
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {f"{a}_{b}" for a in ("s1", "s2", "sampler", "readout") for b in ("video", "body")} | {
        "mlp_2xgelu_face"}


@pytest.mark.parametrize("t,side", [(4, 4), (3, 6), (1, 4)])
def test_branch_shapes_are_consistent(t, side):
    torch.manual_seed(0)
    p = AllInOneSmall(32, 64).eval()
    x = torch.randn(2, t, side * side, 32)
    with torch.no_grad():
        video, body, face = p(x, x, x.flatten(0, 1))
    n = t * (side // 2) ** 2  # time kept, 2x2 spatial downsample
    assert video.shape == body.shape == (2, n, 64)
    assert face.shape == (2 * t, side * side, 64)  # pooled 2x2 per frame by the model -> also n per sample
    assert torch.isfinite(video).all() and not torch.allclose(video, body)


def _prompt(seed=0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        prompt_ids=[1, 2, VIDEO_TOKEN_INDEX, 3, AUDIO_TOKEN_INDEX, 4, 5],
        pixel_values=torch.randn(4, 3, 32, 32, generator=g),
        audio_features=torch.randn(16, 200, generator=g),
        bert_input_ids=[1, 5, 6, 2],
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HumanOmniQwen2ForCausalLM(tiny_config(120, mm_projector_type="all_in_one_small")).eval()


def test_policy_builds_all_in_one_small_with_gate(model):
    names = set(model.state_dict())
    for key in ("model.mm_projector.s1_video.b1.conv1.conv.weight",
                "model.mm_projector.s1_body.b1.downsample.bn.bias",
                "model.mm_projector.sampler_video.0.weight", "model.mm_projector.s2_body.b2.se.fc2.weight",
                "model.mm_projector.readout_video.2.bias", "model.mm_projector.mlp_2xgelu_face.0.weight",
                "model.bert_gate.0.weight", "model.bert_model.embeddings.word_embeddings.weight"):
        assert key in names, key


@torch.no_grad()
def test_encode_video_mixes_branches_with_gate(model, monkeypatch):
    pv = _prompt().pixel_values[None]
    out = model.encode_video(pv, [[1, 5, 6, 2]])
    assert out.shape == (1, 4 * 2 * 2, 64)  # 4 frames x (4x4 patches -> 2x2), same count as gated_mlp
    e = model.embed_prompts([_prompt()])[0]
    assert e.shape[0] == 5 + out.shape[1] + 100 // 3
    m = model.model
    feats = m.vision_tower(pv.flatten(0, 1)).view(1, 4, 16, -1)
    video, body, face = m.mm_projector(feats, feats, feats.flatten(0, 1))
    face = model._pool_frames(face, 1, 4)
    for i, branch in enumerate((video, body, face)):
        onehot = torch.nn.functional.one_hot(torch.tensor([i]), 3).float()
        monkeypatch.setattr(model, "_vision_gate", lambda ids, g=onehot: g)
        assert torch.allclose(model.encode_video(pv, [[1]]), branch, atol=1e-6)


@torch.no_grad()
def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["mm_projector_type"] == "all_in_one_small"
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert isinstance(loaded.model.mm_projector, AllInOneSmall)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lp1, _, _ = model.completion_logprobs([_prompt()], [0], [[7, 8, 9]])
    lp2, _, _ = loaded.completion_logprobs([_prompt()], [0], [[7, 8, 9]])
    # Weights compare exactly; the forward after a reload may take other CPU kernels: fp32 tolerance.
    torch.testing.assert_close(lp1, lp2, rtol=1e-5, atol=1e-5)


def test_grad_reaches_every_projector_stage(model):
    from r1omni_ray.model.loading import freeze_modules

    m = HumanOmniQwen2ForCausalLM(model.config).train()
    freeze_modules(m, vision=True, audio=True, bert=True)
    lp, mask, _ = m.completion_logprobs([_prompt()], [0], [[7, 8, 9]])
    (lp * mask).sum().backward()
    p = m.model.mm_projector
    for mod in (p.s1_video.b1.conv1.conv, p.s1_body.b1.downsample.conv, p.sampler_video[0],
                p.s2_body.b2.se.fc1, p.readout_video[0], p.mlp_2xgelu_face[0], m.model.bert_gate[0]):
        assert mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0, mod
    assert all(q.grad is None for q in m.model.vision_tower.parameters())


def test_odd_patch_grid_is_rejected():
    # 40 / 8 = 5 patches per side: the sampler gives 2x2 per frame but the face pool gives 3x3.
    with pytest.raises(ValueError, match="all_in_one_small"):
        cfg = tiny_config(120, TinySizes(image_size=40), mm_projector_type="all_in_one_small")
        HumanOmniQwen2ForCausalLM(cfg)
