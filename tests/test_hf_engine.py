"""The transformers rollout engine returns what is used: ids, text, finish reason; sampling log-probs only
on request, recorded step by step for the chosen token (checked against a teacher-forced forward)."""

import torch

from r1omni_ray.data.processor import OmniProcessor
from r1omni_ray.data.records import load_records
from r1omni_ray.engines.base import SamplingParams
from r1omni_ray.engines.hf_engine import HFEngine
from r1omni_ray.model.loading import load_policy


def test_sampling_logprobs_only_on_request_and_equal_to_the_policys(tiny_ckpt, synth_data):
    proc = OmniProcessor.from_pretrained(tiny_ckpt)
    model = load_policy(tiny_ckpt, "float32")
    engine = HFEngine(model, proc.tokenizer)
    inp = proc.process(load_records(synth_data / "train.json").records[0])

    plain = engine.generate([inp], SamplingParams(n=3, max_new_tokens=6, seed=1, temperature=0.7))[0]
    assert len(plain) == 3 and all(c.logprobs is None and c.token_ids for c in plain)

    with_lp = engine.generate([inp], SamplingParams(n=3, max_new_tokens=6, seed=1, temperature=0.7,
                                                    logprobs=True))[0]
    assert [c.token_ids for c in with_lp] == [c.token_ids for c in plain]  # same seed, same samples
    comps = [c.token_ids for c in with_lp]
    with torch.no_grad():
        lp, mask, _ = model.completion_logprobs([inp], [0] * 3, comps, temperature=0.7)
    for i, c in enumerate(with_lp):
        assert len(c.logprobs) == len(c.token_ids)
        # Incremental decoding (KV cache) against one full forward: fp32 tolerance.
        torch.testing.assert_close(torch.tensor(c.logprobs), lp[i, : len(comps[i])], rtol=1e-4, atol=1e-4)
