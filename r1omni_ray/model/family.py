"""Policy families: what differs between the omni models this project trains, behind one small interface.

A family knows how to recognise its checkpoints (config.json's ``model_type``), load one strictly, load its
processor (prompt, media, positions), build a tiny random checkpoint for tests and the demo, and which of its
modules are the towers. Everything else (rollouts, rewards, GRPO, weight broadcast of the LM: ``model.*`` and
``lm_head``) works on the model the family returns, through the methods every family's model has:
``embed_prompts``, ``prompt_positions``, ``tower_features``, ``completion_logprobs``, ``towers`` and
``enable_gradient_checkpointing``.

A new family is one module defining a ``FAMILY`` (a :class:`PolicyFamily`), named in ``FAMILY_MODULES``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from r1omni_ray.config import ModelConfig

# family name -> the module that defines its FAMILY
FAMILY_MODULES = {
    "humanomni": "r1omni_ray.model.humanomni_family",
    "qwen2_5_omni": "r1omni_ray.model.qwen_omni",
}
AUTO = "auto"


class PolicyFamily(ABC):
    name: str
    model_types: tuple[str, ...]  # config.json model_type values of its checkpoints

    @abstractmethod
    def load_policy(self, ckpt_dir: str | Path, mc: ModelConfig) -> nn.Module:
        """The policy from a local checkpoint directory, strictly; dtype from ``mc.dtype``."""

    @abstractmethod
    def load_processor(self, ckpt_dir: str | Path, mc: ModelConfig, input_style: str) -> Any:
        """Turns an OmniRecord into the model's inputs (``process``, ``response_ids``, ``tokenizer``)."""

    @abstractmethod
    def make_tiny(self, out_dir: Path, corpus: tuple[str, ...], seed: int, hidden_size: int, num_layers: int) -> Path:
        """A random tiny checkpoint in the family's real layout."""

    def check(self, ckpt_dir: str | Path) -> None:
        """Cheap checks of a checkpoint before Ray starts (a ValueError naming the file); loading checks the rest."""
        return None

    def freeze(self, model: nn.Module, mc: ModelConfig) -> None:
        """Frozen towers (model.freeze_vision_tower / freeze_audio_tower / freeze_bert) get no gradients."""
        from r1omni_ray.model.loading import freeze_modules

        freeze_modules(model, mc.freeze_vision_tower, mc.freeze_audio_tower, mc.freeze_bert)


def family(name: str) -> PolicyFamily:
    if name not in FAMILY_MODULES:
        raise ValueError(f"model.family={name!r} is not one of {sorted(FAMILY_MODULES)} (or {AUTO!r})")
    return importlib.import_module(FAMILY_MODULES[name]).FAMILY


def detect(ckpt_dir: str | Path) -> PolicyFamily:
    """The family whose model_type config.json names; an error naming the file otherwise."""
    from r1omni_ray.model.towers import checkpoint_config

    path = Path(ckpt_dir) / "config.json"
    kind = checkpoint_config(ckpt_dir).get("model_type")
    for name in FAMILY_MODULES:
        fam = family(name)
        if kind in fam.model_types:
            return fam
    raise ValueError(f"{path}: model_type {kind!r} belongs to no policy family "
                     f"({', '.join(f'{n}: {family(n).model_types}' for n in FAMILY_MODULES)})")


def resolve(setting: str, ckpt_dir: str | Path | None) -> PolicyFamily:
    """model.family against the checkpoint: ``auto`` detects it; a named family must match the checkpoint's
    (no checkpoint: the named family's tiny model, HumanOmni's for ``auto``)."""
    if ckpt_dir is None:
        return family("humanomni" if setting == AUTO else setting)
    found = detect(ckpt_dir)
    if setting not in (AUTO, found.name):
        raise ValueError(f"model.family={setting!r} but {Path(ckpt_dir) / 'config.json'} is a {found.name} "
                         f"checkpoint (model_type in {found.model_types}); set model.family={found.name} or auto")
    return found
