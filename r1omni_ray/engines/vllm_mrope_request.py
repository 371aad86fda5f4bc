"""Requests for engines/vllm_mrope_lm.py (the vLLM model of M-RoPE policies), built in the rollout worker. No vLLM
import here: the rollout worker and the unit tests use it without one."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

ARCHITECTURE = "R1OmniMRoPEQwen2ForCausalLM"  # the name the plugin registers (engines/vllm_plugin.py)
MODALITY = "omni"  # one item per prompt: all its media, in prompt order
EMBEDS = "r1omni_embeds"  # [N, H]: the rows of the prompt's embeddings at its N media placeholder tokens
POSITIONS = "r1omni_positions"  # [3, L]: the prompt's TMRoPE positions
MEDIA_TOKENS_KEY = "r1omni_media_token_ids"  # in the exported config.json: which ids are media placeholders


def media_mask(ids: list[int], media: Iterable[int]) -> torch.Tensor:
    """Which of the prompt's tokens are media placeholders."""
    media = set(media)
    return torch.tensor([t in media for t in ids], dtype=torch.bool)


def media_span(ids: list[int], media: Iterable[int]) -> tuple[int, torch.Tensor]:
    """(offset, is_embed) of the placeholder range from the first media token to the last: vLLM scatters the
    item's rows over the positions where is_embed is set, and embeds the text in between itself."""
    mask = media_mask(ids, media)
    where = mask.nonzero().flatten()
    if where.numel() == 0:
        raise ValueError("a media item for a prompt without media placeholder tokens")
    first, last = int(where[0]), int(where[-1])
    return first, mask[first : last + 1].clone()


def mrope_request(ids: list[int], embeds: torch.Tensor, positions: torch.Tensor, media: Iterable[int]
                  ) -> dict[str, Any]:
    """One vLLM prompt: the token ids, and (if it has media) the media rows of its embeddings with its positions.
    A text-only prompt is plain token ids: vLLM then counts 0..L-1 on every axis, which is what its positions are."""
    mask = media_mask(ids, media)
    if tuple(positions.shape) != (3, len(ids)):
        raise ValueError(f"positions {tuple(positions.shape)} do not fit a {len(ids)}-token prompt")
    if not bool(mask.any()):
        return {"prompt_token_ids": list(ids)}
    rows = embeds.detach()[mask.to(embeds.device)].to("cpu")
    pos = positions.detach().to("cpu", torch.int64)
    return {"prompt_token_ids": list(ids), "multi_modal_data": {MODALITY: {EMBEDS: rows[None], POSITIONS: pos[None]}}}
