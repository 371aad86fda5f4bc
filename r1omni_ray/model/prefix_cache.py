"""KV caches of the learner's shared-prefix training forward (each prompt through the LM once, its keys and
values then serving all its completions), safe under gradient checkpointing.

A checkpointed layer runs again during backward with the same arguments, cache included. transformers drops
the cache of a checkpointed layer unless the layer says it may keep it (`_can_checkpoint_with_cache`),
because a cache that appends on every call would be written a second time by the replay. These caches
never change after their first write, so a replay sees what the first run saw:
- the prompt pass writes each layer's keys/values once; a replay gets its own, freshly computed ones back;
- the completion pass reads the prompts' keys/values (gathered per completion) and appends nothing.
Owns nothing else: the decoding cache of the rollout engine is engines/shared_prefix.py.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer


class _WriteOnceLayer(DynamicLayer):
    """The prompt pass: stores the first keys/values it is given; a replay's are returned unstored."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.is_initialized:
            return key_states, value_states
        return super().update(key_states, value_states, *args, **kwargs)


class _ReadOnlyPrefixLayer(DynamicLayer):
    """The completion pass: the prompt's keys/values ([completions, kv_heads, P, d]) before each query's own."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def prompt_cache(num_layers: int) -> Cache:
    """An empty cache for the prompt pass."""
    return Cache(layers=[_WriteOnceLayer() for _ in range(num_layers)])


def completion_cache(prompts: Cache, index: torch.Tensor) -> Cache:
    """The prompt pass's keys/values, row ``index[i]`` for completion i (a differentiable gather, so the
    completions' gradients reach the shared prompt), read by the completion pass without being extended."""
    return Cache(layers=[_ReadOnlyPrefixLayer(layer.keys[index], layer.values[index]) for layer in prompts.layers])
