"""vLLM engine logic that runs without vLLM: request building, weight routing, LM export; plus a GPU
smoke test that runs only where vllm and a CUDA device exist."""

import importlib.util
import sys

import pytest
import torch

from r1omni_ray.engines.base import SamplingParams, trim_at_eos
from r1omni_ray.engines.vllm_engine import build_requests, export_lm_dir, sampling_kwargs, split_lm_weights


def test_module_imports_without_vllm():
    assert "vllm" not in sys.modules or importlib.util.find_spec("vllm") is not None


def test_split_lm_weights_routes_front_end_to_the_worker():
    named = [("model.layers.0.mlp.up_proj.weight", 1), ("lm_head.weight", 2), ("model.embed_tokens.weight", 3),
             ("model.vision_tower.vision_tower.embeddings.patch_embedding.weight", 4),
             ("model.audio_projector.0.weight", 5), ("model.bert_gate.2.bias", 6), ("model.mm_projector.x", 7)]
    lm, mm = split_lm_weights(named)
    assert [n for n, _ in lm] == ["model.layers.0.mlp.up_proj.weight", "lm_head.weight", "model.embed_tokens.weight"]
    assert len(mm) == 4


def test_sampling_kwargs():
    kw = sampling_kwargs(SamplingParams(n=8, temperature=0.9, top_p=0.95, max_new_tokens=33, seed=3))
    # Sampling log-probs only when asked for (rollout.sampling_logprobs): nothing in the loss reads them.
    assert kw == dict(n=8, temperature=0.9, top_p=0.95, top_k=-1, max_tokens=33, logprobs=None, seed=3)
    kw = sampling_kwargs(SamplingParams(n=8, max_new_tokens=33, seed=3, logprobs=True))
    assert kw["logprobs"] == 0  # vLLM: 0 = the sampled token's own log-prob only
    g = sampling_kwargs(SamplingParams(greedy=True, max_new_tokens=5))
    assert g["n"] == 1 and g["temperature"] == 0.0


def test_build_requests_carry_prompt_embeds():
    e = [torch.randn(7, 16), torch.randn(3, 16)]
    reqs = build_requests(e)
    assert [r["prompt_embeds"].shape for r in reqs] == [(7, 16), (3, 16)]
    assert torch.equal(reqs[0]["prompt_embeds"], e[0])


def test_trim_at_eos():
    assert trim_at_eos([5, 6, 2, 0, 0], {2}, 0) == ([5, 6, 2], "stop")
    assert trim_at_eos([5, 6, 7], {2}, 0) == ([5, 6, 7], "length")


@torch.no_grad()
def test_exported_lm_dir_is_a_plain_qwen2_with_identical_logits(tiny_ckpt, tmp_path):
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from r1omni_ray.model.loading import load_policy

    policy = load_policy(tiny_ckpt).eval()
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    out = export_lm_dir(policy, tok, tmp_path / "lm")
    lm = Qwen2ForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    emb = policy.get_input_embeddings()(ids)
    ref = policy(inputs_embeds=emb).logits
    got = lm(inputs_embeds=emb).logits
    assert torch.allclose(ref, got, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(), reason="needs vllm and a CUDA GPU"
)
def test_vllm_engine_generates_and_loads_weights(tiny_ckpt, synth_data, tmp_path):
    from r1omni_ray.data.processor import OmniProcessor
    from r1omni_ray.data.records import load_records
    from r1omni_ray.engines.vllm_engine import VLLMEngine
    from r1omni_ray.model.loading import load_policy

    proc = OmniProcessor.from_pretrained(tiny_ckpt)
    model = load_policy(tiny_ckpt, "bfloat16").cuda()
    eng = VLLMEngine(model, proc.tokenizer, tmp_path, gpu_memory_utilization=0.3, max_model_len=1024)
    rec = load_records(synth_data / "train.json").records[0]
    out = eng.generate([proc.process(rec)], SamplingParams(n=4, max_new_tokens=8, seed=0, logprobs=True))
    assert len(out) == 1 and len(out[0]) == 4
    assert all(len(c.logprobs) == len(c.token_ids) for c in out[0])
    named = [(n, p.detach() * 0.5) for n, p in model.named_parameters()]
    eng.load_weights(named)
    greedy = eng.generate([proc.process(rec)], SamplingParams(greedy=True, max_new_tokens=4))
    assert len(greedy[0]) == 1
