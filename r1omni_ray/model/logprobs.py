"""Training-side log-probs of completions under the policy (and the frozen reference): the maths per
sequence (sequence_logprobs, entropy_from_logits) and the model's two forwards that produce the hidden states
predicting each completion token, packed (every completion behind its own copy of the prompt) or through the
shared prefix (each prompt once, its KV cache serving all its completions; model/prefix_cache.py).
Decoding's own prefix sharing is a different mechanism: engines/shared_prefix.py."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from r1omni_ray.model.decode_positions import next_positions
from r1omni_ray.model.prefix_cache import completion_cache, prompt_cache

if TYPE_CHECKING:
    from r1omni_ray.model.modeling import MMPrompt


def _check_logits(logits: Tensor, temperature: float) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _row_chunks(logits: Tensor, temperature: float) -> Iterator[Tensor]:
    """Per-sequence float32+ copies of the scaled logits, one at a time (entropy, and the log-prob function's
    own passes)."""
    for row in logits:
        if row.dtype in (torch.float16, torch.bfloat16):
            row = row.float()  # softmax in half precision loses most of the log-prob's mantissa
        if temperature != 1.0:
            row = row / temperature
        yield row


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / T) at the target ids, a sequence at a time in both passes. Autograd through the
    plain expression would keep every row's float32 copy alive for backward (all rows at once: twice the
    bf16 logits); this keeps only the logits as given and the log-normalisers, and recomputes one row's
    softmax in backward: d logp_t / d logits = (onehot(id_t) - softmax_t) / T."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
        dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        out = torch.empty(logits.shape[:2], dtype=dtype, device=logits.device)
        lse = torch.empty_like(out)
        for b, row in enumerate(_row_chunks(logits, temperature)):
            lse[b] = torch.logsumexp(row, dim=-1)
            out[b] = row.gather(-1, ids[b].unsqueeze(-1)).squeeze(-1) - lse[b]
        ctx.save_for_backward(logits, ids, lse)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, ids, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for b, row in enumerate(_row_chunks(logits, ctx.temperature)):
            g = grad[b].to(row.dtype).unsqueeze(-1)
            d = torch.exp(row - lse[b].unsqueeze(-1)).mul_(-g)  # -softmax * g
            d.scatter_add_(-1, ids[b].unsqueeze(-1), g)
            if ctx.temperature != 1.0:
                d.div_(ctx.temperature)
            out[b] = d
        return out, None, None


def sequence_logprobs(logits: Tensor, token_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)[b, t, token_ids[b, t]]`` -> ``[B, T]``.

    ``gather - logsumexp`` a sequence at a time, forward and backward (_TokenLogprobs), never the full
    ``[B, T, V]`` log-softmax (V is ~150k for Qwen-based models) nor a float32 copy of all logits. Half
    inputs are computed in float32.
    """
    if token_ids.shape != logits.shape[:2]:
        raise ValueError(f"token_ids {tuple(token_ids.shape)} must match logits[:2] {tuple(logits.shape[:2])}")
    _check_logits(logits, temperature)
    return _TokenLogprobs.apply(logits, token_ids.long(), float(temperature))


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` per position -> ``[B, T]``."""
    _check_logits(logits, temperature)
    out = []
    for row in _row_chunks(logits, temperature):
        lse = torch.logsumexp(row, dim=-1)
        probs = torch.softmax(row, dim=-1)
        # Banned tokens (-inf logits) have p = 0; avoid 0 * -inf = NaN.
        finite_row = row.masked_fill(torch.isinf(row), 0.0)
        out.append(lse - (probs * finite_row).sum(dim=-1))
    if not out:
        dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        return logits.new_zeros(logits.shape[:2], dtype=dtype)
    return torch.stack(out)


def right_pad(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of [L_i, H] embeddings as one right-padded [N, max L, H] batch and its [N, max L] attention mask."""
    width = max(r.shape[0] for r in rows)
    x = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
    att = torch.zeros(len(rows), width, dtype=torch.long, device=x.device)
    for i, r in enumerate(rows):
        x[i, : r.shape[0]] = r
        att[i, : r.shape[0]] = 1
    return x, att


@dataclass
class PackedBatch:
    """Right-padded prompt+completion embeddings for log-prob computation."""

    inputs_embeds: torch.Tensor  # [N, L, H]
    attention_mask: torch.Tensor  # [N, L]
    prompt_lens: list[int]
    completion_lens: list[int]


def right_pad_ids(seqs: Sequence[Sequence[int]], width: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Token id lists as one right-padded [N, width] long tensor (0 as padding) and its 0/1 mask."""
    ids = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[i, : len(s)] = 1
    return ids, mask


class CompletionLogprobs:
    """Mixed into each policy family's model (which provides embed_prompts, the LM ``model`` and ``lm_head``;
    a family with multi-axis positions also prompt_positions)."""

    device: torch.device
    config: Any
    model: Any
    lm_head: Any

    def pack(
        self,
        prompt_embeds: Sequence[torch.Tensor],
        prompt_index: Sequence[int],
        completions: Sequence[Sequence[int]],
    ) -> PackedBatch:
        flat = torch.tensor([t for c in completions for t in c], dtype=torch.long, device=self.device)
        embedded = self.get_input_embeddings()(flat).split([len(c) for c in completions])  # one call (ZeRO-3)
        rows = []
        plens, clens = [], []
        for pi, comp, ce in zip(prompt_index, completions, embedded, strict=True):
            pe = prompt_embeds[pi]
            rows.append(torch.cat([pe, ce.to(pe.dtype)], dim=0))
            plens.append(pe.shape[0])
            clens.append(len(comp))
        x, att = right_pad(rows)
        return PackedBatch(x, att, plens, clens)

    def completion_logprobs(
        self,
        prompts: Sequence[MMPrompt],
        prompt_index: Sequence[int],
        completions: Sequence[Sequence[int]],
        temperature: float = 1.0,
        with_entropy: bool = False,
        shared_prefix: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Log-probs of each completion token given its multimodal prompt.

        Returns (logp [N, C], mask [N, C], entropy [N, C] or None), C = longest completion.
        With ``shared_prefix`` each prompt runs through the LM once and its KV cache is expanded to its
        completions (G completions of a prompt: the ~1k-token omni prompt once, not G times); otherwise every
        completion is packed behind its own copy of the prompt. Both give the same values and gradients.
        Only completion positions go through lm_head, so memory stays O(N*C*V), not O(N*L*V).
        """
        pe = self.embed_prompts(prompts)
        if shared_prefix:
            h = self._shared_prefix_hidden(prompts, pe, prompt_index, completions)
        else:
            h = self._packed_hidden(prompts, pe, prompt_index, completions)
        cmax = max(max((len(c) for c in completions), default=1), 1)
        targets, mask = right_pad_ids(completions, cmax, self.device)
        mask = mask.float()
        logits = self.lm_head(h)
        logp = sequence_logprobs(logits, targets, temperature) * mask
        ent = None
        if with_entropy:  # a metric, not a loss term: no graph kept for it (at 7B it held ~8 GB)
            with torch.no_grad():
                ent = entropy_from_logits(logits, temperature) * mask
        return logp, mask, ent

    def prompt_positions(self, prompts: Sequence[MMPrompt]) -> list[torch.Tensor] | None:
        """Each prompt's [axes, L] rotary positions, for families with several axes (Qwen2.5-Omni's TMRoPE);
        None: plain 0..L-1, the LM's own default."""
        return None

    def _positions(self, prompts: Sequence[MMPrompt], pe: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
        """([axes, L_i] positions, the position after each prompt): a completion continues from the prompt's
        largest position + 1 on every axis (for 1-D positions: at the prompt's length)."""
        rows = self.prompt_positions(prompts)
        if rows is None:
            rows = [torch.arange(e.shape[0], device=self.device)[None] for e in pe]
        return rows, next_positions(rows)

    @staticmethod
    def _lm_positions(pos: torch.Tensor) -> torch.Tensor:
        """[axes, N, L] -> what the LM takes: [N, L] for one axis, else [axes, N, L]."""
        return pos[0] if pos.shape[0] == 1 else pos

    def _packed_hidden(self, prompts: Sequence[MMPrompt], pe: Sequence[torch.Tensor], prompt_index: Sequence[int],
                       completions: Sequence[Sequence[int]]) -> torch.Tensor:
        """Per-completion forward: the hidden states that predict each completion token, [N, C, H]."""
        batch = self.pack(pe, prompt_index, completions)
        rows, nxt = self._positions(prompts, pe)
        width = batch.inputs_embeds.shape[1]
        pos = torch.zeros(rows[0].shape[0], len(completions), width, dtype=torch.long, device=self.device)
        for i, (pi, cl) in enumerate(zip(prompt_index, batch.completion_lens, strict=True)):
            pl = batch.prompt_lens[i]
            pos[:, i, :pl] = rows[pi]
            pos[:, i, pl : pl + cl] = nxt[pi] + torch.arange(cl, device=self.device)
        hidden = self.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                            position_ids=self._lm_positions(pos)).last_hidden_state
        cmax = max(max(batch.completion_lens), 1)
        idx = torch.zeros(len(completions), cmax, dtype=torch.long, device=self.device)
        for i, (pl, cl) in enumerate(zip(batch.prompt_lens, batch.completion_lens, strict=True)):
            idx[i, :cl] = torch.arange(pl - 1, pl - 1 + cl, device=self.device)  # state t predicts token t+1
        return torch.gather(hidden, 1, idx[..., None].expand(-1, -1, hidden.shape[-1]))

    def _shared_prefix_hidden(self, prompts: Sequence[MMPrompt], pe: Sequence[torch.Tensor], prompt_index: Sequence[int],
                              completions: Sequence[Sequence[int]]) -> torch.Tensor:
        """Shared-prefix forward, same result as ``_packed_hidden``: the prompts (right-padded) run once with
        a KV cache; the cache rows are gathered per completion (a differentiable index, so gradients flow back
        into the shared prompt); the completions then attend to it, positions continuing after each prompt's
        own (past the padding gap, which the attention mask hides). Both caches survive gradient
        checkpointing's replay (model/prefix_cache.py)."""
        dev = self.device
        plens = [e.shape[0] for e in pe]
        x, pmask = right_pad(pe)
        rows, nxt = self._positions(prompts, pe)
        ppos = torch.zeros(rows[0].shape[0], len(pe), max(plens), dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            ppos[:, i, : r.shape[1]] = r
        cache = prompt_cache(len(self.model.layers))
        # use_cache=False: the layers fill the cache given to them all the same; True would only make a
        # checkpointed layer warn that it turned caching off.
        out = self.model(inputs_embeds=x, attention_mask=pmask, position_ids=self._lm_positions(ppos),
                         past_key_values=cache, use_cache=False)
        index = torch.tensor(list(prompt_index), dtype=torch.long, device=dev)
        last = torch.tensor([plens[p] - 1 for p in prompt_index], device=dev)
        first = out.last_hidden_state[index, last][:, None]  # the prompt's last state predicts token 0
        # The last token is only a target, never an input. With no input token at all (every completion
        # empty or 1 token) the completion pass still runs, on one masked position: under ZeRO-3 every rank
        # must run the same forwards and backwards, whatever its micro-batch holds.
        real_steps = max(len(c) for c in completions) - 1
        steps = max(real_steps, 1)
        embed = self.get_input_embeddings()
        ids, cmask = right_pad_ids([c[:-1] for c in completions], steps, dev)  # an empty completion: no input
        cpos = torch.tensor([nxt[p] for p in prompt_index], device=dev)[:, None] + torch.arange(steps, device=dev)
        cpos = cpos[None].expand(ppos.shape[0], -1, -1)
        hidden = self.model(inputs_embeds=embed(ids).to(x.dtype), attention_mask=torch.cat([pmask[index], cmask], 1),
                            position_ids=self._lm_positions(cpos), past_key_values=completion_cache(cache, index),
                            use_cache=False).last_hidden_state
        if real_steps <= 0:
            return first + hidden.sum() * 0.0  # the pass's modules on the graph, its value unused
        return torch.cat([first, hidden], dim=1)
