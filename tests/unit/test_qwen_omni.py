"""The Qwen2.5-Omni thinker policy against transformers' own thinker: strict loading of the published layout,
logits of transformers' forward (its own embedding merge and get_rope_index), generate() greedy, and this
project's shared-prefix / packed training forwards and prefill-once sampling with 3-D positions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from r1omni_ray.config import ModelConfig
from r1omni_ray.data.qwen_omni_processor import QwenOmniProcessor
from r1omni_ray.data.records import OmniRecord
from r1omni_ray.engines.base import SamplingParams
from r1omni_ray.engines.hf_engine import HFEngine
from r1omni_ray.model.family import detect, resolve
from r1omni_ray.model.loading import CheckpointError, freeze_modules, set_train_mode
from r1omni_ray.model.qwen_omni import load_qwen_omni
from r1omni_ray.tiny.qwen_omni import make_tiny_qwen_omni_checkpoint
from tests.reference.qwen_omni.make_reference import HERE as CLIPS

TOL = 1e-5  # fp32, same kernels, different batching/padding


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_qwen_omni_checkpoint(tmp_path_factory.mktemp("qomni") / "full", layout="full")


@pytest.fixture(scope="module")
def model(ckpt):
    return load_qwen_omni(ckpt, "float32").eval()


@pytest.fixture(scope="module")
def prompts(ckpt):
    """Three prompts of different lengths and media: interleaved audio-in-video, a separate wav, video only."""
    proc = QwenOmniProcessor.from_pretrained(ckpt)
    clip, short, wav = (str(CLIPS / n) for n in ("talk_4s.mp4", "short_1500ms.mp4", "voice.wav"))
    recs = [OmniRecord(id="a", video=clip, audio=clip, question="which emotion?", label="happy", solution=""),
            OmniRecord(id="b", video=short, audio=wav, question="which emotion?", label="sad", solution=""),
            OmniRecord(id="c", video=short, audio=None, question="which emotion?", label="sad", solution="")]
    proc.use_audio_in_video = True
    out = [proc.process(recs[0])]
    proc.use_audio_in_video = False
    out += [proc.process(recs[1]), proc.process(recs[2])]
    return out


@pytest.fixture(scope="module")
def seconds(ckpt):
    """Each prompt's seconds per temporal patch (2 frames over the rate they were taken at), for transformers."""
    proc = QwenOmniProcessor.from_pretrained(ckpt)
    return [proc.video(str(CLIPS / n))[2] for n in ("talk_4s.mp4", "short_1500ms.mp4", "short_1500ms.mp4")]


def _media_kwargs(p, second: float, use_audio_in_video: bool) -> dict:
    kw = dict(pixel_values_videos=p.pixel_values, video_grid_thw=torch.tensor([p.video_grid_thw]),
              video_second_per_grid=torch.tensor([second]), use_audio_in_video=use_audio_in_video)
    if p.audio_features is not None:
        kw |= dict(input_features=p.audio_features[None],
                   feature_attention_mask=torch.ones(1, p.audio_features.shape[1], dtype=torch.long))
    return kw


def _reference_logits(model, p, second: float, use_audio_in_video: bool) -> torch.Tensor:
    """transformers' own thinker forward: ids + raw media; it merges the embeddings and computes positions."""
    ids = torch.tensor([p.prompt_ids])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids),
                 **_media_kwargs(p, second, use_audio_in_video)).logits[0]


def test_the_published_layout_loads_strictly_and_skips_only_the_speech_parts(ckpt, model):
    saved = load_file(str(ckpt / "model.safetensors"))
    assert {k.split(".")[0] for k in saved} == {"thinker", "talker", "token2wav"}
    thinker = {k.removeprefix("thinker."): v for k, v in saved.items() if k.startswith("thinker.")}
    state = model.state_dict()
    assert set(state) == set(thinker)
    for k, v in thinker.items():
        assert torch.equal(state[k], v), k


def test_an_export_reloads_exactly_as_a_thinker_checkpoint(ckpt, model, tmp_path):
    import shutil

    out = tmp_path / "export"
    shutil.copytree(ckpt, out, ignore=shutil.ignore_patterns("*.safetensors"))
    model.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_5_omni_thinker"
    assert detect(out).name == "qwen2_5_omni"
    again = load_qwen_omni(out, "float32")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def _edit(ckpt: Path, tmp_path: Path, change) -> Path:
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(ckpt, out)
    tensors = load_file(str(out / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_a_tensor_the_thinker_has_no_place_for_is_an_error(ckpt, tmp_path):
    bad = _edit(ckpt, tmp_path, lambda t: t.__setitem__("thinker.extra_head.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\).*no place for: extra_head.weight"):
        load_qwen_omni(bad, "float32")


def test_a_missing_thinker_tensor_is_an_error(ckpt, tmp_path):
    bad = _edit(ckpt, tmp_path, lambda t: t.pop("thinker.model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"1 thinker parameter\(s\) missing.*model.norm.weight"):
        load_qwen_omni(bad, "float32")


def test_a_full_checkpoint_without_a_thinker_and_a_family_mismatch_are_named(ckpt, tmp_path):
    import shutil

    out = tmp_path / "no_thinker"
    shutil.copytree(ckpt, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("thinker_config")
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="without a thinker_config: there is no thinker to train"):
        resolve("auto", out).check(out)
    with pytest.raises(ValueError, match=r"model.family='humanomni' but .*config.json is a qwen2_5_omni checkpoint"):
        resolve("humanomni", ckpt)
    assert resolve("auto", ckpt).name == resolve("qwen2_5_omni", ckpt).name == "qwen2_5_omni"


def test_logits_equal_transformers_thinker_forward(model, prompts, seconds):
    uiv = [True, False, False]
    assert seconds[0] == 1.0 and seconds[1] == 0.75  # 4 of the short clip's 12 frames at 8 fps
    with torch.no_grad():
        emb = model.embed_prompts(prompts)
        for e, pos, p, flag, sec in zip(emb, model.prompt_positions(prompts), prompts, uiv, seconds, strict=True):
            h = model.model(inputs_embeds=e[None], position_ids=pos[:, None],
                            attention_mask=torch.ones(1, e.shape[0], dtype=torch.long)).last_hidden_state
            ref = _reference_logits(model, p, sec, flag)
            assert (model.lm_head(h)[0] - ref).abs().max() <= TOL


def test_shipped_tower_outputs_give_the_same_embeddings(model, prompts):
    with torch.no_grad():
        raw = model.embed_prompts(prompts)
        feats = model.tower_features(prompts, vision=True, audio=True)
        shipped = [p.with_tower_features(v, a) for p, (v, a) in zip(prompts, feats, strict=True)]
        assert all(s.pixel_values is None for s in shipped)
        for a, b in zip(raw, model.embed_prompts(shipped), strict=True):
            assert torch.equal(a, b)


COMPLETIONS = [[5, 9, 11, 4], [], [7], [5, 9, 11, 4, 8, 8, 3], [12, 13], [6]]
PROMPT_INDEX = [0, 0, 1, 1, 2, 2]  # micro-batch rows straddle the three prompts; empty and 1-token completions


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prefix_equals_packed_in_values_and_gradients(ckpt, prompts, checkpointing):
    def run(shared: bool):
        m = load_qwen_omni(ckpt, "float32")
        freeze_modules(m, vision=True, audio=True, bert=True)
        if checkpointing:
            m.enable_gradient_checkpointing()
        set_train_mode(m)
        lp, mask, _ = m.completion_logprobs(prompts, PROMPT_INDEX, COMPLETIONS, shared_prefix=shared)
        (lp * mask).sum().backward()
        return lp.detach(), mask, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    lp_s, mask, g_s = run(True)
    lp_p, _, g_p = run(False)
    assert mask.sum() == sum(len(c) for c in COMPLETIONS)
    assert ((lp_s - lp_p) * mask).abs().max() <= TOL
    assert set(g_s) == set(g_p) and not any(n.startswith(("visual.", "audio_tower.")) for n in g_s)
    for n in g_s:
        assert torch.allclose(g_s[n], g_p[n], atol=TOL, rtol=1e-4), n


def test_training_positions_continue_every_axis_after_the_prompt(model, prompts):
    rows, nxt = model._positions(prompts, model.embed_prompts(prompts))
    for r, n, p in zip(rows, nxt, prompts, strict=True):
        assert r.shape == (3, len(p.prompt_ids)) and n == int(p.positions.max()) + 1
        assert n < len(p.prompt_ids)  # the interleaved media compress the time axis: positions != indices


def test_greedy_equals_transformers_generate(model, ckpt, prompts, seconds):
    eng = HFEngine(model, QwenOmniProcessor.from_pretrained(ckpt).tokenizer, stop_on_checkpoint_eos=False)
    params = SamplingParams(n=1, greedy=True, max_new_tokens=10, temperature=1.0, top_p=1.0)
    ours = [g[0].token_ids for g in eng.generate(prompts, params)]  # one left-padded batch of three lengths
    for p, flag, sec, got in zip(prompts, [True, False, False], seconds, ours, strict=True):
        ids = torch.tensor([p.prompt_ids])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             eos_token_id=[], pad_token_id=0, **_media_kwargs(p, sec, flag))
        assert got == ref[0, ids.shape[1]:].tolist()


def test_prefill_once_sampling_equals_per_sample_and_the_learner_log_probs(model, ckpt, prompts):
    eng = HFEngine(model, QwenOmniProcessor.from_pretrained(ckpt).tokenizer, stop_on_checkpoint_eos=False)
    params = SamplingParams(n=4, greedy=False, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=3, logprobs=True)
    shared = eng.generate(prompts, params, uids=[5, 6, 7])
    eng.shared_prefix = False
    plain = eng.generate(prompts, params, uids=[5, 6, 7])
    rows = [c for g in shared for c in g]
    assert [c.token_ids for c in rows] == [c.token_ids for g in plain for c in g]
    lp, mask, _ = model.completion_logprobs(prompts, [i for i in range(3) for _ in range(4)],
                                            [c.token_ids for c in rows])
    for r, c in enumerate(rows):
        assert max(abs(a - b) for a, b in zip(c.logprobs, lp[r, : len(c.logprobs)].tolist(), strict=True)) <= TOL


def test_a_text_only_micro_batch_still_runs_the_towers_when_asked(model, prompts):
    """every_forward_runs="raw" (ZeRO-3 with trainable towers): both towers run on a zero input, adding zero."""
    text = [prompts[0].with_tower_features(None, None)]
    from dataclasses import replace

    ids = [t for t in text[0].prompt_ids if t not in (model.config.video_token_index, model.config.audio_token_index)]
    text = [replace(text[0], prompt_ids=ids, pixel_values=None, audio_features=None, positions=None)]
    base = model.embed_prompts(text)[0]
    model.every_forward_runs = {"video": "raw", "audio": "raw"}
    try:
        assert torch.equal(model.embed_prompts(text)[0], base)
    finally:
        model.every_forward_runs = {}


def test_the_family_builds_the_tiny_model_and_processor(tmp_path):
    fam = resolve("qwen2_5_omni", None)
    path = fam.make_tiny(tmp_path / "tiny", ("extra words",), seed=1, hidden_size=64, num_layers=1)
    m = fam.load_policy(path, ModelConfig(dtype="float32"))
    assert len(m.model.layers) == 1 and set(m.towers()) == {"vision", "audio"}
    proc = fam.load_processor(path, ModelConfig(system_prompt="Be brief."), "trainer")
    assert re.match(r"<\|im_start\|>system\nBe brief\.<\|im_end\|>\n<\|im_start\|>user\n<\|vision_bos\|><\|VIDEO\|>",
                    proc.build_prompt("q", True, True))


BF16_TOL = 1e-2  # bf16 weights and activations against fp32: measured 1.7e-3 (learner) and 2.5e-3 (engine) here


def test_bf16_learner_and_engine_log_probs_stay_near_fp32(ckpt, model, prompts):
    bf16 = load_qwen_omni(ckpt, "bfloat16").eval()
    with torch.no_grad():
        ref, mask, _ = model.completion_logprobs(prompts, PROMPT_INDEX, COMPLETIONS)
        shared, _, _ = bf16.completion_logprobs(prompts, PROMPT_INDEX, COMPLETIONS, shared_prefix=True)
        packed, _, _ = bf16.completion_logprobs(prompts, PROMPT_INDEX, COMPLETIONS, shared_prefix=False)
    assert shared.dtype == torch.float32  # log-probs of bf16 logits are formed in fp32
    assert ((shared - ref) * mask).abs().max() <= BF16_TOL and ((packed - ref) * mask).abs().max() <= BF16_TOL
    eng = HFEngine(bf16, QwenOmniProcessor.from_pretrained(ckpt).tokenizer, stop_on_checkpoint_eos=False)
    params = SamplingParams(n=4, greedy=False, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=3, logprobs=True)
    rows = [c for g in eng.generate(prompts, params, uids=[1, 2, 3]) for c in g]
    with torch.no_grad():
        lp, _, _ = bf16.completion_logprobs(prompts, [i for i in range(3) for _ in range(4)], [c.token_ids for c in rows])
    for r, c in enumerate(rows):
        assert max(abs(a - b) for a, b in zip(c.logprobs, lp[r, : len(c.logprobs)].tolist(), strict=True)) <= BF16_TOL
