"""vLLM general plugin (entry point ``vllm.general_plugins`` in pyproject.toml): vLLM loads it in each of its
processes, so the engine core and every worker know this project's model architecture. Registering by name is
lazy: the model module (and this project's import) happens only where that architecture is served."""

from __future__ import annotations


def register() -> None:
    from vllm import ModelRegistry

    from r1omni_ray.engines.vllm_mrope_request import ARCHITECTURE

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "r1omni_ray.engines.vllm_mrope_lm:MRoPEQwen2ForCausalLM")
