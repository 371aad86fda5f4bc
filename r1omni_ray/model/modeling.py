"""HumanOmni-style omni-modal policy: SigLIP frames + Whisper audio spliced into a Qwen2 LM.

Parameter names are those the reference HumanOmni code writes (checked against
shared/reference/r1omni_0.5b_checkpoint_keys.json by tests/unit/test_checkpoint_layout.py):
``model.vision_tower.vision_tower.vision_model.*`` (SigLIP as transformers 4.x nests it),
``model.mm_projector.*``, ``model.audio_tower.audio_tower.encoder.*`` (the encoder of
``WhisperForAudioClassification``), ``model.audio_projector.*``, ``model.bert_model.*`` + ``model.bert_gate.*``
(the instruction-conditioned gate over the vision projector's branches), ``model.layers.*`` / ``lm_head``.
The tower configs must be embedded in the config (``vision_config`` / ``audio_config`` / ``bert_config``);
``r1omni_ray.model.loading.load_policy`` fills them from the tower folders of a published checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    Qwen2ForCausalLM,
    Qwen2Model,
    SiglipVisionConfig,
    SiglipVisionModel,
    WhisperConfig,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from r1omni_ray.labels import AUDIO_TOKEN_INDEX, VIDEO_TOKEN_INDEX
from r1omni_ray.model.configuration import HumanOmniQwen2Config
from r1omni_ray.model.logprobs import CompletionLogprobs
from r1omni_ray.model.projectors import AllInOneSmall, sampled_side

NUM_VISION_BRANCHES = 3  # video, body, face (HumanOmni)
GATED_PROJECTORS = ("gated_mlp", "all_in_one_small")  # projectors whose branches the BERT gate mixes
# Per modality: (raw input field, shipped tower-output field) of a prompt (MMPrompt).
_MODALITY_FIELDS = {"video": ("pixel_values", "vision_feats"), "audio": ("audio_features", "audio_feats")}


class MMPrompt(Protocol):
    """What the model needs of one processed prompt (r1omni_ray.data.processor.OmniInputs fits). A frozen
    tower's output may come precomputed (``vision_feats`` / ``audio_feats``, see ``tower_features``), so the
    tower does not run again; otherwise the raw ``pixel_values`` / ``audio_features`` go through it."""

    prompt_ids: list[int]
    pixel_values: torch.Tensor | None
    audio_features: torch.Tensor | None
    bert_input_ids: list[int]
    vision_feats: torch.Tensor | None  # [T, patches, C]: the vision tower's output for the projector
    audio_feats: torch.Tensor | None  # [tokens, d]: the audio tower's output, pooled, for the projector


def _sub_config(cls: type, embedded: dict[str, Any] | None, what: str) -> Any:
    if embedded:
        d = {k: v for k, v in embedded.items() if k not in ("model_type", "transformers_version")}
        return cls(**d)
    raise ValueError(
        f"config has no {what}_config: load a published checkpoint with r1omni_ray.model.loading.load_policy, "
        "which reads it from the tower folder"
    )


class _Nest(nn.Module):
    """One level of module nesting, so parameter names match what the reference code writes."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def build_mlp(depth: int, in_dim: int, out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(1, depth):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def _mlp_depth(projector_type: str) -> int | None:
    m = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    return int(m.group(1)) if m else None


class SiglipVisionTower(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig, select_layer: int) -> None:
        super().__init__()
        # transformers 4.x SiglipVisionModel held a `vision_model`; 5.x is flat, so the nesting is ours.
        self.vision_tower = _Nest(vision_model=SiglipVisionModel(cfg))
        self.select_layer = select_layer
        self.patches_per_side = cfg.image_size // cfg.patch_size

    @property
    def siglip(self) -> SiglipVisionModel:
        return self.vision_tower.vision_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.siglip.parameters()).dtype
        out = self.siglip(pixel_values.to(dtype), output_hidden_states=True)
        return out.hidden_states[self.select_layer]  # [N, patches, C]; SigLIP has no CLS token


class WhisperAudioTower(nn.Module):
    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__()
        # The reference keeps WhisperForAudioClassification and calls its `.encoder`; its classifier and
        # projector are never used, so only the encoder is built (their checkpoint tensors are skipped).
        self.audio_tower = _Nest(encoder=WhisperEncoder(cfg))

    @property
    def encoder(self) -> WhisperEncoder:
        return self.audio_tower.encoder

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        dtype = next(self.encoder.parameters()).dtype
        return self.encoder(features.to(dtype)).last_hidden_state  # [B, frames/2, d]


class GatedVisionProjector(nn.Module):
    """Three MLP branches mixed per sample by the BERT gate (HumanOmni's video/body/face idea)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.readout_video = build_mlp(2, in_dim, out_dim)
        self.readout_body = build_mlp(2, in_dim, out_dim)
        self.mlp_2xgelu_face = build_mlp(2, in_dim, out_dim)

    def forward(self, feats: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        # feats [B, T, P, C], gate [B, 3] -> [B, T, P, H]
        branches = torch.stack(
            [self.readout_video(feats), self.readout_body(feats), self.mlp_2xgelu_face(feats)], dim=-1
        )
        return (branches * gate[:, None, None, None, :].to(branches.dtype)).sum(-1)


class HumanOmniQwen2Model(Qwen2Model):
    config_class = HumanOmniQwen2Config

    def __init__(self, config: HumanOmniQwen2Config) -> None:
        super().__init__(config)
        vcfg = _sub_config(SiglipVisionConfig, config.vision_config, "vision")
        # Only hidden states are used; the attention-pooling head would be dead weight (and its
        # nn.MultiheadAttention reads weights outside submodule forwards, which ZeRO-3 cannot gather).
        vcfg.vision_use_head = False
        acfg = _sub_config(WhisperConfig, config.audio_config, "audio")
        self.vision_tower = SiglipVisionTower(vcfg, config.mm_vision_select_layer)
        self.audio_tower = WhisperAudioTower(acfg)
        config.mm_hidden_size = vcfg.hidden_size
        config.audio_hidden_size = acfg.d_model
        if config.mm_projector_type == "gated_mlp":
            self.mm_projector: nn.Module = GatedVisionProjector(vcfg.hidden_size, config.hidden_size)
        elif config.mm_projector_type == "all_in_one_small":
            # HumanOmni-0.5B / R1-Omni-0.5B: the gate mixes the video/body branches (2x2-downsampled by the
            # conv sampler) with the face branch (2x2-pooled per frame), so both grids must come out equal.
            side = vcfg.image_size // vcfg.patch_size
            stride = max(config.vision_pool_stride, 1)
            if sampled_side(side) != -(-side // stride):
                raise ValueError(
                    f"mm_projector_type='all_in_one_small' with {side}x{side} patches gives "
                    f"{sampled_side(side)}x{sampled_side(side)} video/body tokens per frame but "
                    f"vision_pool_stride={config.vision_pool_stride} pools the face branch to "
                    f"{-(-side // stride)}x{-(-side // stride)}; use an even patch grid and "
                    "vision_pool_stride=2"
                )
            self.mm_projector = AllInOneSmall(vcfg.hidden_size, config.hidden_size)
        elif (depth := _mlp_depth(config.mm_projector_type)) is not None:
            self.mm_projector = build_mlp(depth, vcfg.hidden_size, config.hidden_size)
        elif config.mm_projector_type == "linear":
            self.mm_projector = nn.Linear(vcfg.hidden_size, config.hidden_size)
        else:
            raise ValueError(
                f"config.json field mm_projector_type={config.mm_projector_type!r} is not supported "
                "(supported: gated_mlp, all_in_one_small, linear, mlpNx_gelu)"
            )
        adepth = _mlp_depth(config.mm_audio_projector_type)
        if adepth is None:
            raise ValueError(f"config.json field mm_audio_projector_type={config.mm_audio_projector_type!r}")
        self.audio_projector = build_mlp(adepth, acfg.d_model, config.hidden_size)
        if config.mm_projector_type in GATED_PROJECTORS:
            bcfg = _sub_config(BertConfig, config.bert_config, "bert")
            self.bert_model = BertModel(bcfg)
            self.bert_gate = nn.Sequential(
                nn.Linear(bcfg.hidden_size, config.bert_gate_hidden_size),
                nn.GELU(),
                nn.Linear(config.bert_gate_hidden_size, NUM_VISION_BRANCHES),
            )
        # Embed the tower configs so a saved checkpoint is self-contained.
        config.vision_config = vcfg.to_dict()
        config.audio_config = acfg.to_dict()
        if hasattr(self, "bert_model"):
            config.bert_config = self.bert_model.config.to_dict()
        self.post_init()


class HumanOmniQwen2ForCausalLM(CompletionLogprobs, Qwen2ForCausalLM):
    config_class = HumanOmniQwen2Config
    # Modality -> "features" | "raw": what every forward runs for that modality even when no prompt of the
    # batch has it (a clip without audio, a rank whose micro-batch is text-only). Under ZeRO-3 each module's
    # forward and backward gathers its parameters collectively, so every rank must run the same modules in
    # the same order; the learners set this, a rollout engine or a reference model never does.
    every_forward_runs: dict[str, str] = {}

    def __init__(self, config: HumanOmniQwen2Config) -> None:
        super().__init__(config)
        self.model = HumanOmniQwen2Model(config)
        self.post_init()

    def towers(self) -> dict[str, nn.Module]:
        """The frozen-able encoders by kind (vision, audio, bert): what model.freeze_* and the reference act on."""
        m = self.model
        out = {"vision": m.vision_tower, "audio": m.audio_tower}
        if hasattr(m, "bert_model"):
            out["bert"] = m.bert_model
        return out

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each layer's activations in backward instead of keeping them (learner.gradient_checkpointing).
        Non-reentrant, so the shared prompt's keys/values, which leave the checkpointed layers through the
        cache, still carry gradients; the LM layers keep their cache under checkpointing, which is safe because
        the shared-prefix caches are never written twice (model/prefix_cache.py)."""
        self.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in self.model.layers:
            layer._can_checkpoint_with_cache = True

    # ---- multimodal encoding ----
    def _vision_gate(self, bert_ids: Sequence[Sequence[int]]) -> torch.Tensor | None:
        m = self.model
        if not hasattr(m, "bert_model"):
            return None
        dev = self.device
        width = max(len(b) for b in bert_ids)
        ids = torch.zeros(len(bert_ids), width, dtype=torch.long, device=dev)
        att = torch.zeros_like(ids)
        for i, b in enumerate(bert_ids):
            ids[i, : len(b)] = torch.tensor(b, dtype=torch.long)
            att[i, : len(b)] = 1
        cls = m.bert_model(input_ids=ids, attention_mask=att).last_hidden_state[:, 0]
        return torch.softmax(m.bert_gate(cls), dim=-1)

    def vision_tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, T, 3, H, W] -> the vision tower's output [B, T, patches, C] (projector input)."""
        b, t = pixel_values.shape[:2]
        feats = self.model.vision_tower(pixel_values.flatten(0, 1).to(self.device))
        return feats.view(b, t, feats.shape[1], feats.shape[2])

    def project_video(self, feats: torch.Tensor, bert_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Tower output [B, T, patches, C] -> visual tokens [B, T * pooled patches, hidden]."""
        m = self.model
        b, t = feats.shape[:2]
        feats = feats.to(self.device)
        if isinstance(m.mm_projector, AllInOneSmall):
            return self._encode_all_in_one(feats, bert_ids)
        feats = feats.to(next(m.mm_projector.parameters()).dtype)
        if isinstance(m.mm_projector, GatedVisionProjector):
            gate = self._vision_gate(bert_ids)
            proj = m.mm_projector(feats, gate)
        else:
            proj = m.mm_projector(feats)
        return self._pool_frames(proj, b, t)

    def encode_video(self, pixel_values: torch.Tensor, bert_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """pixel_values [B, T, 3, H, W] -> visual tokens [B, T * pooled patches, hidden]."""
        return self.project_video(self.vision_tower_features(pixel_values), bert_ids)

    def _pool_frames(self, proj: torch.Tensor, b: int, t: int) -> torch.Tensor:
        """Spatial pooling per frame as HumanOmni's get_2dPool (bilinear to ceil(side / stride)):
        proj [B, T, side*side, H] (or [B*T, ...]) -> [B, T * pooled patches, H]."""
        vc = self.config.vision_config  # not the tower module: a reference model may hold no towers
        side = vc["image_size"] // vc["patch_size"]
        s = self.config.vision_pool_stride
        x = proj.reshape(b * t, side, side, -1).permute(0, 3, 1, 2)
        if s > 1:
            x = F.interpolate(x, size=(-(-side // s), -(-side // s)), mode="bilinear")
        return x.permute(0, 2, 3, 1).reshape(b, -1, x.shape[1])

    def _encode_all_in_one(self, feats: torch.Tensor, bert_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """HumanOmni all_in_one_small: feats [B, T, P, C] -> gate-mixed video/body/face tokens [B, N, H]."""
        m = self.model
        b, t = feats.shape[:2]
        feats = feats.to(m.mm_projector.mlp_2xgelu_face[0].weight.dtype)
        # HumanOmni feeds the same SigLIP features to all three branches (body = video; face = per frame).
        video, body, face = m.mm_projector(feats, feats, feats.flatten(0, 1))
        face = self._pool_frames(face, b, t)
        if not video.shape == body.shape == face.shape:
            raise ValueError(
                f"all_in_one_small branch token counts differ: video {tuple(video.shape)}, "
                f"body {tuple(body.shape)}, face {tuple(face.shape)}"
            )
        gate = self._vision_gate(bert_ids).to(video.dtype)  # [B, 3] softmax weights
        return video * gate[:, 0, None, None] + body * gate[:, 1, None, None] + face * gate[:, 2, None, None]

    def audio_tower_features(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, n_mels, frames] -> the audio tower's output pooled by audio_pool_stride
        [B, frames / 2 / stride, d] (projector input; a third of Whisper's last_hidden_state at stride 3)."""
        h = self.model.audio_tower(features.to(self.device)).transpose(1, 2)
        h = F.avg_pool1d(h, kernel_size=self.config.audio_pool_stride, stride=self.config.audio_pool_stride)
        return h.transpose(1, 2)

    def project_audio(self, feats: torch.Tensor) -> torch.Tensor:
        proj = self.model.audio_projector
        return proj(feats.to(device=self.device, dtype=proj[0].weight.dtype))

    def encode_audio(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, n_mels, frames] -> audio tokens [B, frames / 2 / stride, hidden]."""
        return self.project_audio(self.audio_tower_features(features))

    def _run_tower(self, prompts: Sequence[MMPrompt], kind: str, skip: Collection[int] = ()
                   ) -> dict[int, torch.Tensor]:
        """One tower's output for every prompt (index) with that raw input, except those in ``skip``."""
        raw_name = _MODALITY_FIELDS[kind][0]
        idx = [i for i, p in enumerate(prompts) if i not in skip and getattr(p, raw_name) is not None]
        if not idx:
            return {}
        tower = self.vision_tower_features if kind == "video" else self.audio_tower_features
        return dict(zip(idx, tower(torch.stack([getattr(prompts[i], raw_name) for i in idx])), strict=True))

    @torch.no_grad()
    def tower_features(self, prompts: Sequence[MMPrompt], vision: bool, audio: bool
                       ) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Each prompt's (vision, audio) tower output, for the towers asked (None where not asked or the prompt
        has no such input): what a rollout worker ships instead of the raw media when the towers are frozen."""
        v = self._run_tower(prompts, "video") if vision else {}
        a = self._run_tower(prompts, "audio") if audio else {}
        return [(v.get(i), a.get(i)) for i in range(len(prompts))]

    def _modality_tokens(self, prompts: Sequence[MMPrompt], kind: str) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """Projected tokens of one modality per prompt index, from shipped tower features where a prompt has
        them, else by running the tower on its raw input (both kinds may share a batch). The second value is
        a zero-valued anchor when no prompt had this modality and ``every_forward_runs`` asks for it anyway."""
        feat_name = _MODALITY_FIELDS[kind][1]
        feats = {i: getattr(p, feat_name).to(self.device) for i, p in enumerate(prompts)
                 if getattr(p, feat_name, None) is not None}
        feats |= self._run_tower(prompts, kind, skip=feats)
        if not feats:
            mode = self.every_forward_runs.get(kind)
            return {}, (None if mode is None else self._placeholder_tokens(kind, mode).sum() * 0.0)
        order = sorted(feats)
        stacked = torch.stack([feats[i].to(feats[order[0]].dtype) for i in order])
        if kind == "video":
            out = self.project_video(stacked, [prompts[i].bert_input_ids for i in order])
        else:
            out = self.project_audio(stacked)
        return dict(zip(order, out, strict=True)), None

    def _placeholder_tokens(self, kind: str, mode: str) -> torch.Tensor:
        """The modality's modules (the tower too for "raw", the BERT gate for video) on one all-zero input of the
        shape they expect; only the collectives and a zero-valued graph edge are wanted."""
        dtype = self.get_input_embeddings().weight.dtype
        if kind == "video":
            vc = self.config.vision_config
            if mode == "raw":
                pixels = torch.zeros(1, 1, 3, vc["image_size"], vc["image_size"], device=self.device, dtype=dtype)
                feats = self.vision_tower_features(pixels)
            else:
                side = vc["image_size"] // vc["patch_size"]
                feats = torch.zeros(1, 1, side * side, vc["hidden_size"], device=self.device, dtype=dtype)
            return self.project_video(feats, [[0]])
        ac = self.config.audio_config
        if mode == "raw":  # Whisper takes exactly its 30 s window: 2 mel frames per encoder position
            mels = torch.zeros(1, ac["num_mel_bins"], 2 * ac["max_source_positions"], device=self.device, dtype=dtype)
            feats = self.audio_tower_features(mels)
        else:
            feats = torch.zeros(1, 1, ac["d_model"], device=self.device, dtype=dtype)
        return self.project_audio(feats)

    def embed_prompts(self, prompts: Sequence[MMPrompt]) -> list[torch.Tensor]:
        """Token embeddings with video/audio features spliced in at the placeholder ids: list of [L_i, H]."""
        vfeat, vanchor = self._modality_tokens(prompts, "video")
        afeat, aanchor = self._modality_tokens(prompts, "audio")
        ids = [torch.tensor(p.prompt_ids, dtype=torch.long, device=self.device) for p in prompts]
        flat = torch.cat(ids)
        placeholder = (flat == VIDEO_TOKEN_INDEX) | (flat == AUDIO_TOKEN_INDEX)
        # One embedding call for the whole batch: under ZeRO-3 each call gathers the table, so the number of
        # calls must not depend on how many placeholders the prompts of this rank happen to have.
        tokens = self.get_input_embeddings()(flat.masked_fill(placeholder, 0)).split([len(x) for x in ids])
        result = []
        for i, (row, emb) in enumerate(zip(ids, tokens, strict=True)):
            pieces: list[torch.Tensor] = []
            start = 0
            for pos in ((row == VIDEO_TOKEN_INDEX) | (row == AUDIO_TOKEN_INDEX)).nonzero().flatten().tolist():
                pieces.append(emb[start:pos])
                kind = int(row[pos])
                feats = vfeat if kind == VIDEO_TOKEN_INDEX else afeat
                if i not in feats:
                    name = "video" if kind == VIDEO_TOKEN_INDEX else "audio"
                    raise ValueError(f"prompt {i} has a <{name}> placeholder but no {name} input")
                pieces.append(feats[i].to(emb.dtype))
                start = pos + 1
            pieces.append(emb[start:])
            result.append(torch.cat(pieces, dim=0))
        for anchor in (vanchor, aanchor):  # zero-valued, but on the graph: backward runs those modules too
            if anchor is not None and result:
                result[0] = result[0] + anchor.to(result[0].dtype)
        return result


AutoConfig.register(HumanOmniQwen2Config.model_type, HumanOmniQwen2Config, exist_ok=True)
AutoModelForCausalLM.register(HumanOmniQwen2Config, HumanOmniQwen2ForCausalLM, exist_ok=True)
