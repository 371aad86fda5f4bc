"""Cold-start SFT on one data-parallel rank: decode this rank's records, then cross-entropy on the response
tokens. Ray-free; the learner actor wraps it."""

from __future__ import annotations

import math
from typing import Any

import torch

from r1omni_ray.config import RunConfig
from r1omni_ray.data.errors import DataError
from r1omni_ray.learner.policy import DeepSpeedPolicy, micro_slices


class SFTTrainer:
    def __init__(self, policy: DeepSpeedPolicy, processor: Any, cfg: RunConfig) -> None:
        self.policy, self.processor, self.cfg = policy, processor, cfg
        self._cache: dict[str, tuple[Any, list[int]] | str] = {}
        self._fallback: tuple[Any, list[int]] | None = None

    def train_records(self, records: list[Any], num_micro: int, use_video: bool = True,
                      use_audio: bool = True) -> dict[str, Any]:
        """Process records here (media decoding is spread over the learners). A record whose media fails to
        load keeps its slot with zero loss weight (every rank must run the same micro-batches) and is
        counted; with data.on_error=raise every rank returns {"error": ...} before training."""
        rank = self.policy.rank
        entries: list[tuple[Any, list[int]] | str] = []
        for rec in records:
            key = f"{rec.id}|{use_video}|{use_audio}"
            if key not in self._cache:
                try:
                    inp = self.processor.process(rec, use_video=use_video, use_audio=use_audio)
                    self._cache[key] = (inp, self.processor.response_ids(rec.response or rec.solution))
                except DataError as e:
                    self._cache[key] = f"record {rec.id!r} (learner-{rank}, SFT): {e}"
            entries.append(self._cache[key])
        errors = [e for e in entries if isinstance(e, str)]
        good = [e for e in entries if not isinstance(e, str)]
        if good:
            self._fallback = good[0]
        # Collective, so that every rank takes the same branch below.
        if self.policy.dp_any(bool(errors)) and self.cfg.data.on_error == "raise":
            return {"error": errors[0] if errors else ""}
        if errors and self._fallback is None:
            raise DataError(f"learner-{rank}: no SFT record has loaded yet to stand in for bad ones: {errors[0]}")
        fb = self._fallback
        prompts = [fb[0] if isinstance(e, str) else e[0] for e in entries]  # type: ignore[index]
        targets = [fb[1] if isinstance(e, str) else e[1] for e in entries]  # type: ignore[index]
        weights = [0.0 if isinstance(e, str) else 1.0 for e in entries]
        out: dict[str, Any] = self.step(prompts, targets, num_micro, weights)
        out["skipped_records"] = float(len(errors))
        out["skipped_reasons"] = errors
        out["skipped_ids"] = [rec.id for rec, e in zip(records, entries, strict=True) if isinstance(e, str)]
        return out

    def step(self, prompts: list[Any], targets: list[list[int]], num_micro: int,
             weights: list[float] | None = None) -> dict[str, float]:
        """Cross-entropy on the response tokens (token mean over the global batch); a zero weight drops a
        sample from the loss and the token count."""
        n = len(targets)
        slices = micro_slices(n, num_micro)
        w = torch.tensor(weights if weights is not None else [1.0] * n, dtype=torch.float32)
        tokens_local = sum(len(tg) * float(wi) for tg, wi in zip(targets, w, strict=True))
        t = torch.tensor([float(tokens_local)])
        torch.distributed.all_reduce(t)
        scale = self.policy.begin_update(num_micro)
        total, correct = 0.0, 0.0
        nonfinite, skipped = 0, False
        for sl in slices:
            idx = list(range(sl.start, sl.stop))
            lp, mask, _ = self.policy.module.completion_logprobs(prompts, idx, targets[sl])
            mask = mask * w[sl].to(mask)[:, None]
            loss = -(lp * mask).sum() / max(t.item(), 1.0)
            loss, bad, step_skipped = self.policy.backward_micro(loss, lp, scale, nonfinite > 0)
            nonfinite += bad
            skipped = step_skipped or skipped
            total += float(loss.detach())
            correct += float(((lp > math.log(0.5)) * mask).sum())
        self.policy.end_update()
        return {"sft_loss": total, "sft_token_acc": correct / max(tokens_local, 1), "tokens": float(tokens_local),
                "skipped_update": float(skipped)}
