"""A vLLM model for policies whose LM uses M-RoPE (the Qwen2.5-Omni thinker): vLLM's own Qwen2 LM, fed by the
rollout worker. Imported only inside vLLM's processes, through the plugin in engines/vllm_plugin.py.

vLLM's prompt-embeds route gives every prompt token text positions (0..L-1 on each axis:
gpu_model_runner._init_mrope_positions), and vLLM's own thinker reruns the towers and transformers' processor
(which needs torchvision). So a request here is the prompt's token ids plus one multimodal item of modality
``omni`` with two fields the rollout worker computed: ``r1omni_embeds``, the tower outputs for the prompt's media
placeholder tokens in order, and ``r1omni_positions``, the prompt's [3, L] TMRoPE positions, the same ones the
learners train with. vLLM runs no tower and no preprocessing of its own; text tokens are embedded by its own
embedding table (the weights the broadcast keeps equal to the learners'). A completion continues on every axis
from the prompt's largest position + 1, as vLLM does for every M-RoPE model (mrope_position_delta), which is
also what model/decode_positions.next_positions gives the learners.

Written against vLLM 0.32's source (vllm/multimodal/processing, vllm/multimodal/parse.py DictEmbeddingItems,
vllm/model_executor/models/interfaces.py SupportsMultiModal / SupportsMRoPE, vllm/v1/worker/gpu_model_runner.py
_init_mrope_positions, vllm/multimodal/encoder_budget.py: an embedding-only modality, limit 0 with
enable_mm_embeds, is neither profiled nor run through a tower).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import BatchFeature
from vllm.inputs import MultiModalDataDict, MultiModalInput, mm_input
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModal
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems, PlaceholderRange
from vllm.multimodal.parse import DictEmbeddingItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    ProcessorInputs,
    PromptUpdate,
    TimingContext,
)

from r1omni_ray.engines.vllm_mrope_request import EMBEDS, MEDIA_TOKENS_KEY, MODALITY, POSITIONS, media_span


def _fields(_: Mapping[str, Any] | None = None) -> dict[str, MultiModalFieldConfig]:
    # One item per prompt; the positions are read on the CPU by get_mrope_input_positions.
    return {EMBEDS: MultiModalFieldConfig.batched(MODALITY),
            POSITIONS: MultiModalFieldConfig.batched(MODALITY, keep_on_cpu=True)}


class OmniDataParser(MultiModalDataParser):
    def _get_subparsers(self):
        return {MODALITY: self._parse_omni}

    def _parse_omni(self, data: Mapping[str, torch.Tensor]) -> DictEmbeddingItems:
        return DictEmbeddingItems(data, modality=MODALITY, required_fields={EMBEDS, POSITIONS}, fields_factory=_fields)


class OmniProcessingInfo(BaseProcessingInfo):
    def get_data_parser(self) -> MultiModalDataParser:
        return OmniDataParser()

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {MODALITY: 1}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {MODALITY: seq_len}  # known without building dummy media: at most the whole prompt

    def media_token_ids(self) -> frozenset[int]:
        return frozenset(getattr(self.get_hf_config(), MEDIA_TOKENS_KEY))


class OmniDummyInputs(BaseDummyInputsBuilder[OmniProcessingInfo]):
    """Nothing to profile: the modality is embeddings only (limit 0), so vLLM builds no dummy media."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any) -> MultiModalDataDict:
        return {}


class OmniProcessor(BaseMultiModalProcessor[OmniProcessingInfo]):
    """The prompt arrives as token ids with its placeholders already expanded (the rollout worker's processor):
    this only records where the embeddings go. No transformers processor runs."""

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
                              ) -> Mapping[str, MultiModalFieldConfig]:
        return _fields(hf_inputs)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptUpdate]:
        return []

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        ids = list(inputs.prompt)
        items = inputs.mm_data_items.get(MODALITY)
        if items is None or items.get_count() == 0:  # vLLM's warm-up (no dummy media here): nothing to place
            return mm_input(prompt_token_ids=ids, mm_kwargs=MultiModalKwargsItems({}), mm_hashes={}, mm_placeholders={})
        item = items.get(0)
        embeds, positions = item[EMBEDS], item[POSITIONS]
        offset, is_embed = media_span(ids, self.info.media_token_ids())
        if int(is_embed.sum()) != embeds.shape[0]:
            raise ValueError(f"{int(is_embed.sum())} media placeholder tokens but {embeds.shape[0]} {EMBEDS} rows")
        if tuple(positions.shape) != (3, len(ids)):
            raise ValueError(f"{POSITIONS} {tuple(positions.shape)} do not fit a {len(ids)}-token prompt")
        kwargs = MultiModalKwargsItems.from_hf_inputs(
            BatchFeature({EMBEDS: embeds[None], POSITIONS: positions[None]}), _fields())
        hashes = inputs.get_mm_hashes(self.info.model_id, self.info.ctx.get_mm_config().mm_hasher_algorithm)
        span = PlaceholderRange(offset=offset, length=len(is_embed), is_embed=is_embed)
        return mm_input(prompt_token_ids=ids, mm_kwargs=kwargs, mm_hashes=hashes, mm_placeholders={MODALITY: [span]})


@MULTIMODAL_REGISTRY.register_processor(OmniProcessor, info=OmniProcessingInfo, dummy_inputs=OmniDummyInputs)
class MRoPEQwen2ForCausalLM(Qwen2ForCausalLM, SupportsMultiModal, SupportsMRoPE):
    """vLLM's Qwen2 LM (its rotary embedding is M-RoPE when the config has an mrope_section), with media
    embeddings scattered over the placeholders and the positions the request carries."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return None  # prompts come as token ids, placeholders expanded

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        embeds = kwargs.get(EMBEDS)
        if embeds is None:
            return []
        dtype = self.model.embed_tokens.weight.dtype
        return [e.to(dtype) for e in embeds]

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *, is_multimodal=None
                        ) -> torch.Tensor:
        return SupportsMultiModal.embed_input_ids(self, input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """The request's own positions, and the delta that continues a completion from their max + 1."""
        n = len(input_tokens)
        items = [f for f in mm_features if f.modality == MODALITY]
        if not items:  # a text-only prompt: 0..L-1 on every axis, as the learners count it
            return torch.arange(n).expand(3, n).clone(), 0
        if items[0].data is None:  # never text positions in silence
            raise RuntimeError(f"{MODALITY!r} item without its data in the model runner: no positions to use")
        pos = items[0].data[POSITIONS].data.to("cpu", torch.int64)
        return pos.clone(), int(pos.max()) + 1 - n
