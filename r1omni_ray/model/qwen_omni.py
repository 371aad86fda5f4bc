"""The Qwen2.5-Omni thinker as a policy: transformers' ``Qwen2_5OmniThinkerForConditionalGeneration`` (its
vision tower ``visual.*``, audio tower ``audio_tower.*``, LM ``model.*`` + ``lm_head``) with this project's
training forwards (model/logprobs.py) and prompt embedding.

Differences from HumanOmni that the rest of the code sees through the policy interface (model/family.py):
- the towers end in their own projections (the vision merger, the audio ``proj``), so a tower's output is
  already LM-sized: what a rollout worker ships for a frozen tower is the token embeddings themselves;
- positions are TMRoPE's three axes, computed with the prompt by the processor (``OmniInputs.positions``);
  a completion continues on all three axes from the prompt's largest position + 1;
- the placeholders are real token ids (``<|VIDEO|>``, ``<|AUDIO|>``), one per tower output row.

Loading is strict: a published Qwen2.5-Omni checkpoint holds ``thinker.*``, ``talker.*`` and ``token2wav.*``;
the last two are skipped by name, and any other tensor the thinker has no place for, or lacks, is an error.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

from r1omni_ray.model.decode_positions import DecodePositions
from r1omni_ray.model.family import PolicyFamily
from r1omni_ray.model.loading import CheckpointError, _short_list, resolve_dtype
from r1omni_ray.model.logprobs import CompletionLogprobs
from r1omni_ray.model.modeling import MMPrompt
from r1omni_ray.model.towers import checkpoint_config

if TYPE_CHECKING:
    from r1omni_ray.config import ModelConfig

log = logging.getLogger(__name__)

FULL_MODEL_TYPE = "qwen2_5_omni"  # config.json of the published checkpoint (thinker + talker + token2wav)
THINKER_MODEL_TYPE = "qwen2_5_omni_thinker"  # a thinker on its own (what this project saves)
# Parts of the published checkpoint that are not the thinker: the speech generator, never trained here.
NOT_THINKER = re.compile(r"^(talker|token2wav)\.")
THINKER_PREFIX = {r"^thinker\.": ""}


def thinker_config_dict(ckpt_dir: str | Path) -> dict[str, Any]:
    """The thinker's config as a dict: config.json itself (a thinker checkpoint) or its ``thinker_config``
    (a full Qwen2.5-Omni checkpoint). A full checkpoint without one is an error naming the file."""
    raw = checkpoint_config(ckpt_dir)
    kind = raw.get("model_type")
    if kind == FULL_MODEL_TYPE:
        thinker = raw.get("thinker_config")
        if not isinstance(thinker, dict):
            raise CheckpointError(f"{Path(ckpt_dir) / 'config.json'}: a {FULL_MODEL_TYPE} checkpoint without a "
                                  "thinker_config: there is no thinker to train")
        out = dict(Qwen2_5OmniThinkerConfig(**thinker).to_dict())
        out.update({k: v for k, v in thinker.items() if not isinstance(v, dict)})
        return out
    if kind == THINKER_MODEL_TYPE:
        out = dict(Qwen2_5OmniThinkerConfig.from_pretrained(str(ckpt_dir)).to_dict())
        out.update({k: v for k, v in raw.items() if not isinstance(v, dict)})
        return out
    raise CheckpointError(f"{Path(ckpt_dir) / 'config.json'}: model_type {kind!r} is not a Qwen2.5-Omni checkpoint "
                          f"({FULL_MODEL_TYPE} or {THINKER_MODEL_TYPE})")


class QwenOmniThinkerPolicy(CompletionLogprobs, Qwen2_5OmniThinkerForConditionalGeneration):
    """The thinker with the project's policy interface: embed_prompts, prompt_positions, tower_features and the
    training forwards of CompletionLogprobs."""

    every_forward_runs: dict[str, str] = {}
    decode_positions: DecodePositions | None = None

    def towers(self) -> dict[str, torch.nn.Module]:
        """The encoders, each with its own projection (the vision merger, the audio proj)."""
        return {"vision": self.visual, "audio": self.audio_tower}

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in self.model.layers:
            layer._can_checkpoint_with_cache = True

    # ---- towers ----
    def _video_tokens(self, prompts: Sequence[MMPrompt], idx: list[int]) -> list[torch.Tensor]:
        grids = torch.tensor([prompts[i].video_grid_thw for i in idx], device=self.device)
        pixels = torch.cat([prompts[i].pixel_values for i in idx]).to(self.device)
        out = self.visual(pixels.to(self.visual.dtype), grid_thw=grids).pooler_output
        return list(out.split((grids.prod(-1) // self.visual.spatial_merge_size**2).tolist()))

    def _audio_tokens(self, prompts: Sequence[MMPrompt], idx: list[int]) -> list[torch.Tensor]:
        feats = [prompts[i].audio_features for i in idx]
        lens = torch.tensor([f.shape[1] for f in feats], device=self.device)
        flat = torch.cat(feats, dim=1).to(device=self.device, dtype=self.audio_tower.conv1.weight.dtype)
        cnn_lens, out_lens = self.audio_tower._get_feat_extract_output_lengths(lens)
        out = self.audio_tower(flat, feature_lens=lens, aftercnn_lens=cnn_lens).last_hidden_state
        return list(out.split(out_lens.tolist()))

    def _modality(self, prompts: Sequence[MMPrompt], kind: str) -> dict[int, torch.Tensor]:
        """One modality's tokens per prompt index: shipped tower outputs where a prompt has them, else the
        tower run on its raw input."""
        raw, shipped = ("pixel_values", "vision_feats") if kind == "video" else ("audio_features", "audio_feats")
        out = {i: getattr(p, shipped).to(self.device) for i, p in enumerate(prompts) if getattr(p, shipped, None) is not None}
        idx = [i for i, p in enumerate(prompts) if i not in out and getattr(p, raw, None) is not None]
        if idx:
            run = self._video_tokens if kind == "video" else self._audio_tokens
            out.update(zip(idx, run(prompts, idx), strict=True))
        return out

    @torch.no_grad()
    def tower_features(self, prompts: Sequence[MMPrompt], vision: bool, audio: bool
                       ) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Each prompt's (video, audio) tower output: the LM-sized token embeddings themselves."""
        v = self._modality(prompts, "video") if vision else {}
        a = self._modality(prompts, "audio") if audio else {}
        return [(v.get(i), a.get(i)) for i in range(len(prompts))]

    def _placeholder(self, kind: str) -> torch.Tensor:
        """The tower on one smallest all-zero input, for every_forward_runs="raw" (see HumanOmni's)."""
        if kind == "video":
            vc = self.config.vision_config
            m = vc.spatial_merge_size
            pixels = torch.zeros(m * m, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2,
                                 device=self.device, dtype=self.visual.dtype)
            return self.visual(pixels, grid_thw=torch.tensor([[1, m, m]], device=self.device)).pooler_output
        ac = self.config.audio_config
        feats = torch.zeros(ac.num_mel_bins, 8, device=self.device, dtype=self.audio_tower.conv1.weight.dtype)
        lens = torch.tensor([8], device=self.device)
        return self.audio_tower(feats, feature_lens=lens, aftercnn_lens=self.audio_tower._get_feat_extract_output_lengths(lens)[0]
                                ).last_hidden_state

    # ---- prompt ----
    def embed_prompts(self, prompts: Sequence[MMPrompt]) -> list[torch.Tensor]:
        """Token embeddings with the tower outputs written over the <|VIDEO|> / <|AUDIO|> placeholders, in
        order: list of [L_i, H]. Under ZeRO-3 every rank gathers the same modules in the same order: video
        tower (or its zero-input stand-in), audio tower (or its stand-in), then the embedding table."""
        cfg = self.config
        feats, anchors = {}, []
        for kind in ("video", "audio"):
            feats[kind] = self._modality(prompts, kind)
            if not feats[kind] and self.every_forward_runs.get(kind) == "raw":
                anchors.append(self._placeholder(kind).sum() * 0.0)  # zero-valued, but on the graph
        ids = [torch.tensor(p.prompt_ids, dtype=torch.long, device=self.device) for p in prompts]
        emb = self.get_input_embeddings()(torch.cat(ids)).split([len(x) for x in ids])  # one call (ZeRO-3)
        out = []
        for i, (row, e) in enumerate(zip(ids, emb, strict=True)):
            for kind, tok in (("video", cfg.video_token_index), ("audio", cfg.audio_token_index)):
                where = row == tok
                n = int(where.sum())
                if n == 0:
                    continue
                if i not in feats[kind]:
                    raise ValueError(f"prompt {i} has {n} {kind} placeholder(s) but no {kind} input")
                if feats[kind][i].shape[0] != n:
                    raise ValueError(f"prompt {i}: {n} {kind} placeholder(s) but {feats[kind][i].shape[0]} {kind} tokens")
                e = e.masked_scatter(where[:, None], feats[kind][i].to(e.dtype))
            out.append(e)
        for anchor in anchors:
            if out:
                out[0] = out[0] + anchor.to(out[0].dtype)
        return out

    def prompt_positions(self, prompts: Sequence[MMPrompt]) -> list[torch.Tensor]:
        """Each prompt's [3, L] TMRoPE positions (from the processor); a text-only prompt without them counts
        0..L-1 on every axis."""
        rows = []
        for p in prompts:
            pos = getattr(p, "positions", None)
            if pos is None:
                pos = torch.arange(len(p.prompt_ids)).expand(3, -1)
            elif pos.shape != (3, len(p.prompt_ids)):
                raise ValueError(f"positions {tuple(pos.shape)} do not fit a {len(p.prompt_ids)}-token prompt")
            rows.append(pos.to(self.device))
        return rows

    # ---- generate() ----
    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        # The thinker's own version reads (and keeps) rope deltas from earlier calls; under decode_positions the
        # forward below ignores generate()'s positions, so the plain ones are enough.
        if self.decode_positions is not None:
            return GenerationMixin._prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs)
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)

    @functools.wraps(Qwen2_5OmniThinkerForConditionalGeneration.forward)  # generate() reads its signature
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' forward, except inside the rollout engine's generate(), where the input is always
        embeddings (then the drawn ids) and the positions come from ``decode_positions`` (generate() would derive
        1-D ones)."""
        dp = self.decode_positions
        if dp is None:
            return super().forward(*args, **kwargs)
        x = kwargs.get("inputs_embeds")
        if x is None:  # decoding steps after the first feed the drawn token ids
            x = self.get_input_embeddings()(kwargs["input_ids"])
        cache = kwargs.get("past_key_values")
        start = cache.get_seq_length() if cache is not None else 0
        out = self.model(inputs_embeds=x, attention_mask=kwargs.get("attention_mask"),
                         position_ids=dp.columns(start, x.shape[1]), past_key_values=cache,
                         use_cache=kwargs.get("use_cache", True))
        return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state[:, -1:]),
                                      past_key_values=out.past_key_values)


def load_qwen_omni(ckpt_dir: str | Path, dtype: str = "auto") -> QwenOmniThinkerPolicy:
    """The thinker from a local directory, strictly (see the module docstring)."""
    path = Path(ckpt_dir)
    raw = checkpoint_config(path)
    thinker = thinker_config_dict(path)
    config = Qwen2_5OmniThinkerConfig(**{k: v for k, v in thinker.items() if k not in ("model_type", "transformers_version")})
    full = raw.get("model_type") == FULL_MODEL_TYPE
    # transformers would log a table of the ~1k talker/token2wav tensors on every load (and, as the thinker's
    # tensor-parallel plan names the text model alone, every other layer as "not sharded"): the checks below
    # name anything that matters, and one line says what was skipped.
    quiet = [logging.getLogger(f"transformers.{m}") for m in ("modeling_utils", "distributed.tensor_parallel")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        model, info = QwenOmniThinkerPolicy.from_pretrained(
            str(path), config=config, dtype=resolve_dtype(dtype), local_files_only=True,
            key_mapping=THINKER_PREFIX if full else None, output_loading_info=True,
        )
    finally:
        for q, lv in zip(quiet, levels, strict=True):
            q.setLevel(lv)
    missing = sorted(set(info.get("missing_keys", ())))
    unexpected = sorted(set(info.get("unexpected_keys", ())))
    if info.get("mismatched_keys"):
        raise CheckpointError(f"{path}: tensors of the wrong shape: {_short_list([str(k) for k in info['mismatched_keys']])}")
    skipped = [k for k in unexpected if NOT_THINKER.match(k)]
    bad = [k for k in unexpected if not NOT_THINKER.match(k)]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} thinker parameter(s) missing from the checkpoint: "
                              f"{_short_list(missing)}")
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensor(s) in the checkpoint that the thinker has no place for: "
                              f"{_short_list(bad)}")
    if skipped:
        log.info("%s: skipped %d talker/token2wav tensor(s) (speech output, not trained)", path, len(skipped))
    return model


class QwenOmniFamily(PolicyFamily):
    name = "qwen2_5_omni"
    model_types = (FULL_MODEL_TYPE, THINKER_MODEL_TYPE)

    def check(self, ckpt_dir: str | Path) -> None:
        thinker_config_dict(ckpt_dir)  # a full checkpoint without a thinker is refused here

    def load_policy(self, ckpt_dir: str | Path, mc: ModelConfig) -> QwenOmniThinkerPolicy:
        return load_qwen_omni(ckpt_dir, mc.dtype)

    def load_processor(self, ckpt_dir: str | Path, mc: ModelConfig, input_style: str) -> Any:
        from r1omni_ray.data.qwen_omni_processor import QwenOmniProcessor

        return QwenOmniProcessor.from_pretrained(ckpt_dir, use_audio_in_video=mc.use_audio_in_video,
                                                 system_prompt=mc.system_prompt, max_prompt_tokens=mc.max_prompt_tokens)

    def make_tiny(self, out_dir: Path, corpus: tuple[str, ...], seed: int, hidden_size: int, num_layers: int) -> Path:
        from r1omni_ray.tiny.qwen_omni import TinyOmniSizes, make_tiny_qwen_omni_checkpoint

        sizes = TinyOmniSizes(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers)
        return make_tiny_qwen_omni_checkpoint(out_dir, corpus, sizes, seed=seed)


FAMILY = QwenOmniFamily()
