"""Rollout engine on transformers `generate(inputs_embeds=...)`: CPU (tests, demo) or a single GPU."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from r1omni_ray.engines.base import Completion, SamplingParams, trim_at_eos
from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM, MMPrompt


class HFEngine:
    def __init__(self, model: HumanOmniQwen2ForCausalLM, tokenizer, max_batch_prompts: int = 16) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_prompts = max_batch_prompts
        self.eos_ids = {tokenizer.eos_token_id}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._params = dict(self.model.named_parameters())

    @torch.no_grad()
    def generate(self, prompts: Sequence[MMPrompt], params: SamplingParams) -> list[list[Completion]]:
        results: list[list[Completion]] = []
        for start in range(0, len(prompts), self.max_batch_prompts):
            results.extend(self._generate_batch(prompts[start : start + self.max_batch_prompts], params))
        return results

    def _generate_batch(self, prompts: Sequence[MMPrompt], params: SamplingParams) -> list[list[Completion]]:
        embeds = self.model.embed_prompts(prompts)
        width = max(e.shape[0] for e in embeds)
        x = embeds[0].new_zeros(len(embeds), width, embeds[0].shape[1])
        att = torch.zeros(len(embeds), width, dtype=torch.long, device=x.device)
        for i, e in enumerate(embeds):  # left padding: generation continues from the right edge
            x[i, width - e.shape[0] :] = e
            att[i, width - e.shape[0] :] = 1
        if params.seed is not None:
            torch.manual_seed(params.seed)
        n = 1 if params.greedy else params.n
        out = self.model.generate(
            inputs_embeds=x,
            attention_mask=att,
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            temperature=params.temperature if not params.greedy else None,
            top_p=params.top_p if not params.greedy else None,
            top_k=0 if not params.greedy else None,
            num_return_sequences=n,
            eos_token_id=list(self.eos_ids),
            pad_token_id=self.pad_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        seqs = out.sequences  # only new tokens when generating from inputs_embeds
        temp = 1.0 if params.greedy else params.temperature
        logits = torch.stack(out.logits, dim=1).float() / temp  # [B*n, new, V]
        lp = torch.log_softmax(logits, -1).gather(-1, seqs[:, : logits.shape[1], None]).squeeze(-1)
        groups: list[list[Completion]] = []
        for i in range(len(prompts)):
            group = []
            for j in range(n):
                r = i * n + j
                ids, reason = trim_at_eos(seqs[r].tolist(), self.eos_ids, self.pad_id)
                text = self.tokenizer.decode(
                    [t for t in ids if t not in self.eos_ids], skip_special_tokens=True
                )
                group.append(Completion(ids, lp[r, : len(ids)].tolist(), text, reason))
            groups.append(group)
        return groups

    @torch.no_grad()
    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        for name, t in named:
            p = self._params.get(name)
            if p is None:
                raise KeyError(f"rollout engine has no parameter {name!r}")
            p.copy_(t)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}
