"""Weights out of a learner rank: gathered state, HF export, DeepSpeed checkpoints and their fingerprint.
Ray-free; the learner actor wraps it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from r1omni_ray.learner.policy import DeepSpeedPolicy


def full_state(policy: DeepSpeedPolicy, keep: bool = True) -> dict[str, torch.Tensor]:
    """Full (gathered) weights on CPU, for checks and HF export (collective under ZeRO-3: every rank gathers
    every parameter in the same order). keep=False: take part in the gathers and keep nothing (a rank that
    does not write: at 7B a host copy is ~15 GB per rank, ~136 GB on an 8-GPU node)."""
    import deepspeed

    out = {}
    for n, p in policy.module.named_parameters():
        if policy.zero3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if keep:
                    out[n] = p.data.detach().cpu().clone()
        elif keep:
            out[n] = p.data.detach().cpu().clone()
    return out


def save_hf(policy: DeepSpeedPolicy, src_ckpt: str, out_dir: str) -> str | None:
    """Export the current policy as a HF-format directory in the reference layout (rank 0 writes).
    Tokenizer, processors and tower folders come from the checkpoint the run started from."""
    from safetensors.torch import save_file

    writer = policy.rank == 0
    if not writer and not policy.zero3:
        return None  # nothing collective to take part in
    state = full_state(policy, keep=writer)  # collective under ZeRO-3; only the writer keeps the host copy
    if not writer:
        return None
    model = policy.module
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src_ckpt, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.pt"))
    full = {k: v.contiguous() for k, v in state.items()}
    for k, v in model.state_dict().items():  # buffers etc.
        if k not in full and v.numel() > 0:
            full[k] = v.detach().cpu().contiguous()
    if model.config.tie_word_embeddings:
        full.pop("lm_head.weight", None)
    save_file(full, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    # Every export names the tokenizer's eos and pad, so no reader (vLLM included) derives other stops.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp))
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id = tok.eos_token_id, tok.pad_token_id
    gen.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)


def save_checkpoint(policy: DeepSpeedPolicy, ckpt_dir: str, tag: str) -> str:
    """Module, optimizer (each rank its ZeRO shard) and the weight version under ckpt_dir/tag. The driver
    keeps its own atomic `latest` pointer, so DeepSpeed's is not written."""
    policy.engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"weight_version": policy.version},
                                  save_latest=False)
    return os.path.join(ckpt_dir, tag)


def load_checkpoint(policy: DeepSpeedPolicy, ckpt_dir: str, tag: str) -> int:
    """Restore module + optimizer state saved by save_checkpoint; returns the restored weight version."""
    path, client = policy.engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"rank {policy.rank}: no DeepSpeed checkpoint {tag!r} under {ckpt_dir}")
    policy.version = int((client or {}).get("weight_version", policy.version))
    return policy.version


@torch.no_grad()
def weights_checksum(policy: DeepSpeedPolicy) -> list[float]:
    """[sum, sum of squares, numel] over this rank's trainable weights (its ZeRO-3 partition under stage 3):
    a cheap on-device fingerprint to verify that a resumed run loaded what was saved."""
    s = sq = n = 0.0
    for p in policy.module.parameters():
        if not p.requires_grad:
            continue
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        t = t.detach().double()
        s += float(t.sum())
        sq += float(t.square().sum())
        n += float(t.numel())
    return [s, sq, n]
