"""Rollout engine on transformers `generate(inputs_embeds=...)`: CPU (tests, demo) or a single GPU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.cache_utils import Cache

from r1omni_ray.engines.base import Completion, SamplingParams, sample_seed, stop_token_ids, trim_at_eos
from r1omni_ray.engines.shared_prefix import ATTN_NAME, shared_prefix_cache
from r1omni_ray.model.decode_positions import DecodePositions, next_positions
from r1omni_ray.model.modeling import MMPrompt


class PerSampleSampler:
    """A logits processor that draws each row's next token itself, with that row's own generator (one seed
    per sample), from softmax(logits / temperature) cut to the top-p nucleus, and leaves only that token:
    generate() runs greedy, so it takes it. transformers samples every row from one global generator, which
    would tie each sample to the batch it happened to share."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device) -> None:
        self.temperature, self.top_p = temperature, top_p
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p >= self.top_p  # mass before a token already reached top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
        chosen = torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(self.gens)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen[:, None], 0.0)


class ChosenTokenLogprobs:
    """A logits processor that records each sampled token's log-prob under ``softmax(logits / temperature)``
    one step at a time: it holds only the last step's [rows, V] log-softmax until the next call shows which
    token was drawn, never the [rows, steps, V] of ``output_logits``."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:  # input_ids now ends with the token drawn from it (empty at the first step)
            self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _take(self, chosen: torch.Tensor) -> None:
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, chosen[:, None]).squeeze(-1))
            self.prev = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[rows, new tokens] log-probs; ``sequences`` holds only the new tokens."""
        if self.prev is not None:
            self._take(sequences[:, len(self.steps)])
        return torch.stack(self.steps, dim=1) if self.steps else sequences.new_zeros(sequences.shape, dtype=torch.float)


class MinNewTokens:
    """A logits processor that forbids ``banned`` (stop and pad ids) until ``min_new`` tokens exist; placed
    before the log-prob recorder, so recorded log-probs are those of the masked distribution that is sampled."""

    def __init__(self, min_new: int, banned: set[int]) -> None:
        self.min_new, self.banned = min_new, sorted(banned)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] < self.min_new:  # generating from embeddings: input_ids holds only new tokens
            scores = scores.clone()
            scores[:, self.banned] = float("-inf")
        return scores


def left_padded_positions(rows: Sequence[torch.Tensor] | None, width: int, n: int) -> DecodePositions | None:
    """The prompts' multi-axis positions ([axes, L_i] each) left-padded to ``width`` and repeated for the n
    samples of each prompt (prompt-major rows), with each row's next position; None for 1-D families, whose
    positions generate() derives itself."""
    if rows is None:
        return None
    table = torch.zeros(rows[0].shape[0], len(rows), width, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        table[:, i, width - r.shape[1] :] = r
    nxt = torch.tensor(next_positions(rows), device=table.device)
    return DecodePositions(table.repeat_interleave(n, dim=1), nxt.repeat_interleave(n))


class HFEngine:
    def __init__(self, model: Any, tokenizer, max_batch_prompts: int = 16,
                 shared_prefix: bool = True, stop_on_checkpoint_eos: bool = True) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_prompts = max_batch_prompts
        self.shared_prefix = shared_prefix  # False: every sample prefills and reads its own prompt copy (benchmarks)
        self.eos_ids = stop_token_ids(tokenizer, model.generation_config, stop_on_checkpoint_eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # generate() fills every unset field from model.generation_config, so the checkpoint's own settings
        # (repetition_penalty, no_repeat_ngram_size, suppress_tokens, min_new_tokens, ...) would run before
        # our sampler and recorder: sampling follows the run's config alone.
        self.model.generation_config = GenerationConfig(eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
                                                        bos_token_id=tokenizer.bos_token_id)
        self._params = dict(self.model.named_parameters())

    @torch.no_grad()
    def generate(self, prompts: Sequence[MMPrompt], params: SamplingParams,
                 uids: Sequence[int] | None = None) -> list[list[Completion]]:
        uids = list(range(len(prompts))) if uids is None else list(uids)
        results: list[list[Completion]] = []
        for start in range(0, len(prompts), self.max_batch_prompts):
            end = start + self.max_batch_prompts
            results.extend(self._generate_batch(prompts[start:end], params, uids[start:end]))
        return results

    def _generate_batch(self, prompts: Sequence[MMPrompt], params: SamplingParams,
                        uids: Sequence[int]) -> list[list[Completion]]:
        embeds = self.model.embed_prompts(prompts)
        width = max(e.shape[0] for e in embeds)
        x = embeds[0].new_zeros(len(embeds), width, embeds[0].shape[1])
        att = torch.zeros(len(embeds), width, dtype=torch.long, device=x.device)
        for i, e in enumerate(embeds):  # left padding: generation continues from the right edge
            x[i, width - e.shape[0] :] = e
            att[i, width - e.shape[0] :] = 1
        n = 1 if params.greedy else params.n
        decode = left_padded_positions(self.model.prompt_positions(prompts), width, n)
        temp = 1.0 if params.greedy else params.temperature
        processors: list = []
        if params.min_new_tokens > 0:
            processors.append(MinNewTokens(params.min_new_tokens, self.eos_ids | {self.pad_id}))
        recorder = ChosenTokenLogprobs(temp) if params.logprobs else None
        if recorder is not None:
            processors.append(recorder)  # before the sampler, which leaves only the drawn token
        if not params.greedy:
            base = params.seed if params.seed is not None else 0
            # Rows are prompt-major: row i * n + j is sample j of prompt i.
            seeds = [sample_seed(base, uid, j) for uid in uids for j in range(n)]
            processors.append(PerSampleSampler(seeds, params.temperature, params.top_p, x.device))
        prefill = self.shared_prefix and n > 1 and width > 1
        cache = self._prefill(x[:, :-1], att[:, :-1], n, decode) if prefill else None
        # The shared-prefix attention only while this cache is in use (it falls back to SDPA otherwise). The
        # decoder layers read the attention choice off the LM's config (a composite model's text config).
        lm_config = self.model.model.config
        attn = lm_config._attn_implementation
        if cache is not None:
            lm_config._attn_implementation = ATTN_NAME
        self.model.decode_positions = decode
        try:
            seqs = self._generate(x, att, n, cache, params, processors)
        finally:
            lm_config._attn_implementation = attn
            self.model.decode_positions = None
        lp = recorder.finish(seqs) if recorder is not None else None
        groups: list[list[Completion]] = []
        for i in range(len(prompts)):
            group = []
            for j in range(n):
                r = i * n + j
                ids, reason = trim_at_eos(seqs[r].tolist(), self.eos_ids, self.pad_id)
                text = self.tokenizer.decode(
                    [t for t in ids if t not in self.eos_ids], skip_special_tokens=True
                )
                group.append(Completion(ids, text, reason, lp[r, : len(ids)].tolist() if lp is not None else None))
            groups.append(group)
        return groups

    def _generate(self, x: torch.Tensor, att: torch.Tensor, n: int, cache: Cache | None, params: SamplingParams,
                  processors: list) -> torch.Tensor:
        return self.model.generate(
            # Each prompt repeated n times, prompt-major (what num_return_sequences did, which greedy refuses);
            # with a prefilled cache generate() runs only the last prompt position, per row.
            inputs_embeds=x.repeat_interleave(n, dim=0),
            attention_mask=att.repeat_interleave(n, dim=0),
            past_key_values=cache,
            generation_config=GenerationConfig(
                max_new_tokens=params.max_new_tokens,
                do_sample=False,  # greedy over the sampler's one-hot scores, or plain greedy decoding
                eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
            ),
            logits_processor=processors or None,
        )  # only new tokens when generating from inputs_embeds

    def _prefill(self, x: torch.Tensor, att: torch.Tensor, n: int, decode: DecodePositions | None) -> Cache:
        """KV cache of the left-padded prompts, each computed once and shared by its n samples (the ~1k-token
        omni prompt is prefilled once, not n times, and decoding reads one copy of it: see shared_prefix).
        Positions as generate() derives them from the attention mask (or, for multi-axis positions, the
        prompts' own), so the continuation sees exactly the cache it would have built itself."""
        if decode is None:
            pos = (att.cumsum(-1) - 1).masked_fill(att == 0, 0)
        else:  # one row per prompt: the table's rows are prompt-major, n per prompt
            pos = decode.table[:, ::n, : x.shape[1]]
        prompt = self.model.model(inputs_embeds=x, attention_mask=att, position_ids=pos, use_cache=True)
        return shared_prefix_cache(prompt.past_key_values, n)

    @torch.no_grad()
    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        for name, t in named:
            p = self._params.get(name)
            if p is None:
                raise KeyError(f"rollout engine has no parameter {name!r}")
            p.copy_(t)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}
