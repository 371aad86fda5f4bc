"""HumanOmni / R1-Omni (SigLIP + Whisper + BERT gate + Qwen2 LM) as a policy family (model/family.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from r1omni_ray.model.configuration import HumanOmniQwen2Config
from r1omni_ray.model.family import PolicyFamily
from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM

if TYPE_CHECKING:
    from r1omni_ray.config import ModelConfig


class HumanOmniFamily(PolicyFamily):
    name = "humanomni"
    model_types = (HumanOmniQwen2Config.model_type,)

    def load_policy(self, ckpt_dir: str | Path, mc: ModelConfig) -> HumanOmniQwen2ForCausalLM:
        from r1omni_ray.model.loading import load_policy

        return load_policy(ckpt_dir, mc.dtype, mc.towers())

    def load_processor(self, ckpt_dir: str | Path, mc: ModelConfig, input_style: str) -> Any:
        from r1omni_ray.data.processor import OmniProcessor

        return OmniProcessor.from_pretrained(ckpt_dir, towers=mc.towers(), input_style=input_style)

    def make_tiny(self, out_dir: Path, corpus: tuple[str, ...], seed: int, hidden_size: int, num_layers: int) -> Path:
        from r1omni_ray.tiny.model import make_tiny_checkpoint

        return make_tiny_checkpoint(out_dir, corpus=corpus, seed=seed, hidden_size=hidden_size, num_layers=num_layers)


FAMILY = HumanOmniFamily()
