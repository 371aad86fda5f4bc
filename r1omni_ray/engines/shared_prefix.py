"""Shared-prefix decoding for the transformers engine: the n samples of a prompt read one copy of its KV.

transformers' generate() keeps a KV cache row per sample. For R1-Omni's ~1k-token prompts and n = 8 samples
that means eight copies of the same prompt keys and values, all re-read by attention and re-copied by the
growing cache at every decoding step. Here the cache holds each prompt's prefix once ([prompts, kv_heads,
P, d]) next to the samples' own generated suffix ([prompts * n, kv_heads, S, d]), and an attention function
(registered with transformers' AttentionInterface under ATTN_NAME) scores each query against its prompt's
prefix and its own suffix, one softmax over both. Everything else (sampling, stopping, masks, positions) is
generate()'s own. (rollout.shared_prefix. The learners' shared prefix, learner.shared_prefix, is another
mechanism: one prompt pass whose KV cache serves all completions in the training forward, model/logprobs.py
with model/prefix_cache.py.)
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTN_NAME = "r1omni_shared_prefix"


class SharedPrefixLayer(DynamicLayer):
    """One layer's cache: the prompts' prefix once, the samples' generated tokens (the suffix) per row."""

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, n: int) -> None:
        super().__init__()
        self.prefix_keys, self.prefix_values, self.n = prefix_keys, prefix_values, n
        self.prefix_len = prefix_keys.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        # The attention function finds the prefix through the suffix tensors it is handed.
        keys.shared_prefix = (self.prefix_keys, self.prefix_values, self.n)
        return keys, values

    def get_seq_length(self) -> int:
        return self.prefix_len + super().get_seq_length()


def shared_prefix_cache(prompt_cache: Cache, n: int) -> Cache:
    """A cache for n samples per prompt from the prompts' own (prefilled) cache, without copying the prefix."""
    return Cache(layers=[SharedPrefixLayer(layer.keys, layer.values, n) for layer in prompt_cache.layers])


def shared_prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any):
    """Attention of one decoding step ([rows, heads, 1, d] queries) over prefix + suffix; anything else (a
    cache without a shared prefix, several query positions) is plain SDPA."""
    shared = getattr(key, "shared_prefix", None)
    if shared is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    pk, pv, n = shared
    rows, heads, _, d = query.shape
    prompts, kv_heads, plen, _ = pk.shape
    g = heads // kv_heads  # query heads per KV head (GQA)
    scale = scaling if scaling is not None else d**-0.5
    # Scores, softmax and weighted sums in fp32 whatever the cache dtype: in bf16 the rounding of a
    # 1k-token prefix's scores alone doubles the error against fp32 (SDPA accumulates in fp32 too).
    q, pk, pv, key, value = query.float(), pk.float(), pv.float(), key.float(), value.float()
    # Prefix: all n samples' queries of a prompt against its one copy.
    # [rows=prompts*n, heads=kv_heads*g, 1, d] -view-> [prompts, n, kv_heads, g, d]
    # -permute-> [prompts, kv_heads, n, g, d] -reshape-> [prompts, kv_heads, n*g, d]
    qp = q.view(prompts, n, kv_heads, g, d).permute(0, 2, 1, 3, 4).reshape(prompts, kv_heads, n * g, d)
    # qp @ pk^T: [prompts, kv_heads, n*g, P] -view-> [prompts, kv_heads, n, g, P]
    # -permute-> [prompts, n, kv_heads, g, P] -reshape-> [rows, kv_heads, g, P]
    sp = (qp @ pk.transpose(-1, -2)).view(prompts, kv_heads, n, g, plen).permute(0, 2, 1, 3, 4)
    sp = sp.reshape(rows, kv_heads, g, plen)
    # Suffix: each row against its own generated tokens, [rows, kv_heads, g, S].
    qs = q.view(rows, kv_heads, g, d)
    ss = qs @ key.transpose(-1, -2)
    scores = torch.cat([sp, ss], dim=-1) * scale  # [rows, kv_heads, g, P + S]
    if attention_mask is not None:  # [rows, 1, 1, P + S]: bool (True attends) or additive
        m = attention_mask[:, :, -1:, :]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    probs = torch.softmax(scores, dim=-1)
    # Prefix weights back to prompt-major against the one prefix copy: [rows, kv_heads, g, P] -reshape->
    # [prompts, n, kv_heads, g, P] -permute-> [prompts, kv_heads, n, g, P] -reshape-> [prompts, kv_heads, n*g, P]
    pp = probs[..., :plen].reshape(prompts, n, kv_heads, g, plen).permute(0, 2, 1, 3, 4)
    # pp @ pv: [prompts, kv_heads, n*g, d] -view-> [prompts, kv_heads, n, g, d]
    out_p = (pp.reshape(prompts, kv_heads, n * g, plen) @ pv).view(prompts, kv_heads, n, g, d)
    # -permute-> [prompts, n, kv_heads, g, d] -reshape-> [rows, heads, d]
    out_p = out_p.permute(0, 2, 1, 3, 4).reshape(rows, heads, d)
    out_s = (probs[..., plen:] @ value).reshape(rows, heads, d)  # [rows, kv_heads, g, d] -> [rows, heads, d]
    return (out_p + out_s).to(query.dtype)[:, None], None  # [rows, q=1, heads, d], as transformers' attention functions return


AttentionInterface.register(ATTN_NAME, shared_prefix_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
