"""The rollout-engine interface shared by the transformers (CPU/GPU) and vLLM (GPU) engines."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from r1omni_ray.model.modeling import MMPrompt
from r1omni_ray.weight_broadcast import ACTORS, ENGINES

# The Qwen2 LM's own parameters, by allow-list: what a plain Qwen2 checkpoint (and vLLM's Qwen2 model)
# has. Everything else is the multimodal front end, whatever new module it grows.
_LM_PARAM = re.compile(r"^(model\.(embed_tokens|norm)\.|model\.layers\.\d+\.|lm_head\.)")


@dataclass(frozen=True)
class SamplingParams:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    greedy: bool = False
    seed: int | None = None  # the step's seed (step_seed); each sample derives its own (sample_seed)
    logprobs: bool = False  # return each sampled token's log-prob (rollout.sampling_logprobs)
    min_new_tokens: int = 0  # no stop (or pad) token before this many new tokens (rollout.min_new_tokens)


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (eos) or "length"
    logprobs: list[float] | None = None  # each sampled token's log-prob, when SamplingParams.logprobs


class RolloutEngine(Protocol):
    """What a rollout worker asks of its engine (HFEngine, VLLMEngine). A vLLM engine also owns processes
    that join the weight broadcast (VLLMEngine.engine_ranks / join_sync / receive)."""

    def generate(self, prompts: Sequence[MMPrompt], params: SamplingParams,
                 uids: Sequence[int] | None = None) -> list[list[Completion]]:
        """params.n completions for each prompt; sample j of prompt uid is drawn with sample_seed(params.seed,
        uid, j) (uids default to the prompts' positions)."""
        ...

    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Copy new weights (HF parameter names) into the engine."""
        ...

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The engine's current weights under HF names (for checks)."""
        ...


def stop_token_ids(tokenizer: Any, generation_config: Any | None, use_checkpoint_eos: bool) -> set[int]:
    """The ids that end a completion, the same in every engine: the tokenizer's eos, plus the eos ids the
    checkpoint's generation_config lists when rollout.stop_on_checkpoint_eos (one id or a list)."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    listed = getattr(generation_config, "eos_token_id", None) if use_checkpoint_eos else None
    if listed is not None:
        ids |= {int(t) for t in ([listed] if isinstance(listed, int) else listed)}
    if not ids:
        raise ValueError("no stop token: the tokenizer has no eos_token_id and the checkpoint lists none")
    return ids


def is_lm_param(name: str) -> bool:
    return _LM_PARAM.match(name) is not None


TOKEN_EMBEDDING = "model.embed_tokens.weight"


def sync_destinations(name: str, engine: str) -> tuple[str, ...]:
    """Where a learner tensor goes in a weight update (weight_sync.ACTORS / ENGINES). The hf engine holds the
    whole model in the rollout actor. With vLLM the vLLM workers hold the LM and the actor the multimodal
    front end, which needs the token embedding too (it embeds the prompt's text): that one tensor goes to both."""
    if engine != "vllm":
        return (ACTORS,)
    if name == TOKEN_EMBEDDING:
        return (ACTORS, ENGINES)
    return (ENGINES,) if is_lm_param(name) else (ACTORS,)


def step_seed(run_seed: int, step: int) -> int:
    """The sampling seed of one training step (what SamplingParams.seed carries)."""
    return int(np.random.SeedSequence([run_seed, step]).generate_state(1, np.uint64)[0] >> 1)


def sample_seed(seed: int, uid: int, index: int) -> int:
    """A seed of its own for sample ``index`` of prompt ``uid`` under the step seed ``seed``, in both engines.
    (vLLM's n samples of one request draw seed, seed+1, ...: every prompt of a step would share them, and
    step s+1's sample j would repeat step s's sample j+1.)"""
    return int(np.random.SeedSequence([seed, uid, index]).generate_state(1, np.uint64)[0] >> 1)


def trim_at_eos(ids: Sequence[int], eos_ids: set[int], pad_id: int | None) -> tuple[list[int], str]:
    """Cut a generated row after the first eos (kept, so the learner trains the stop), drop padding."""
    out: list[int] = []
    for t in ids:
        out.append(int(t))
        if int(t) in eos_ids:
            return out, "stop"
    while out and pad_id is not None and out[-1] == pad_id and pad_id not in eos_ids:
        out.pop()
    return out, "length"
