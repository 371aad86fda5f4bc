"""Torch-level GPU checks of the learner's memory fixes and the rollout's GPU feature path (issue: the first
GPU cluster run). Skipped cleanly without CUDA; run on a GPU machine with `pytest -m gpu tests/system/test_gpu_memory.py`.
They need torch and transformers only (no Ray, DeepSpeed or vLLM)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
MIB = 2**20


def test_parked_reference_weights_visit_the_gpu_from_pinned_memory_and_nothing_comes_back():
    from torch import nn

    from r1omni_ray.learner.reference import ParkedWeights

    m = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64))
    x = torch.randn(4, 64)
    expected = m(x)
    parked = ParkedWeights(m)
    assert all(h.is_pinned() for h in parked.host)
    host_ptrs = [h.data_ptr() for h in parked.host]
    with parked.on("cuda"):
        assert all(p.is_cuda for p in m.parameters())
        torch.testing.assert_close(m(x.cuda()).cpu(), expected, atol=1e-5, rtol=0)
    assert [p.data_ptr() for p in m.parameters()] == host_ptrs[:len(list(m.parameters()))]
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() < MIB  # the device copies are gone


def test_logprob_backward_holds_the_bf16_logits_not_a_float32_copy_of_every_row():
    """Real vocabulary (152k), 8 completions x 512 tokens in bf16: the autograd peak of sequence_logprobs
    stays near the logits' own size (1.2 GB), where autograd through the plain float32 expression keeps
    twice that."""
    from r1omni_ray.model.logprobs import sequence_logprobs

    def peak(fn) -> int:
        logits = torch.randn(8, 512, 152064, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        ids = torch.randint(0, 152064, (8, 512), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(logits, ids).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    ours = peak(lambda lg, ids: sequence_logprobs(lg, ids))
    plain = peak(lambda lg, ids: torch.log_softmax(lg.float(), -1).gather(-1, ids[..., None]).squeeze(-1))
    logits_bytes = 8 * 512 * 152064 * 2
    print(json.dumps({"peak_ours_mib": ours // MIB, "peak_plain_mib": plain // MIB, "logits_mib": logits_bytes // MIB}))
    assert ours < plain / 2 and ours < 2 * logits_bytes  # the gradient itself is one more logits-sized tensor


def test_whisper_features_on_the_gpu_equal_the_cpu_ones():
    import numpy as np
    from transformers import WhisperFeatureExtractor

    from r1omni_ray.data.audio import audio_features

    fe = WhisperFeatureExtractor(feature_size=128)
    wave = np.random.default_rng(0).standard_normal(16000 * 7).astype(np.float32) * 0.1
    torch.testing.assert_close(audio_features(wave, fe, "cuda"), audio_features(wave, fe, "cpu"), atol=1e-4, rtol=0)


@dataclass
class TextPrompt:
    prompt_ids: list[int]
    pixel_values: torch.Tensor | None = None
    audio_features: torch.Tensor | None = None
    bert_input_ids: list[int] = field(default_factory=list)
    vision_feats: torch.Tensor | None = None
    audio_feats: torch.Tensor | None = None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_learner_micro_batch_peak_at_the_real_0p5b_lm_size(checkpointing):
    """The policy at R1-Omni-0.5B's size (random weights, bf16): one micro-batch of one prompt group (a 972-token
    prompt, as the omni prompt is, and G=8 completions of 256 tokens) forward and backward through the shared
    prefix. Prints the measured peak beside bench.memory_model's activation + logits estimate for the same
    shape; they must agree within 2x (the estimate sizes the 7B config)."""
    from bench.memory_model import Counts, build_config, micro_batch_bytes
    from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM

    torch.manual_seed(0)
    config = build_config("0.5b")
    model = HumanOmniQwen2ForCausalLM(config).to("cuda", torch.bfloat16)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    prompt = TextPrompt(list(torch.randint(0, 150000, (972,)).tolist()))
    comps = [torch.randint(0, 150000, (256,)).tolist() for _ in range(8)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, mask, _ = model.completion_logprobs([prompt], [0] * 8, comps)
    (lp * mask).sum().backward()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    grads = sum(p.numel() * 2 for p in model.parameters() if p.grad is not None)
    c = Counts(0, 0, 0, 0, 0, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
               config.num_key_value_heads * (config.hidden_size // config.num_attention_heads), config.vocab_size)
    estimate = sum(micro_batch_bytes(c, 1, 972, 8, 256, checkpointing).values()) + grads
    print(json.dumps({"checkpointing": checkpointing, "measured_mib": measured // MIB, "estimate_mib": estimate // MIB}))
    assert estimate / 2 < measured < 2 * estimate


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs the flash-attn package")
def test_flash_attention_varlen_equals_sdpa_through_the_shared_prefix(tiny_ckpt, synth_data):
    """learner.attn_implementation=auto picks flash_attention_2 where it is installed: transformers unpads the
    right-padded prompts and the prefix + completion keys by the attention mask. Log-probs and gradients equal
    SDPA's, with empty and 1-token completions and an audio-less prompt in the batch (bf16 tolerance)."""
    from r1omni_ray.data.processor import OmniProcessor
    from r1omni_ray.data.records import load_records
    from r1omni_ray.model.loading import load_policy, set_lm_attention

    proc = OmniProcessor.from_pretrained(tiny_ckpt)
    recs = load_records(synth_data / "train.json").records[:3]
    prompts = [proc.process(recs[0]), proc.process(recs[1], use_audio=False), proc.process(recs[2])]
    comps = [[5, 6, 7, 8], [], [9], [10, 11], [12, 13, 14, 15, 16], [17]]
    index = [0, 0, 1, 1, 2, 2]
    out = {}
    for impl in ("sdpa", "flash_attention_2"):
        model = load_policy(tiny_ckpt, "bfloat16").cuda()
        set_lm_attention(model, impl)
        lp, mask, _ = model.completion_logprobs(prompts, index, comps)
        (lp * mask).sum().backward()
        out[impl] = (lp.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(out["flash_attention_2"][0], out["sdpa"][0], atol=2e-2, rtol=0)
    for n, g in out["sdpa"][1].items():
        torch.testing.assert_close(out["flash_attention_2"][1][n], g, atol=5e-2, rtol=5e-2, msg=n)
