"""The frozen reference model of the KL term: a copy of the policy without the towers whose outputs the
rollout workers ship. Those towers never run on a learner, so the reference does not hold a second set of
them (at R1-Omni's size, SigLIP + Whisper-large: about 1B parameters); under ZeRO-3 they could not be
shared anyway, since DeepSpeed partitions the policy's copy."""

from __future__ import annotations

import copy

import torch
from torch import nn


class AbsentTower(nn.Module):
    """Stands where a tower was left out; running it is a bug (its input should have been features)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError(f"the {self.name} tower is frozen and its features are shipped by the rollout "
                           "workers; this model holds no copy of it, yet a prompt arrived with raw media")


def frozen_reference(model: nn.Module, drop_vision: bool, drop_audio: bool, home: torch.device) -> nn.Module:
    """An eval-mode, gradient-free copy of ``model`` on ``home``, with the dropped towers left out."""
    inner = model.model
    memo: dict[int, object] = {}
    if drop_vision:
        memo[id(inner.vision_tower)] = AbsentTower("vision")
    if drop_audio:
        memo[id(inner.audio_tower)] = AbsentTower("audio")
    return copy.deepcopy(model, memo).eval().requires_grad_(False).to(home)
