"""The rollout-engine interface shared by the transformers (CPU/GPU) and vLLM (GPU) engines."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from r1omni_ray.model.modeling import MMPrompt

# Parameter-name prefixes of the multimodal front end (everything that is not the Qwen2 LM).
MM_PREFIXES = (
    "model.vision_tower.", "model.audio_tower.", "model.mm_projector.", "model.audio_projector.",
    "model.bert_model.", "model.bert_gate.",
)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    greedy: bool = False
    seed: int | None = None
    logprobs: bool = False  # return each sampled token's log-prob (rollout.sampling_logprobs)


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (eos) or "length"
    logprobs: list[float] | None = None  # each sampled token's log-prob, when SamplingParams.logprobs


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[MMPrompt], params: SamplingParams) -> list[list[Completion]]:
        """params.n completions for each prompt."""
        ...

    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Copy new weights (HF parameter names) into the engine."""
        ...

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The engine's current weights under HF names (for checks)."""
        ...


def is_lm_param(name: str) -> bool:
    return not name.startswith(MM_PREFIXES)


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
