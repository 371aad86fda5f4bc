"""Load a policy from a local checkpoint directory; create tiny checkpoints for tests and the demo."""

from __future__ import annotations

from pathlib import Path

import torch

from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM
from r1omni_ray.model.tiny import TinySizes, init_tiny_towers, tiny_config


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def load_policy(ckpt_dir: str | Path, dtype: str = "auto") -> HumanOmniQwen2ForCausalLM:
    """from_pretrained on a local HF-format directory (never the hub)."""
    path = Path(ckpt_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    return HumanOmniQwen2ForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype), local_files_only=True)


def freeze_modules(model: HumanOmniQwen2ForCausalLM, vision: bool, audio: bool, bert: bool) -> None:
    m = model.model
    m.vision_tower.requires_grad_(not vision)
    m.audio_tower.requires_grad_(not audio)
    if hasattr(m, "bert_model"):
        m.bert_model.requires_grad_(not bert)


def set_train_mode(model: HumanOmniQwen2ForCausalLM) -> None:
    """model.train(), but frozen towers stay in eval mode: a frozen BERT/SigLIP/Whisper must not run
    dropout (it would make the policy stochastic for no gain and break bit-exact resume)."""
    model.train()
    m = model.model
    for name in ("vision_tower", "audio_tower", "bert_model"):
        sub = getattr(m, name, None)
        if sub is not None and not any(p.requires_grad for p in sub.parameters()):
            sub.eval()


def make_tiny_checkpoint(
    out_dir: str | Path,
    corpus: tuple[str, ...] = (),
    sizes: TinySizes | None = None,
    seed: int = 0,
    hidden_size: int | None = None,
    num_layers: int | None = None,
) -> Path:
    """A random-init tiny HumanOmni checkpoint in the real layout: tokenizer + config.json +
    model.safetensors, with vision_tower/, audio_tower/, bert/ processor folders."""
    from r1omni_ray.data.processor import make_tiny_processor

    s = sizes or TinySizes()
    if hidden_size is not None:
        s.hidden_size, s.intermediate_size = hidden_size, 2 * hidden_size
    if num_layers is not None:
        s.num_hidden_layers = num_layers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    proc = make_tiny_processor(
        out, corpus=corpus, image_size=s.image_size, num_mel_bins=s.num_mel_bins,
        audio_seconds=s.audio_frames / 100.0, num_frames=s.num_frames,
    )
    tok = proc.tokenizer
    torch.manual_seed(seed)
    cfg = tiny_config(
        len(tok), s, bert_vocab_size=len(proc.bert_tokenizer), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = HumanOmniQwen2ForCausalLM(cfg)
    init_tiny_towers(model)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    return out
