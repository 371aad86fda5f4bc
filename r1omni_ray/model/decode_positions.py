"""Positions after a prompt: where a completion continues (next_positions), and a multi-axis-rotary family's
prompts while transformers' generate() decodes them (DecodePositions)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def next_positions(rows: Sequence[torch.Tensor]) -> list[int]:
    """Where each prompt's completion starts, on every axis: one past the prompt's largest position (for 1-D
    positions, its length). The learners' forwards and the rollout engine both take it from here."""
    return [int(r.max()) + 1 if r.numel() else 0 for r in rows]


@dataclass
class DecodePositions:
    """Positions for transformers' generate() over left-padded prompts: the prompts' own table ([axes, rows,
    width]) for prompt columns, then each row's next position + the step on every axis."""

    table: torch.Tensor
    next_pos: torch.Tensor  # [rows]

    def columns(self, start: int, length: int) -> torch.Tensor:
        width = self.table.shape[-1]
        cols = torch.arange(start, start + length, device=self.table.device)
        inside = self.table[..., cols.clamp(max=width - 1)]
        after = (self.next_pos[:, None] + (cols - width)[None]).expand(self.table.shape[0], -1, -1)
        return torch.where((cols < width)[None, None], inside, after)
