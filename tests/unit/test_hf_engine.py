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


def test_each_sample_has_its_own_seed_whatever_batch_it_is_in(tiny_ckpt, synth_data):
    proc = OmniProcessor.from_pretrained(tiny_ckpt)
    engine = HFEngine(load_policy(tiny_ckpt, "float32"), proc.tokenizer)
    recs = load_records(synth_data / "train.json").records
    a, b = proc.process(recs[0]), proc.process(recs[1])
    params = SamplingParams(n=3, max_new_tokens=6, seed=11, temperature=1.0)
    both = engine.generate([a, b], params, uids=[4, 7])
    alone = engine.generate([b], params, uids=[7])
    # Prompt uid 7's samples depend on (step seed, uid, index) only, not on the batch it shared.
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in both[1]]
    again = engine.generate([a, b], params, uids=[4, 7])
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in both]
    other_step = engine.generate([a, b], SamplingParams(n=3, max_new_tokens=6, seed=12), uids=[4, 7])
    assert [[c.token_ids for c in g] for g in other_step] != [[c.token_ids for c in g] for g in both]


@torch.no_grad()
def test_per_sample_sampler_draws_from_the_tempered_nucleus():
    """The sampler's statistics, not exact tokens: first tokens over many seeds follow softmax(logits / T)
    restricted to the top-p nucleus."""
    from r1omni_ray.engines.hf_engine import PerSampleSampler

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    rows, temp, top_p = 4000, 0.8, 0.9
    s = PerSampleSampler(list(range(rows)), temp, top_p, torch.device("cpu"))
    out = s(torch.zeros(rows, 0, dtype=torch.long), logits.expand(rows, -1).clone())
    assert torch.isfinite(out).sum(dim=1).eq(1).all()  # one token left per row
    counts = torch.bincount(out.argmax(dim=1), minlength=5).float() / rows
    p = torch.softmax(logits[0] / temp, -1)
    keep = (p.sort(descending=True).values.cumsum(0) - p.sort(descending=True).values) < top_p
    want = torch.zeros(5)
    want[p.sort(descending=True).indices[keep]] = p.sort(descending=True).values[keep]
    want /= want.sum()
    assert counts[want == 0].sum() == 0  # nothing outside the nucleus
    torch.testing.assert_close(counts, want, atol=0.03, rtol=0)  # 4000 draws: a few 1e-2 of sampling noise


@torch.no_grad()
def test_prompt_is_prefilled_once_and_samples_are_those_of_per_sample_prefill(tiny_ckpt, synth_data):
    proc = OmniProcessor.from_pretrained(tiny_ckpt)
    model = load_policy(tiny_ckpt, "float32")
    recs = load_records(synth_data / "train.json").records
    # Prompts of different lengths (audio-only vs both): left padding and its positions matter.
    prompts = [proc.process(recs[0]), proc.process(recs[1], use_video=False)]
    widths = sorted(len(model.embed_prompts([p])[0]) for p in prompts)
    assert widths[0] < widths[1]
    params = SamplingParams(n=8, max_new_tokens=8, seed=3, temperature=1.0, logprobs=True)

    seen: list[tuple[int, int]] = []
    inner_forward = model.model.forward

    def record(*args, **kwargs):
        x = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        seen.append(tuple(x.shape[:2]))
        return inner_forward(*args, **kwargs)

    from transformers import AttentionInterface

    from r1omni_ray.engines.shared_prefix import ATTN_NAME, shared_prefix_attention

    prefix_rows: list[int] = []

    def counting(module, query, key, *args, **kwargs):
        if getattr(key, "shared_prefix", None) is not None:
            prefix_rows.append(key.shared_prefix[0].shape[0])
        return shared_prefix_attention(module, query, key, *args, **kwargs)

    model.model.forward = record
    AttentionInterface.register(ATTN_NAME, counting)
    try:
        attn_before = model.config._attn_implementation
        once = HFEngine(model, proc.tokenizer).generate(prompts, params)
        assert model.config._attn_implementation == attn_before  # restored after generate
    finally:
        AttentionInterface.register(ATTN_NAME, shared_prefix_attention)
        model.model.forward = inner_forward
    # One prefill of the 2 prompts (all but their last position), then only single positions for 16 rows.
    assert seen[0] == (2, widths[1] - 1) and all(s[1] == 1 and s[0] == 16 for s in seen[1:])
    # Every decoding step of every layer read the 2 prompts' single prefix copies, not 16 row copies.
    assert len(prefix_rows) == (len(seen) - 1) * model.config.num_hidden_layers and set(prefix_rows) == {2}

    each = HFEngine(model, proc.tokenizer, shared_prefix=False).generate(prompts, params)
    pairs = [(a, b) for ga, gb in zip(once, each, strict=True) for a, b in zip(ga, gb, strict=True)]
    # Same per-sample generators over the same distributions: a token can differ only where a uniform draw
    # falls within float rounding of a cumulative-probability boundary, so nearly all must agree.
    same = [(a, b) for a, b in pairs if a.token_ids == b.token_ids]
    assert len(same) >= 15, f"{len(same)}/16 samples agree"
    for a, b in same:
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-4, atol=1e-4)


def test_shared_prefix_attention_equals_sdpa_over_each_rows_own_copy():
    """One decoding step: queries of n samples per prompt against the prompt's single prefix copy plus their
    own suffix give what SDPA gives over per-row concatenated keys (GQA, a left-padding mask)."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from r1omni_ray.engines.shared_prefix import shared_prefix_attention

    g = torch.Generator().manual_seed(0)
    prompts, n, heads, kv_heads, d, plen, slen = 2, 3, 4, 2, 8, 5, 4
    rows = prompts * n
    q = torch.randn(rows, heads, 1, d, generator=g)
    pk, pv = torch.randn(prompts, kv_heads, plen, d, generator=g), torch.randn(prompts, kv_heads, plen, d, generator=g)
    sk, sv = torch.randn(rows, kv_heads, slen, d, generator=g), torch.randn(rows, kv_heads, slen, d, generator=g)
    mask = torch.ones(rows, 1, 1, plen + slen, dtype=torch.bool)
    mask[:n, :, :, :2] = False  # prompt 0 is left-padded by two positions
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    full_k = torch.cat([pk.repeat_interleave(n, 0), sk], dim=2)
    full_v = torch.cat([pv.repeat_interleave(n, 0), sv], dim=2)
    want, _ = sdpa_attention_forward(module, q, full_k, full_v, mask, scaling=d**-0.5)
    sk.shared_prefix = (pk, pv, n)
    got, _ = shared_prefix_attention(module, q, sk, sv, mask, scaling=d**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # same maths, another summation order
    del sk.shared_prefix
    plain, _ = shared_prefix_attention(module, q, full_k, full_v, mask, scaling=d**-0.5)  # no prefix: SDPA
    torch.testing.assert_close(plain, want, rtol=0, atol=0)


def _ckpt_with_generation_config(src, dst, **fields):
    import json
    import shutil

    shutil.copytree(src, dst)
    gen = json.loads((dst / "generation_config.json").read_text())
    (dst / "generation_config.json").write_text(json.dumps(gen | fields))
    return dst


def test_checkpoint_generation_settings_do_not_leak_into_sampling(tiny_ckpt, synth_data, tmp_path):
    """Qwen2.5-style checkpoints ship sampling settings; transformers' generate() would run them before our
    sampler and recorder, so samples and recorded log-probs would not be the policy's (gap 0.32 before)."""
    proc = OmniProcessor.from_pretrained(tiny_ckpt)
    ckpt = _ckpt_with_generation_config(tiny_ckpt, tmp_path / "ckpt", repetition_penalty=1.3, no_repeat_ngram_size=2,
                                        suppress_tokens=[5, 6, 7], min_new_tokens=4, temperature=0.3, top_k=3)
    model = load_policy(ckpt, "float32")
    assert model.generation_config.repetition_penalty == 1.3  # the checkpoint really carries them
    engine = HFEngine(model, proc.tokenizer)
    recs = load_records(synth_data / "train.json").records
    inputs = [proc.process(r) for r in recs[:2]]
    groups = engine.generate(inputs, SamplingParams(n=4, max_new_tokens=12, seed=3, temperature=0.9, logprobs=True))
    comps = [c.token_ids for g in groups for c in g]
    with torch.no_grad():
        lp, _, _ = model.completion_logprobs(inputs, [i for i in range(2) for _ in range(4)], comps, temperature=0.9)
    gap = max((torch.tensor(c.logprobs) - lp[r, : len(c.token_ids)]).abs().max().item()
              for r, c in enumerate(c for g in groups for c in g) if c.token_ids)
    assert gap < 1e-4, gap
    # The same samples as from the same weights under a clean generation_config.
    clean = HFEngine(load_policy(tiny_ckpt, "float32"), proc.tokenizer)
    again = clean.generate(inputs, SamplingParams(n=4, max_new_tokens=12, seed=3, temperature=0.9))
    assert [c.token_ids for g in again for c in g] == comps


def test_min_new_tokens_is_named_in_config_and_recorded_as_sampled(tiny_ckpt, synth_data):
    """rollout.min_new_tokens masks stop and pad ids; the recorded log-probs are those of the masked
    distribution the tokens were drawn from (they sum to a log-prob over the allowed tokens only)."""
    proc = OmniProcessor.from_pretrained(tiny_ckpt)
    engine = HFEngine(load_policy(tiny_ckpt, "float32"), proc.tokenizer)
    inp = proc.process(load_records(synth_data / "train.json").records[0])
    out = engine.generate([inp], SamplingParams(n=4, max_new_tokens=7, min_new_tokens=7, seed=2, logprobs=True))[0]
    assert all(len(c.token_ids) == 7 and c.finish_reason == "length" for c in out)
    banned = engine.eos_ids | {engine.pad_id}
    assert not any(t in banned for c in out for t in c.token_ids)


def test_every_eos_the_checkpoint_lists_stops_generation(tiny_ckpt, synth_data, tmp_path):
    """Qwen2.5 lists <|im_end|> and <|endoftext|>; rollout.stop_on_checkpoint_eos honours the list."""
    proc = OmniProcessor.from_pretrained(tiny_ckpt)
    inp = proc.process(load_records(synth_data / "train.json").records[0])
    greedy = SamplingParams(n=1, greedy=True, max_new_tokens=10)
    plain = HFEngine(load_policy(tiny_ckpt, "float32"), proc.tokenizer).generate([inp], greedy)[0][0].token_ids
    assert len(plain) >= 3
    extra = plain[2]
    eos = proc.tokenizer.eos_token_id
    ckpt = _ckpt_with_generation_config(tiny_ckpt, tmp_path / "ckpt", eos_token_id=[eos, extra])
    stopped = HFEngine(load_policy(ckpt, "float32"), proc.tokenizer).generate([inp], greedy)[0][0]
    cut = plain.index(extra) + 1
    assert stopped.token_ids == plain[:cut] and stopped.finish_reason == "stop"
    ignored = HFEngine(load_policy(ckpt, "float32"), proc.tokenizer, stop_on_checkpoint_eos=False)
    assert ignored.generate([inp], greedy)[0][0].token_ids == plain


def test_shared_prefix_attention_in_bf16_is_as_accurate_as_sdpa():
    """bf16 caches: scores over a 1,000-token prefix formed in bf16 were 2.5x further from the exact result
    than SDPA's (0.17 vs 0.068); formed in fp32 they are no worse than SDPA's."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from r1omni_ray.engines.shared_prefix import shared_prefix_attention

    g = torch.Generator().manual_seed(1)
    prompts, n, heads, kv_heads, d, plen, slen = 2, 4, 4, 2, 64, 1000, 8
    rows = prompts * n

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 2).to(torch.bfloat16)

    q, pk, pv = rnd(rows, heads, 1, d), rnd(prompts, kv_heads, plen, d), rnd(prompts, kv_heads, plen, d)
    sk, sv = rnd(rows, kv_heads, slen, d), rnd(rows, kv_heads, slen, d)
    mask = torch.ones(rows, 1, 1, plen + slen, dtype=torch.bool)
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    full_k = torch.cat([pk.repeat_interleave(n, 0), sk], dim=2)
    full_v = torch.cat([pv.repeat_interleave(n, 0), sv], dim=2)
    exact, _ = sdpa_attention_forward(module, q.double(), full_k.double(), full_v.double(), mask, scaling=d**-0.5)
    sdpa, _ = sdpa_attention_forward(module, q, full_k, full_v, mask, scaling=d**-0.5)
    sk.shared_prefix = (pk, pv, n)
    ours, _ = shared_prefix_attention(module, q, sk, sv, mask, scaling=d**-0.5)
    assert ours.dtype == torch.bfloat16
    err_ours = (ours.double() - exact).abs().max().item()
    err_sdpa = (sdpa.double() - exact).abs().max().item()
    assert err_ours <= err_sdpa * 1.05, (err_ours, err_sdpa)
