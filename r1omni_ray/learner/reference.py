"""The frozen reference model of the KL term: a copy of the policy without the towers whose outputs the
rollout workers ship. Those towers never run on a learner, so the reference does not hold a second set of
them (at R1-Omni's size, SigLIP + Whisper-large: about 1B parameters); under ZeRO-3 they could not be
shared anyway, since DeepSpeed partitions the policy's copy.

Where it lives: under ZeRO-3 it is partitioned like the policy (a DeepSpeed ZeRO-3 engine without an
optimizer, as OpenRLHF does: 1/N of it per rank, gathered layer by layer in its forwards), with
learner.ref_offload its partitions in pinned host memory (DeepSpeed's offload_param). Under ZeRO 0-2 each
rank holds a whole copy; with learner.ref_offload it is parked in pinned host memory and copied to the GPU
for the step's reference pass only. It is frozen, so nothing is ever copied back: the GPU copy is dropped."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

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
    towers = model.towers()
    memo: dict[int, object] = {}
    if drop_vision:
        memo[id(towers["vision"])] = AbsentTower("vision")
    if drop_audio:
        memo[id(towers["audio"])] = AbsentTower("audio")
    return copy.deepcopy(model, memo).eval().requires_grad_(False).to(home)


def sharded_reference(reference: nn.Module, micro_batch_size: int, offload: bool, bf16: bool) -> nn.Module:
    """The reference as a ZeRO-3 inference engine's module (call under the learners' DeepSpeed process group,
    after the policy's engine exists). Its forwards are collective, like the policy's: every rank must run the
    same number, with the same modalities (set ``every_forward_runs`` as on the policy)."""
    import deepspeed

    zero: dict[str, Any] = {"stage": 3}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {"train_micro_batch_size_per_gpu": micro_batch_size, "zero_optimization": zero,
              "bf16": {"enabled": bf16}, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, *_ = deepspeed.initialize(model=reference, config=config)
    return engine.module


class ParkedWeights:
    """A frozen module's weights kept in host memory (pinned when CUDA is there, so the copy to the GPU runs at
    full bus speed and asynchronously). ``on(device)`` gives the module device copies for a block of forwards
    and then points it back at the host tensors: nothing to copy back, nothing allocated in host memory per
    step (``module.to("cpu")`` would do both, through pageable memory)."""

    def __init__(self, module: nn.Module) -> None:
        self.tensors = [*module.parameters(), *module.buffers()]
        pin = torch.cuda.is_available()
        self.host = [t.detach().to("cpu").pin_memory() if pin else t.detach().to("cpu") for t in self.tensors]
        for t, h in zip(self.tensors, self.host, strict=True):
            t.data = h

    @contextlib.contextmanager
    def on(self, device: torch.device | str) -> Iterator[None]:
        if torch.device(device).type == "cpu":
            yield
            return
        for t, h in zip(self.tensors, self.host, strict=True):
            t.data = h.to(device, non_blocking=True)
        try:
            yield
        finally:
            for t, h in zip(self.tensors, self.host, strict=True):
                t.data = h
