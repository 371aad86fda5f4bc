"""Rollout engine on vLLM (GPU). Imported only when `rollout.engine: vllm` is selected.

vLLM serves the Qwen2 LM only; the worker's own copy of the multimodal front end (SigLIP, Whisper,
projectors, BERT gate) turns each prompt into embeddings that vLLM consumes as `prompt_embeds`
(`LLM(..., enable_prompt_embeds=True)`). Weight updates are split: LM tensors go to vLLM's
`load_weights` through a worker extension (every tensor-parallel rank loads its shard), front-end
tensors are copied into the local module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from r1omni_ray.engines.base import Completion, SamplingParams, is_lm_param, trim_at_eos
from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM, MMPrompt


def split_lm_weights(
    named: Sequence[tuple[str, torch.Tensor]],
) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """(Qwen2 LM tensors under vLLM's Qwen2 names, multimodal front-end tensors under HF names)."""
    lm, mm = [], []
    for name, t in named:
        (lm if is_lm_param(name) else mm).append((name, t))
    return lm, mm


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Arguments for vllm.SamplingParams; logprobs=0 returns the sampled token's log-prob, None none."""
    lp = 0 if params.logprobs else None
    if params.greedy:
        return dict(n=1, temperature=0.0, max_tokens=params.max_new_tokens, logprobs=lp, seed=params.seed)
    return dict(
        n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=-1,
        max_tokens=params.max_new_tokens, logprobs=lp, seed=params.seed,
    )


def build_requests(prompt_embeds: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One vLLM prompt per sample; embeddings go to CPU in the LM dtype (vLLM moves them)."""
    return [{"prompt_embeds": e.detach().to("cpu")} for e in prompt_embeds]


def export_lm_dir(model: HumanOmniQwen2ForCausalLM, tokenizer, out_dir: str | Path) -> Path:
    """Write a plain Qwen2 checkpoint (config + LM weights + tokenizer) that vLLM can load."""
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
    lm = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if is_lm_param(k)}
    if cfg.get("tie_word_embeddings"):
        lm.pop("lm_head.weight", None)
    save_file(lm, str(out / "model.safetensors"))
    tokenizer.save_pretrained(out)
    return out


class WeightLoaderExtension:
    """vLLM worker extension (`worker_extension_cls`): runs inside each vLLM worker process."""

    def r1omni_load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        device = next(self.model_runner.model.parameters()).device  # type: ignore[attr-defined]
        self.model_runner.model.load_weights(  # type: ignore[attr-defined]
            weights=[(n, t.to(device)) for n, t in named]
        )


class VLLMEngine:
    def __init__(
        self,
        model: HumanOmniQwen2ForCausalLM,
        tokenizer,
        work_dir: str | Path,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.6,
        dtype: str = "bfloat16",
        max_model_len: int = 4096,
    ) -> None:
        import vllm  # noqa: PLC0415  (GPU extra; imported only when selected)

        self.frontend = model.eval()
        self.tokenizer = tokenizer
        self.eos_ids = {tokenizer.eos_token_id}
        self.pad_id = tokenizer.pad_token_id
        lm_dir = export_lm_dir(model, tokenizer, Path(work_dir) / f"vllm_lm_{os.getpid()}")
        self.llm = vllm.LLM(
            model=str(lm_dir), tensor_parallel_size=tensor_parallel_size, dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization, enable_prompt_embeds=True,
            max_model_len=max_model_len, worker_extension_cls=f"{__name__}.WeightLoaderExtension",
        )
        self._vllm = vllm
        self._params = dict(self.frontend.named_parameters())

    @torch.no_grad()
    def generate(self, prompts: Sequence[MMPrompt], params: SamplingParams) -> list[list[Completion]]:
        embeds = self.frontend.embed_prompts(prompts)
        sp = self._vllm.SamplingParams(**sampling_kwargs(params))
        outs = self.llm.generate(build_requests(embeds), sp, use_tqdm=False)
        groups = []
        for o in outs:
            group = []
            for c in o.outputs:
                ids, reason = trim_at_eos(list(c.token_ids), self.eos_ids, self.pad_id)
                lps = [next(iter(d.values())).logprob for d in (c.logprobs or [])][: len(ids)]
                text = self.tokenizer.decode([t for t in ids if t not in self.eos_ids], skip_special_tokens=True)
                group.append(Completion(ids, text, reason, lps if params.logprobs else None))
            groups.append(group)
        return groups

    @torch.no_grad()
    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        lm, mm = split_lm_weights(named)
        for name, t in mm:
            self._params[name].copy_(t)
        for name, t in lm:  # the front end embeds prompt text tokens too
            if name in self._params:
                self._params[name].copy_(t)
        if lm:
            self.llm.collective_rpc("r1omni_load_weights", args=([(n, t.cpu()) for n, t in lm],))

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.frontend.state_dict().items()}
