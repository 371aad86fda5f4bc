"""vLLM rollouts of the Qwen2.5-Omni thinker, for real on vLLM's CPU build: the rollout worker's tower outputs
and TMRoPE positions go in with the prompt's token ids (engines/vllm_mrope_lm.py, registered by the project's
vLLM plugin); greedy tokens and log-probs equal the transformers engine's and the learners' forward; the
positions vLLM's model runner feeds its layers, prompt and decode steps, are read back and equal ours; a weight
update reaches vLLM's LM. One engine serves the module.

The tiny thinker's LM weights are spread out (as in test_vllm_cpu.py): the random init's log-probs are nearly
flat, which would let wrong positions pass within the tolerance."""

from __future__ import annotations

import copy
import os
from dataclasses import replace

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


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(checkpoint, processor, prompts): audio interleaved in the video, a separate wav, video only, audio only."""
    from r1omni_ray.data.qwen_omni_processor import QwenOmniProcessor
    from r1omni_ray.data.records import OmniRecord
    from r1omni_ray.tiny.qwen_omni import make_tiny_qwen_omni_checkpoint
    from tests.reference.qwen_omni.make_reference import HERE as CLIPS

    ckpt = make_tiny_qwen_omni_checkpoint(tmp_path_factory.mktemp("vllm_qomni") / "full", layout="full")
    spread_weights(ckpt, prefix="thinker.")
    proc = QwenOmniProcessor.from_pretrained(ckpt)
    clip, short, wav = (str(CLIPS / n) for n in ("talk_4s.mp4", "short_1500ms.mp4", "voice.wav"))

    def rec(i: str, video: str | None, audio: str | None) -> OmniRecord:
        return OmniRecord(id=i, video=video, audio=audio, question="which emotion?", label="happy", solution="")

    proc.use_audio_in_video = True
    prompts = [proc.process(rec("a", clip, clip))]
    proc.use_audio_in_video = False
    prompts += [proc.process(r) for r in (rec("b", short, wav), rec("c", short, None), rec("d", None, wav))]
    return ckpt, proc, prompts


@pytest.fixture(scope="module")
def engine(world, tmp_path_factory):
    from r1omni_ray.engines.vllm_engine import VLLMEngine, export_key
    from r1omni_ray.model.qwen_omni import load_qwen_omni

    ckpt, proc, _ = world
    # Lets collective_rpc carry a function (the position probe below) to the worker; read by the processes
    # vLLM starts now, and by this one when it sends.
    before = os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    eng = VLLMEngine(load_qwen_omni(ckpt, "float32").eval(), proc.tokenizer, tmp_path_factory.mktemp("export"),
                     dtype="float32", max_model_len=2048, export_key=export_key(ckpt))
    # The actor keeps the towers and the token embedding only; vLLM holds the decoder.
    assert not any(n.startswith(("model.layers.", "model.norm.")) for n in eng.named_tensors())
    assert any(n.startswith("visual.") for n in eng.named_tensors())
    yield eng
    eng.close()
    if before is None:
        os.environ.pop("VLLM_ALLOW_INSECURE_SERIALIZATION")
    else:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = before


def worst_gap(groups, reference: list[torch.Tensor]) -> float:
    got = [torch.tensor(c.logprobs) for g in groups for c in g]
    return max((a - b.float()).abs().max().item() for a, b in zip(got, reference, strict=True))


def test_greedy_tokens_and_log_probs_equal_the_transformers_engine_and_the_learner(world, engine):
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.engines.hf_engine import HFEngine
    from r1omni_ray.model.qwen_omni import load_qwen_omni

    ckpt, proc, prompts = world
    policy = load_qwen_omni(ckpt, "float32").eval()
    for n in (12, 1):  # and 1-token completions
        params = SamplingParams(greedy=True, max_new_tokens=n, logprobs=True)
        got = engine.generate(prompts, params)
        hf = HFEngine(policy, proc.tokenizer).generate(prompts, params)
        assert [g[0].token_ids for g in got] == [g[0].token_ids for g in hf]
        assert len({tuple(g[0].token_ids) for g in got}) > 1  # outputs depend on the prompt
        assert worst_gap(got, learner_logprobs(policy, prompts, got)) <= LOGPROB_ATOL
        assert worst_gap(got, [torch.tensor(g[0].logprobs) for g in hf]) <= LOGPROB_ATOL


def test_positions_vllm_feeds_its_layers_are_ours_in_the_prompt_and_every_decode_step(world, engine):
    """The positions vLLM's model runner passes to the model's forward, read back from the worker, for one
    request at a time: the prompt's [3, L] TMRoPE positions, then one past the prompt's largest position on
    every axis and counting (model/decode_positions.next_positions, what the learners train with)."""
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.model.decode_positions import next_positions

    def install(worker) -> None:
        model = worker.model_runner.get_model()
        if not hasattr(model, "r1omni_seen"):
            forward = model.forward
            model.r1omni_seen = []

            def recording(input_ids, positions, *args, **kwargs):
                model.r1omni_seen.append(positions.detach().cpu().clone())
                return forward(input_ids, positions, *args, **kwargs)

            model.forward = recording
        model.r1omni_seen.clear()

    def collect(worker) -> list:
        return [p.tolist() for p in worker.model_runner.get_model().r1omni_seen]

    _, _, prompts = world
    n = 6
    assert not engine.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching  # on CPU: whole prefills
    for p in prompts:
        engine.llm.collective_rpc(install)
        engine.generate([p], SamplingParams(greedy=True, max_new_tokens=n, min_new_tokens=n))
        fed = torch.cat([torch.tensor(x) for x in engine.llm.collective_rpc(collect)[0]], dim=1)
        start = next_positions([p.positions])[0]
        want = torch.cat([p.positions, (start + torch.arange(n - 1)).expand(3, -1)], dim=1)
        assert torch.equal(fed, want), (p.record_id, tuple(fed.shape), tuple(want.shape))
    # Video makes them really TMRoPE (audio alone counts on like text).
    assert sum(not torch.equal(p.positions, torch.arange(len(p.prompt_ids)).expand(3, -1)) for p in prompts) == 3


def test_seeded_samples_log_probs_equal_the_learners_and_do_not_depend_on_the_batch(world, engine):
    """G seeded samples per prompt at temperature 1 (the rollout's setting): vLLM's sampling log-probs equal
    the learner's forward, and each sample is the same drawn alone or with the others."""
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.model.qwen_omni import load_qwen_omni

    ckpt, _, prompts = world
    params = SamplingParams(n=4, max_new_tokens=8, logprobs=True, seed=7)
    got = engine.generate(prompts, params, uids=[10, 11, 12, 13])
    assert worst_gap(got, learner_logprobs(load_qwen_omni(ckpt, "float32").eval(), prompts, got)) <= LOGPROB_ATOL
    assert len({tuple(c.token_ids) for g in got for c in g}) > len(prompts)  # samples differ
    alone = engine.generate(prompts[2:3], params, uids=[12])
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in got[2]]


def test_text_positions_would_be_wrong_so_the_shipped_ones_are_what_matches(world, engine):
    """The same requests with 0..L-1 on every axis (what vLLM gives a prompt-embeds request) drift from the
    learner by far more than the tolerance: the match above rests on the shipped positions."""
    from r1omni_ray.engines import vllm_mrope_request as req
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.model.qwen_omni import load_qwen_omni

    ckpt, _, prompts = world
    flat = [replace(p, positions=torch.arange(len(p.prompt_ids)).expand(3, -1).clone()) for p in prompts]
    got = engine.generate(flat, SamplingParams(greedy=True, max_new_tokens=4, logprobs=True))
    policy = load_qwen_omni(ckpt, "float32").eval()
    assert worst_gap(got, learner_logprobs(policy, prompts, got)) > 100 * LOGPROB_ATOL
    assert req.ARCHITECTURE in engine.llm.llm_engine.model_config.architectures


def test_a_weight_update_reaches_vllms_lm_and_the_actors_towers(world, engine):
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.engines.hf_engine import HFEngine
    from r1omni_ray.model.qwen_omni import load_qwen_omni

    ckpt, proc, prompts = world
    params = SamplingParams(greedy=True, max_new_tokens=8, logprobs=True)
    before = engine.generate(prompts, params)
    new = copy.deepcopy(load_qwen_omni(ckpt, "float32").eval())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if name.startswith(("model.layers.", "visual.merger.")) or name == "model.embed_tokens.weight":
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    got = push_weights(engine, [(n, p.detach()) for n, p in new.named_parameters()], 1 << 14)
    lm = sum(p.numel() * 4 for n, p in new.named_parameters() if n.startswith(("model.", "lm_head.")))
    assert got["engines"] == [lm]
    after = engine.generate(prompts, params)
    assert [g[0].token_ids for g in after] != [g[0].token_ids for g in before]
    hf = HFEngine(new, proc.tokenizer).generate(prompts, params)
    assert [g[0].token_ids for g in after] == [g[0].token_ids for g in hf]
    assert worst_gap(after, learner_logprobs(new, prompts, after)) <= LOGPROB_ATOL
