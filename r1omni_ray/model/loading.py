"""Load a policy from a local checkpoint directory, strictly (tiny checkpoints: r1omni_ray/tiny/).

Strict means: every parameter comes from the checkpoint, or (for a whole tower the checkpoint lacks) from
that tower's own folder, as the reference code loads it; anything else missing is an error naming the keys.
Unexpected tensors are an error too, except the few that the reference forward never reads.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from transformers import BertConfig, SiglipVisionConfig, WhisperConfig

from r1omni_ray.model.configuration import HumanOmniQwen2Config
from r1omni_ray.model.modeling import GATED_PROJECTORS, HumanOmniQwen2ForCausalLM
from r1omni_ray.model.towers import TowerPaths, tower_dir

log = logging.getLogger(__name__)

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
AUDIO_PREFIX = "model.audio_tower.audio_tower.encoder."
BERT_PREFIX = "model.bert_model."

# Tensors a reference checkpoint holds that the forward never reads: SigLIP's attention-pooling head and
# the classifier/projector of WhisperForAudioClassification (see not_used_in_forward in
# shared/reference/r1omni_0.5b_checkpoint_keys.json). Skipped, and reported once.
UNUSED_IN_FORWARD = re.compile(
    r"^model\.vision_tower\.vision_tower\.vision_model\.head\."
    r"|^model\.audio_tower\.audio_tower\.(classifier|projector)\."
)

# Exports of this project before the reference layout was adopted: SigLIP and the Whisper encoder sat
# directly under their tower (no `vision_model.` / `encoder.` level). Renamed on load.
LEGACY_KEY_MAPPING = {
    r"^model\.vision_tower\.vision_tower\.(embeddings|encoder|post_layernorm|head)\.":
        r"model.vision_tower.vision_tower.vision_model.\1.",
    r"^model\.audio_tower\.audio_tower\.(conv1|conv2|embed_positions|layers|layer_norm)\.":
        r"model.audio_tower.audio_tower.encoder.\1.",
}


class CheckpointError(ValueError):
    """A checkpoint does not hold what the model needs; the message names the directory and the keys."""


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def load_model_config(ckpt_dir: str | Path, towers: TowerPaths = TowerPaths()) -> HumanOmniQwen2Config:
    """config.json with every tower config embedded: from the config itself (our exports) or from the
    tower folders (the published checkpoint, which only names them)."""
    path = Path(ckpt_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    config = HumanOmniQwen2Config.from_pretrained(str(path), local_files_only=True)
    # A SiglipModel / Whisper* / Bert* folder's config.json: from_pretrained takes the sub-config.
    if not config.vision_config:
        config.vision_config = SiglipVisionConfig.from_pretrained(str(tower_dir(path, "vision", towers))).to_dict()
    if not config.audio_config:
        config.audio_config = WhisperConfig.from_pretrained(str(tower_dir(path, "audio", towers))).to_dict()
    if not config.bert_config and config.mm_projector_type in GATED_PROJECTORS:
        config.bert_config = BertConfig.from_pretrained(str(tower_dir(path, "bert", towers))).to_dict()
    return config


def _weights_folder(ckpt_dir: Path, which: str, towers: TowerPaths) -> Path | None:
    """The tower's folder when it exists and holds weights, else None."""
    try:
        folder = tower_dir(ckpt_dir, which, towers)
    except FileNotFoundError:
        return None
    has = any(any(folder.glob(pat)) for pat in ("*.safetensors", "pytorch_model*.bin", "model*.bin"))
    return folder if has else None


# Tensors a tower folder may lack without changing the forward: BERT's pooler runs but its output is never
# read (the gate takes the [CLS] hidden state); WhisperForAudioClassification's heads are not ours.
_FOLDER_MAY_LACK = re.compile(r"^(pooler\.|classifier\.|projector\.)")


def _load_tower_from_folder(model: HumanOmniQwen2ForCausalLM, which: str, folder: Path, dtype: torch.dtype) -> None:
    """Copy one tower's weights from its own folder, as the reference builds its towers."""
    from transformers import BertModel, SiglipVisionModel, WhisperForAudioClassification

    m = model.model
    if which == "vision":
        src, info = SiglipVisionModel.from_pretrained(str(folder), dtype=dtype, vision_use_head=False,
                                                      output_loading_info=True)
        dst = m.vision_tower.siglip
    elif which == "audio":
        src, info = WhisperForAudioClassification.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
        src, dst = src.encoder, m.audio_tower.encoder
    else:
        src, info = BertModel.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
        dst = m.bert_model
    lacking = sorted(k for k in info.get("missing_keys", ()) if not _FOLDER_MAY_LACK.match(k))
    if lacking:
        raise CheckpointError(f"{folder}: the {which} tower folder lacks {len(lacking)} weight(s): {_short_list(lacking)}")
    dst.load_state_dict(src.state_dict(), strict=True)


def _short_list(keys: list[str], n: int = 8) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def learner_attention(requested: str, device: torch.device, dtype: torch.dtype, flash_installed: bool) -> str:
    """The LM attention the learners use (learner.attn_implementation; see the config)."""
    usable = flash_installed and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    if requested == "flash_attention_2" and not usable:
        why = "the flash-attn package is not installed" if not flash_installed else "it needs bf16/fp16 on a GPU"
        raise ValueError(f"learner.attn_implementation=flash_attention_2: {why} (auto picks sdpa then)")
    if requested == "auto":
        return "flash_attention_2" if usable else "sdpa"
    return requested


def set_lm_attention(model: torch.nn.Module, implementation: str) -> None:
    """The decoder layers read their config's choice at every forward: the LM's (HumanOmni's top-level config,
    a composite model's text config, where setting the top level would change the towers' too)."""
    model.model.config._attn_implementation = implementation


def load_policy(
    ckpt_dir: str | Path, dtype: str = "auto", towers: TowerPaths = TowerPaths()
) -> HumanOmniQwen2ForCausalLM:
    """from_pretrained on a local directory (never the hub), strict about what it loads."""
    path = Path(ckpt_dir)
    config = load_model_config(path, towers)
    torch_dtype = resolve_dtype(dtype)
    model, info = HumanOmniQwen2ForCausalLM.from_pretrained(
        str(path), config=config, dtype=torch_dtype, local_files_only=True,
        key_mapping=LEGACY_KEY_MAPPING, output_loading_info=True,
    )
    missing = sorted(set(info.get("missing_keys", ())))
    unexpected = sorted(set(info.get("unexpected_keys", ())))
    mismatched = info.get("mismatched_keys", ())
    if mismatched:
        raise CheckpointError(f"{path}: tensors of the wrong shape: {_short_list([str(k) for k in mismatched])}")

    for prefix, which in ((VISION_PREFIX, "vision"), (AUDIO_PREFIX, "audio"), (BERT_PREFIX, "bert")):
        tower_missing = [k for k in missing if k.startswith(prefix)]
        if not tower_missing:
            continue
        # Only a tower the checkpoint lacks entirely comes from its folder; a partial one is corrupt.
        tower_keys = [k for k in model.state_dict() if k.startswith(prefix)]
        folder = _weights_folder(path, which, towers)
        if len(tower_missing) == len(tower_keys) and folder is not None:
            _load_tower_from_folder(model, which, folder, torch_dtype)
            log.warning("%s: the checkpoint has no %s tower weights; loaded them from %s", path, which, folder)
            missing = [k for k in missing if not k.startswith(prefix)]
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} parameter(s) missing from the checkpoint (and not loadable from a tower "
            f"folder): {_short_list(missing)}"
        )
    bad = [k for k in unexpected if not UNUSED_IN_FORWARD.search(k)]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensor(s) in the checkpoint that the model has no place for: "
                              f"{_short_list(bad)}")
    if unexpected:
        log.info("%s: skipped %d tensor(s) the forward never reads: %s", path, len(unexpected), _short_list(unexpected))
    return model


def freeze_modules(model: torch.nn.Module, vision: bool, audio: bool, bert: bool) -> None:
    """Frozen towers get no gradients (any family: the model names its towers, ``model.towers()``)."""
    wanted = {"vision": vision, "audio": audio, "bert": bert}
    for name, module in model.towers().items():
        module.requires_grad_(not wanted[name])


def set_train_mode(model: torch.nn.Module) -> None:
    """model.train(), but frozen towers stay in eval mode: a frozen BERT/SigLIP/Whisper must not run
    dropout (it would make the policy stochastic for no gain and break bit-exact resume)."""
    model.train()
    for module in model.towers().values():
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()
