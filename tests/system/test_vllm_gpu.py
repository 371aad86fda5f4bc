"""vLLM rollout path on a GPU: skipped cleanly where vllm or CUDA is missing (CPU CI). Run on a GPU machine
with the gpu extra: `pytest -m gpu tests/system/test_vllm_gpu.py`."""

import importlib.util

import pytest
import torch

from tests.vllm_support import push_weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                       reason="needs vllm and a CUDA GPU"),
]


@pytest.fixture(scope="module")
def setup(tiny_ckpt, synth_data, tmp_path_factory):
    from r1omni_ray.data.processor import OmniProcessor
    from r1omni_ray.data.records import load_records
    from r1omni_ray.engines.vllm_engine import VLLMEngine
    from r1omni_ray.model.loading import load_policy

    proc = OmniProcessor.from_pretrained(tiny_ckpt)
    engine = VLLMEngine(load_policy(tiny_ckpt, "bfloat16").cuda(), proc.tokenizer, tmp_path_factory.mktemp("vllm"),
                        gpu_memory_utilization=0.3, max_model_len=1024)
    recs = load_records(synth_data / "train.json").records
    yield proc, engine, [proc.process(r) for r in recs[:4]]
    engine.close()  # its GPU share back before the next module's engines (test_vllm_gpu_batch.py: 0.6)


def _push(engine, named):
    push_weights(engine, named, 1 << 16)  # several small buckets


def test_update_changes_greedy_tokens_and_logprobs_match_the_policy(setup, tiny_ckpt):
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.model.loading import load_policy

    proc, engine, inputs = setup
    params = SamplingParams(greedy=True, max_new_tokens=8, logprobs=True)
    before = engine.generate(inputs, params)
    policy = load_policy(tiny_ckpt, "float32").cuda()
    torch.manual_seed(0)
    with torch.no_grad():  # perturb the LM and the projectors
        for n, p in policy.named_parameters():
            if n.startswith(("model.layers.", "model.audio_projector.", "model.mm_projector.")):
                p.add_(0.05 * torch.randn_like(p))
    _push(engine, [(n, p.detach().to(torch.bfloat16)) for n, p in policy.named_parameters()])
    after = engine.generate(inputs, params)
    assert [g[0].token_ids for g in after] != [g[0].token_ids for g in before]
    comps = [g[0].token_ids for g in after]
    lp, mask, _ = policy.to(torch.bfloat16).completion_logprobs(inputs, list(range(len(inputs))), comps)
    for i, g in enumerate(after):  # vLLM's log-probs under the new weights = the learner's (bf16 tolerance)
        torch.testing.assert_close(torch.tensor(g[0].logprobs), lp[i, : len(comps[i])].float().cpu(), atol=0.1, rtol=0)


def test_same_prompt_after_update_equals_a_fresh_engine(setup, tiny_ckpt, tmp_path):
    """The prefix cache is reset on load: no attention state computed with old weights is reused."""
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.engines.vllm_engine import VLLMEngine
    from r1omni_ray.model.loading import load_policy

    proc, engine, inputs = setup
    params = SamplingParams(greedy=True, max_new_tokens=8)
    engine.generate(inputs, params)  # fills the prefix cache
    new = load_policy(tiny_ckpt, "bfloat16").cuda()
    with torch.no_grad():
        for n, p in new.named_parameters():
            if n.startswith("model.layers."):
                p.mul_(1.01)
    _push(engine, [(n, p.detach()) for n, p in new.named_parameters()])
    updated = engine.generate(inputs, params)
    fresh = VLLMEngine(new, proc.tokenizer, tmp_path, gpu_memory_utilization=0.2, max_model_len=1024)
    try:
        assert [g[0].token_ids for g in updated] == [g[0].token_ids for g in fresh.generate(inputs, params)]
    finally:
        fresh.close()


def test_greedy_parity_with_the_hf_engine_including_stop_token(setup, tiny_ckpt):
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.engines.hf_engine import HFEngine
    from r1omni_ray.model.loading import load_policy

    proc, engine, inputs = setup
    assert proc.tokenizer.eos_token_id != proc.tokenizer.pad_token_id
    params = SamplingParams(greedy=True, max_new_tokens=16)
    hf = HFEngine(load_policy(tiny_ckpt, "bfloat16").cuda(), proc.tokenizer).generate(inputs, params)
    got = engine.generate(inputs, params)
    for a, b in zip(hf, got, strict=True):
        assert (a[0].token_ids, a[0].finish_reason) == (b[0].token_ids, b[0].finish_reason)


def test_per_sample_seeds_are_reproducible_and_distinct(setup):
    from r1omni_ray.engines.base import SamplingParams

    _, engine, inputs = setup
    params = SamplingParams(n=4, max_new_tokens=8, seed=123)
    a = engine.generate(inputs[:2], params, uids=[5, 6])
    b = engine.generate(inputs[1:2], params, uids=[6])
    assert [c.token_ids for c in a[1]] == [c.token_ids for c in b[0]]
