"""HumanOmni-style config: a Qwen2 config plus the multimodal keys of the public checkpoint."""

from __future__ import annotations

from typing import Any

from transformers import Qwen2Config


class HumanOmniQwen2Config(Qwen2Config):
    """config.json layout of HumanOmni / R1-Omni-0.5B (model_type "HumanOmni_qwen2").

    The public checkpoint points ``mm_vision_tower`` / ``mm_audio_tower`` / ``text_model_path`` at local
    folders holding the SigLIP / Whisper / BERT configs and processors. We also accept the tower configs
    embedded as dicts (``vision_config`` / ``audio_config`` / ``bert_config``) so a checkpoint is
    self-contained; ``save_pretrained`` always embeds them.
    """

    model_type = "HumanOmni_qwen2"

    def __init__(
        self,
        mm_vision_tower: str | None = None,
        mm_audio_tower: str | None = None,
        text_model_path: str | None = None,
        vision_config: dict[str, Any] | None = None,
        audio_config: dict[str, Any] | None = None,
        bert_config: dict[str, Any] | None = None,
        mm_hidden_size: int = 768,
        audio_hidden_size: int = 1280,
        mm_projector_type: str = "gated_mlp",
        mm_audio_projector_type: str = "mlp2x_gelu",
        mm_vision_select_layer: int = -2,
        mm_vision_select_feature: str = "patch",
        num_frames: int = 8,
        image_aspect_ratio: str = "pad",
        mm_use_x_start_end: bool = True,
        mm_tunable_parts: str = "mm_mlp_adapter,audio_projector,mm_language_model",
        bert_gate_hidden_size: int = 3584,
        audio_pool_stride: int = 3,
        vision_pool_stride: int = 2,
        **kwargs: Any,
    ) -> None:
        self.mm_vision_tower = mm_vision_tower
        self.mm_audio_tower = mm_audio_tower
        self.text_model_path = text_model_path
        self.vision_config = vision_config
        self.audio_config = audio_config
        self.bert_config = bert_config
        self.mm_hidden_size = mm_hidden_size
        self.audio_hidden_size = audio_hidden_size
        self.mm_projector_type = mm_projector_type
        self.mm_audio_projector_type = mm_audio_projector_type
        self.mm_vision_select_layer = mm_vision_select_layer
        self.mm_vision_select_feature = mm_vision_select_feature
        self.num_frames = num_frames
        self.image_aspect_ratio = image_aspect_ratio
        self.mm_use_x_start_end = mm_use_x_start_end
        self.mm_tunable_parts = mm_tunable_parts
        self.bert_gate_hidden_size = bert_gate_hidden_size
        self.audio_pool_stride = audio_pool_stride
        self.vision_pool_stride = vision_pool_stride
        super().__init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """transformers 5 writes only ``rope_parameters``; readers of the older format (the reference code,
        transformers 4.x) look for ``rope_theta`` / ``rope_scaling`` and silently fall back to 10000 without
        them, so both spellings are written."""
        d = super().to_dict()
        rope = d.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            d.setdefault("rope_theta", rope["rope_theta"])
            if rope.get("rope_type", "default") == "default":
                d.setdefault("rope_scaling", None)
            else:
                d.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        return d
