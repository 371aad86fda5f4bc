"""Rollout engine on vLLM (GPU, the V1 engine). Imported only when `rollout.engine: vllm` is selected.

Written against the source of the vLLM the `gpu` extra pins (VLLM_SUPPORTED; read from the 0.33.0 wheel):
`LLM(enable_prompt_embeds=True, worker_extension_cls=..., max_model_len=...)`, `{"prompt_embeds": tensor}`
prompts (vllm/inputs/llm.py EmbedsPrompt), `LLM.collective_rpc` (vllm/entrypoints/llm.py: arguments
cross to the engine-core process as msgpack, so only plain values go through it), the worker extension
mixed into each GPU worker (vllm/v1/worker/worker_base.py: it sees `self.rank`, `self.device`,
`self.model_runner.get_model()`), Qwen2's `load_weights` (which shards for tensor parallelism) and
`LLM.reset_prefix_cache`.

vLLM serves the Qwen2 LM only; the rollout actor keeps the multimodal front end (SigLIP, Whisper,
projectors, BERT gate, the token embedding) and hands vLLM prompt embeddings. Weights: every vLLM worker
(each tensor-parallel rank) joins the weight-broadcast group as a rank of its own and receives the
buckets there, loading the LM's tensors; the actor itself is one more rank and keeps the front end's.
Only names, dtypes, shapes and the group's address go through collective_rpc.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from r1omni_ray.engines.base import (
    Completion,
    SamplingParams,
    is_lm_param,
    sample_seed,
    stop_token_ids,
    trim_at_eos,
)
from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM, MMPrompt
from r1omni_ray.weight_sync import BroadcastGroup, ParamMeta, receive_buckets

VLLM_SUPPORTED = ">=0.33,<0.34"  # the gpu extra's range: every API above exists there as used
EMBED_CHUNK = 8  # prompts embedded at a time: SigLIP over 8 frames keeps every hidden state


def split_lm_weights(
    named: Sequence[tuple[str, torch.Tensor]],
) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """(Qwen2 LM tensors, by allow-list; multimodal front-end tensors)."""
    lm, mm = [], []
    for name, t in named:
        (lm if is_lm_param(name) else mm).append((name, t))
    return lm, mm


def sampling_kwargs(params: SamplingParams, seed: int | None = None,
                    stop_token_ids: Sequence[int] = ()) -> dict[str, Any]:
    """Arguments for one vllm.SamplingParams of ONE sample (n=1, its own seed: see sample_seed);
    logprobs=0 returns the sampled token's log-prob, None none."""
    lp = 0 if params.logprobs else None
    stop = list(stop_token_ids) or None
    if params.greedy:
        return dict(n=1, temperature=0.0, max_tokens=params.max_new_tokens, logprobs=lp, seed=seed,
                    stop_token_ids=stop, min_tokens=params.min_new_tokens)
    return dict(n=1, temperature=params.temperature, top_p=params.top_p, top_k=-1,
                max_tokens=params.max_new_tokens, logprobs=lp, seed=seed, stop_token_ids=stop,
                min_tokens=params.min_new_tokens)


def sample_plan(num_prompts: int, params: SamplingParams, uids: Sequence[int]) -> list[tuple[int, int | None]]:
    """(prompt index, seed) of every request, prompt-major: one request per sample."""
    n = 1 if params.greedy else params.n
    base = params.seed if params.seed is not None else 0
    return [(i, None if params.greedy else sample_seed(base, uids[i], j)) for i in range(num_prompts) for j in range(n)]


def build_requests(prompt_embeds: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """vLLM prompts; embeddings go to CPU in the LM dtype (vLLM moves them)."""
    return [{"prompt_embeds": e.detach().to("cpu")} for e in prompt_embeds]


def generation_config_for(tokenizer) -> dict[str, Any]:
    """Stop on the tokenizer's eos only, with its pad as pad: without this file vLLM derives one from
    config.json, which for a Qwen2.5 base can also stop on <|endoftext|> (the pad)."""
    return {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id}


def export_lm_dir(model: HumanOmniQwen2ForCausalLM, tokenizer, out_dir: str | Path) -> Path:
    """Write a plain Qwen2 checkpoint (config + LM weights + tokenizer + generation_config) that vLLM loads."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    drop = {
        "mm_vision_tower", "mm_audio_tower", "text_model_path", "vision_config", "audio_config",
        "bert_config", "auto_map",
    }
    cfg = {k: v for k, v in cfg.items() if k not in drop and not k.startswith(("mm_", "audio_"))}
    cfg["model_type"] = "qwen2"
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    (out / "generation_config.json").write_text(json.dumps(generation_config_for(tokenizer), indent=2))
    lm = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if is_lm_param(k)}
    if cfg.get("tie_word_embeddings"):
        lm.pop("lm_head.weight", None)
    save_file(lm, str(out / "model.safetensors"))
    tokenizer.save_pretrained(out)
    return out


def plain_metas(metas: Sequence[ParamMeta]) -> list[list[Any]]:
    """ParamMetas as msgpack-safe lists (collective_rpc decodes utility arguments without types)."""
    return [[m.name, list(m.shape), m.dtype] for m in metas]


def metas_from_plain(rows: Sequence[Sequence[Any]]) -> list[ParamMeta]:
    return [ParamMeta(str(n), tuple(int(x) for x in shape), str(dtype)) for n, shape, dtype in rows]


class BroadcastReceiverExtension:
    """vLLM worker extension (`worker_extension_cls`), mixed into every vLLM GPU worker: each tensor-parallel
    rank joins the weight-broadcast group and loads the LM's tensors itself (Qwen2.load_weights shards them)."""

    def r1omni_join(self, backend: str, host: str, port: int, first_rank: int, world_size: int,
                    timeout_s: float) -> int:
        rank = first_rank + int(self.rank)  # type: ignore[attr-defined]  # this engine's TP rank
        self.r1omni_group = BroadcastGroup(backend, host, port, rank, world_size, timeout_s, name=f"vllm-rank-{rank}")
        return rank

    def r1omni_receive(self, metas: list[list[Any]], buckets: list[list[int]]) -> int:
        model = self.model_runner.get_model()  # type: ignore[attr-defined]

        def load(named: list[tuple[str, torch.Tensor]]) -> None:
            lm = [(n, t) for n, t in named if is_lm_param(n)]
            if lm:
                model.load_weights(weights=lm)

        device = self.device if self.r1omni_group.backend == "nccl" else "cpu"  # type: ignore[attr-defined]
        return receive_buckets(self.r1omni_group, metas_from_plain(metas), buckets, load, device)


def _run_beside(fn: Callable[[], Any], rpc: Callable[[], Any]) -> Any:
    """Run ``rpc`` (a collective_rpc into the vLLM workers) in a thread while this process does ``fn``: both
    are ranks of one collective, so neither may wait for the other to finish first."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["out"] = rpc()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["err"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        t.join()
    if "err" in box:
        raise box["err"]
    return out


class VLLMEngine:
    def __init__(
        self,
        model: HumanOmniQwen2ForCausalLM,
        tokenizer,
        work_dir: str | Path,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.6,
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        stop_on_checkpoint_eos: bool = True,
    ) -> None:
        import vllm  # noqa: PLC0415  (GPU extra; imported only when selected)

        self.tokenizer = tokenizer
        self.eos_ids = stop_token_ids(tokenizer, model.generation_config, stop_on_checkpoint_eos)
        self.pad_id = tokenizer.pad_token_id
        self.tp = tensor_parallel_size
        lm_dir = export_lm_dir(model, tokenizer, Path(work_dir) / f"vllm_lm_{os.getpid()}")
        # The front end needs the token embedding but not the decoder stack, which vLLM holds: drop it before
        # vLLM measures free GPU memory.
        model.model.layers = torch.nn.ModuleList()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        kwargs: dict[str, Any] = dict(
            model=str(lm_dir), tensor_parallel_size=tensor_parallel_size, dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization, enable_prompt_embeds=True,
            worker_extension_cls=f"{__name__}.BroadcastReceiverExtension",
        )
        if max_model_len is not None:  # else vLLM takes the model's own limit
            kwargs["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**kwargs)
        self._vllm = vllm
        self.frontend = model.eval()
        self._params = dict(self.frontend.named_parameters())

    # ---- sampling ----
    @torch.no_grad()
    def generate(self, prompts: Sequence[MMPrompt], params: SamplingParams,
                 uids: Sequence[int] | None = None) -> list[list[Completion]]:
        uids = list(range(len(prompts))) if uids is None else list(uids)
        embeds: list[torch.Tensor] = []
        for start in range(0, len(prompts), EMBED_CHUNK):  # bounded activation memory beside vLLM's pool
            embeds += [e.cpu() for e in self.frontend.embed_prompts(prompts[start : start + EMBED_CHUNK])]
        plan = sample_plan(len(prompts), params, uids)
        requests = build_requests([embeds[i] for i, _ in plan])
        sps = [self._vllm.SamplingParams(**sampling_kwargs(params, seed, sorted(self.eos_ids))) for _, seed in plan]
        outs = self.llm.generate(requests, sps, use_tqdm=False)
        groups: list[list[Completion]] = [[] for _ in prompts]
        for (i, _), o in zip(plan, outs, strict=True):
            c = o.outputs[0]
            ids, reason = trim_at_eos(list(c.token_ids), self.eos_ids, self.pad_id)
            lps = [next(iter(d.values())).logprob for d in (c.logprobs or [])][: len(ids)] if params.logprobs else None
            text = self.tokenizer.decode([t for t in ids if t not in self.eos_ids], skip_special_tokens=True)
            groups[i].append(Completion(ids, text, reason, lps))
        return groups

    # ---- weights ----
    def extra_sync_ranks(self) -> int:
        """Ranks this engine adds to the broadcast group beside the actor's own: one per vLLM worker."""
        return self.tp

    def join_sync(self, join_own: Callable[[], Any], backend: str, host: str, port: int, first_rank: int,
                  world_size: int, timeout_s: float) -> None:
        """The actor joins (``join_own``) while the vLLM workers join as ranks first_rank..first_rank+TP-1."""
        _run_beside(join_own, lambda: self.llm.collective_rpc(
            "r1omni_join", args=(backend, host, port, first_rank, world_size, timeout_s)))

    def receive(self, receive_own: Callable[[], Any], metas: Sequence[ParamMeta], buckets: list[list[int]]) -> None:
        """The actor receives the front end's tensors while every vLLM worker receives the LM's; then the
        prefix cache is reset: prompt_embeds prefixes are keyed by the embedding bytes, and the shared
        prompt rows barely move at lr 1e-6, so later steps would reuse attention states of old weights."""
        _run_beside(receive_own, lambda: self.llm.collective_rpc("r1omni_receive", args=(plain_metas(metas), buckets)))
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """The actor's share of an update: the front end and the token embedding (the rest is vLLM's)."""
        for name, t in named:
            p = self._params.get(name)
            if p is not None:
                p.copy_(t)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The actor's own weights (front end + token embedding); the LM's live in the vLLM workers."""
        return {k: v.detach() for k, v in self.frontend.state_dict().items()}
