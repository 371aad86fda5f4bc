"""Loading torch-pickled checkpoints without executing code from them.

Policy weights travel as safetensors (HF export, model loading). DeepSpeed's own checkpoints (optimizer
shards, for resume) are torch pickles, and DeepSpeed's TorchCheckpointEngine reads them with
``torch.load(weights_only=False)``: a crafted file could run arbitrary code in a learner. Here they are
read with ``weights_only=True`` plus an allowlist of the few plain-data DeepSpeed classes they contain.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def deepspeed_safe_globals() -> list[Any]:
    """DeepSpeed classes found in ZeRO checkpoints: data holders, no code runs when they are rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | os.PathLike, map_location: Any = None, extra_globals: list[Any] | None = None) -> Any:
    """torch.load with weights_only=True (tensors, containers, primitives and the allowlist only)."""
    allowed = deepspeed_safe_globals() + list(extra_globals or [])
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            raise RuntimeError(
                f"{path}: refusing to load a checkpoint that needs arbitrary unpickling "
                f"(torch.load weights_only=True): {str(e).splitlines()[-1][:300]}"
            ) from None
        raise


def install_safe_checkpoint_loading(engine: Any) -> None:
    """Route a DeepSpeed engine's checkpoint reads (module and ZeRO optimizer states) through
    safe_torch_load."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        return

    def load(path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location=map_location)

    ce.load = load
