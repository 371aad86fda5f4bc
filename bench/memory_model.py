"""Per-GPU memory of each role at R1-Omni-0.5B and at a HumanOmni-7B-class size, estimated from the real model
built on the meta device (no weights allocated) and the run's own config.

The 0.5B model is the published config (tests/reference/r1omni_0.5b_checkpoint_keys.json); the 7B one swaps
the LM for Qwen2.5-7B's published dimensions (hidden 3584, 28 layers, 28 heads / 4 KV heads, MLP 18944,
vocab 152064, untied head) with the same towers and projector kind. Parameter counts are exact (counted on
the built model); the rest is arithmetic, each term printed:
- learner: bf16 weights, bf16 gradients and fp32 Adam state (master, m, v) of the trainable part, each
  divided by the ZeRO stage's sharding; DeepSpeed's fp32 gradient partition (the optimizer steps in fp32);
  torch AdamW's foreach temporaries (one fp32 copy of the partition: sqrt of v); ZeRO's communication buckets
  at DeepSpeed's defaults (ZeRO-1/2: reduce + all-gather buckets of 5e8 elements, x4.5 with overlap_comm as
  DeepSpeed documents; ZeRO-3: up to stage3_max_live_parameters 1e9 gathered plus the 5e7 prefetch bucket and
  the reduce bucket); learner-0's weight-broadcast staging (two slots of learner.broadcast_bucket_mb, plus one
  gathered bucket under ZeRO-3); the reference (sharded under ZeRO-3, else whole while its pass runs);
  activations of one micro-batch (one prompt group through the shared prefix: the prompt once, G
  completions), kept per layer without gradient checkpointing, one layer's worth plus layer inputs with it;
  the completion logits (bf16, kept for backward) and one sequence's float32 row. At start-up the whole bf16
  model sits on every GPU before deepspeed.initialize partitions it (the policy is loaded, then moved):
  "plan_peak" is the larger of that and the steady total, what a user should plan for.
- rollout (vLLM): the LM's bf16 weights per tensor-parallel rank inside vLLM's share (gpu_memory_utilization
  of the GPU), plus outside it: on the actor's GPU the front end (towers, projectors, token embedding) and its
  receive staging bucket; on every vLLM GPU the engine's receive staging bucket and the copy vLLM's weight
  loader makes of a bucket's tensors while it loads them (reload). The KV cache takes what the share leaves.
Not counted: CUDA context (~0.5-1 GB), NCCL's own buffers, allocator fragmentation (often 10-20%). A measured
peak belongs beside these numbers (tests/system/test_gpu_memory.py measures one on a GPU when one is lent).

Run: python -m bench.memory_model [--gpu-gib 80]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import emit
from r1omni_ray.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "reference" / "r1omni_0.5b_checkpoint_keys.json"
QWEN25_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False, "max_window_layers": 28}
# The omni prompt at R1-Omni's setting: 8 frames -> 392 visual tokens, 30 s of audio -> 500, ~80 of text.
PROMPT_TOKENS = 972
# Qwen2.5-Omni thinkers as published (config.json thinker_config): the 7B's LM is Qwen2.5-7B's, its vision tower
# a 32-block ViT of width 1280, its audio tower Whisper-large-v3's encoder, both projecting to the LM width.
# The 3B's LM is taken as Qwen2.5-3B's (hidden 2048, 36 layers, 16/2 heads, MLP 11008, vocab 151936) with the
# same towers projecting to 2048, and an untied head (as the 7B; a tied one would be 0.3B fewer): not checked
# against its config.json, which is not on these machines.
_OMNI_TOWERS = {"vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                           "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                           "fullatt_block_indexes": [7, 15, 23, 31]},
                "audio": {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
                          "num_mel_bins": 128, "max_source_positions": 1500, "n_window": 100}}
QWEN_OMNI_LM = {
    "qwen2_5_omni_7b": QWEN25_7B,
    "qwen2_5_omni_3b": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                        "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                        "tie_word_embeddings": False},
}
# A 4 s 1280x720 clip with its audio track as Qwen2.5-Omni's pipeline reads it (bench.omni_shape --family
# qwen2_5_omni): 2880 video tokens, 100 audio tokens, the interleaving markers and the question (tiny tokenizer).
QWEN_OMNI_PROMPT_TOKENS = 3046
GIB = 2**30


@dataclass(frozen=True)
class Counts:
    total: int
    trainable: int
    reference: int  # what the reference holds: the policy without the shipped (frozen) towers
    lm: int  # decoder layers, norm, head (and the embedding): what vLLM holds
    front_end: int  # towers, projectors, gate, token embedding: what the rollout actor holds beside vLLM
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int
    vocab: int


def build_config(size: str) -> Any:
    from r1omni_ray.model.modeling import HumanOmniQwen2Config

    if size in QWEN_OMNI_LM:
        from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig

        lm = QWEN_OMNI_LM[size]
        text = {k: v for k, v in lm.items() if k != "max_window_layers"} | {"rope_parameters": {
            "rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
        return Qwen2_5OmniThinkerConfig(text_config=text,
                                        vision_config=_OMNI_TOWERS["vision"] | {"out_hidden_size": lm["hidden_size"]},
                                        audio_config=_OMNI_TOWERS["audio"] | {"output_dim": lm["hidden_size"]})

    ref = json.loads(REFERENCE.read_text())
    towers = ref["tower_configs"]
    vision = towers["siglip-base-patch16-224"]
    cfg = dict(ref["config_json"], vision_config=vision.get("vision_config", vision),
               audio_config=towers["whisper-large-v3"], bert_config=towers["bert-base-uncased"])
    if size == "7b":
        cfg |= QWEN25_7B
    return HumanOmniQwen2Config(**{k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")})


def meta_model(size: str, cfg: RunConfig) -> Any:
    """The policy at ``size`` on the meta device (no memory), its towers frozen as ``cfg`` says."""
    from r1omni_ray.model.loading import freeze_modules
    from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM
    from r1omni_ray.model.qwen_omni import QwenOmniThinkerPolicy

    cls = QwenOmniThinkerPolicy if size in QWEN_OMNI_LM else HumanOmniQwen2ForCausalLM
    with torch.device("meta"):
        model = cls(build_config(size))
    mc = cfg.model
    freeze_modules(model, mc.freeze_vision_tower, mc.freeze_audio_tower, mc.freeze_bert)
    return model


def count(size: str, cfg: RunConfig) -> Counts:
    from r1omni_ray.engines.base import TOKEN_EMBEDDING, is_lm_param

    model = meta_model(size, cfg)
    config = model.model.config  # the LM's (a composite model's text config)
    ship_v, ship_a = cfg.model.shipped_tower_features()
    named = dict(model.named_parameters())
    towers = model.towers()
    dropped = {id(p) for kind, on in (("vision", ship_v), ("audio", ship_a)) if on for p in towers[kind].parameters()}
    n = {k: p.numel() for k, p in named.items()}
    return Counts(
        total=sum(n.values()), trainable=sum(n[k] for k, p in named.items() if p.requires_grad),
        reference=sum(n[k] for k, p in named.items() if id(p) not in dropped),
        lm=sum(v for k, v in n.items() if is_lm_param(k)),
        front_end=sum(v for k, v in n.items() if not is_lm_param(k) or k == TOKEN_EMBEDDING),
        hidden=config.hidden_size, intermediate=config.intermediate_size, layers=config.num_hidden_layers,
        kv_dim=config.num_key_value_heads * (config.hidden_size // config.num_attention_heads),
        vocab=config.vocab_size)


def trainable_metas(size: str, cfg: RunConfig) -> list[Any]:
    """What a learner broadcasts per update (LearnerActor.sync_metas: every trainable parameter, bf16), from
    the model built on the meta device."""
    from r1omni_ray.weight_broadcast import ParamMeta

    model = meta_model(size, cfg)
    return [ParamMeta(n, tuple(p.shape), "bfloat16") for n, p in model.named_parameters() if p.requires_grad]


def activation_bytes_per_token_layer(c: Counts) -> int:
    """bf16 tensors a decoder layer keeps for backward per token (attention by a fused kernel: no T x T scores):
    norm + attention inputs, q/k/v, attention output, o-proj input (~5h + 2 kv); norm + MLP inputs, gate, up,
    activation, product (2h + 4i); residual adds (2h)."""
    return 2 * (5 * c.hidden + 2 * c.kv_dim + 2 * c.hidden + 4 * c.intermediate + 2 * c.hidden)


def micro_batch_bytes(c: Counts, prompts: int, prompt_tokens: int, completions: int, new_tokens: int,
                      checkpointing: bool) -> dict[str, int]:
    """What one micro-batch keeps for backward (bf16): the decoder layers' activations over its tokens (each
    prompt once, then its completions), all layers' or, with gradient checkpointing, the layer inputs plus one
    layer's; and the completion logits (kept as given) with one sequence's float32 row."""
    tokens = prompts * prompt_tokens + completions * new_tokens
    per_layer = activation_bytes_per_token_layer(c) * tokens
    act = per_layer + 2 * c.hidden * tokens * c.layers if checkpointing else per_layer * c.layers
    return {"activations": act, "logits": 2 * completions * new_tokens * c.vocab + 4 * new_tokens * c.vocab}


# DeepSpeed's ZeRO defaults (elements), which deepspeed_config() leaves as they are
REDUCE_BUCKET = 5e8
ALLGATHER_BUCKET = 5e8
STAGE3_MAX_LIVE = 1e9
STAGE3_PREFETCH = 5e7


def zero_bucket_bytes(z: int, overlap: bool) -> float:
    """bf16 bytes of ZeRO's communication buffers at DeepSpeed's default bucket sizes."""
    if z == 3:
        return 2 * (STAGE3_MAX_LIVE + STAGE3_PREFETCH + REDUCE_BUCKET)
    if z in (1, 2):
        return 2 * (REDUCE_BUCKET + ALLGATHER_BUCKET) * (4.5 if overlap else 1.0)
    return 0.0


def learner_gib(c: Counts, cfg: RunConfig, prompt_tokens: int = PROMPT_TOKENS, rank0: bool = True) -> dict[str, float]:
    """One learner GPU; rank0: learner-0, which also stages the weight broadcast."""
    lc, rc = cfg.learner, cfg.rollout
    n, z = lc.num_learners, lc.zero_stage
    weights = 2 * c.total / (n if z == 3 else 1)
    grads = 2 * c.trainable / (n if z >= 2 else 1)
    optim = 12 * c.trainable / (n if z >= 1 else 1)
    fp32_grads = 4 * c.trainable / (n if z >= 1 else 1)
    adam_temps = 4 * c.trainable / (n if z >= 1 else 1)
    overlap = True if lc.overlap_comm is None else lc.overlap_comm  # None: on, on GPUs
    bucket = lc.broadcast_bucket_mb * 2**20
    staging = (2 + (1 if z == 3 else 0)) * bucket if rank0 else 0.0
    ref = 0.0
    if lc.use_reference and cfg.grpo.beta > 0:
        ref = 2 * c.reference / n if z == 3 else 2 * c.reference  # offloaded below ZeRO-3: on the GPU for its pass
    prompts = max(1, lc.micro_batch_size // rc.group_size) if lc.shared_prefix else lc.micro_batch_size
    parts = {"weights": weights, "grads": grads, "optimizer": optim, "fp32_grads": fp32_grads,
             "adamw_temporaries": adam_temps, "zero_buckets": zero_bucket_bytes(z, overlap),
             "broadcast_staging": staging, "reference": ref}
    parts |= micro_batch_bytes(c, prompts, prompt_tokens, lc.micro_batch_size, rc.max_new_tokens,
                               lc.gradient_checkpointing)
    total = sum(parts.values())
    startup = 2 * c.total  # the loaded model, moved to the GPU whole before ZeRO partitions it
    return {k: v / GIB for k, v in parts.items()} | {"total": total / GIB, "startup": startup / GIB,
                                                     "plan_peak": max(total, startup) / GIB}


def rollout_gib(c: Counts, cfg: RunConfig, gpu_gib: float) -> dict[str, float]:
    rc = cfg.rollout
    lm = 2 * c.lm / rc.tensor_parallel_size / GIB
    front = 2 * c.front_end / GIB
    budget = rc.gpu_memory_utilization * gpu_gib  # vLLM's share of the GPU: weights + activations + KV cache
    bucket = cfg.learner.broadcast_bucket_mb / 1024
    # Outside vLLM's share: the actor's front end and its receive staging (GPU 0), and on every vLLM GPU the
    # engine's receive staging plus the loader's copy of a bucket (reload).
    engine_extra = 2 * bucket
    return {"vllm_weights_per_gpu": lm, "front_end_on_gpu0": front, "vllm_budget": budget,
            "actor_staging": bucket, "engine_staging": bucket, "reload_copy": bucket,
            "kv_cache_left": budget - lm, "total_gpu0": budget + front + bucket + engine_extra,
            "total_other_gpus": budget + engine_extra}


def hf_rollout_gib(c: Counts, cfg: RunConfig, prompt_tokens: int) -> dict[str, float]:
    """A transformers-engine rollout GPU: the whole bf16 model, and the KV cache of one generate call (each
    prompt's keys/values once, shared by its G samples, plus the samples' own new tokens)."""
    rc = cfg.rollout
    prompts = max(1, cfg.train.prompts_per_step // max(rc.num_workers, 1))
    kv = 2 * 2 * c.layers * c.kv_dim * (prompts * prompt_tokens + prompts * rc.group_size * rc.max_new_tokens)
    return {"weights": 2 * c.total / GIB, "kv_cache": kv / GIB, "total": (2 * c.total + kv) / GIB}


MODELS = (("0.5b", "r1omni_0.5b_rlvr.yaml", PROMPT_TOKENS), ("7b", "humanomni_7b_rlvr.yaml", PROMPT_TOKENS),
          ("qwen2_5_omni_3b", "qwen2_5_omni_3b_rlvr.yaml", QWEN_OMNI_PROMPT_TOKENS),
          ("qwen2_5_omni_7b", "qwen2_5_omni_7b_rlvr.yaml", QWEN_OMNI_PROMPT_TOKENS))


def rows(gpu_gib: float) -> list[dict[str, Any]]:
    out = []
    for size, name, prompt_tokens in MODELS:
        path = ROOT / "configs" / name
        cfg = load_config(path)
        c = count(size, cfg)
        base = {"model": size, "config": path.name, "params_total": c.total, "params_trainable": c.trainable,
                "prompt_tokens": prompt_tokens}
        for ckpt in (False, True):
            lcfg = load_config(path, [f"learner.gradient_checkpointing={str(ckpt).lower()}"])
            est = learner_gib(c, lcfg, prompt_tokens)
            out.append(base | {"role": "learner", "zero_stage": cfg.learner.zero_stage,
                               "num_learners": cfg.learner.num_learners, "gradient_checkpointing": ckpt,
                               "gib": {k: round(v, 2) for k, v in est.items()},
                               "fits": est["plan_peak"] < gpu_gib})
        if cfg.rollout.engine == "hf":
            est = hf_rollout_gib(c, cfg, prompt_tokens)
            out.append(base | {"role": "rollout", "engine": "hf", "gib": {k: round(v, 2) for k, v in est.items()},
                               "fits": est["total"] < gpu_gib})
            continue
        est = rollout_gib(c, cfg, gpu_gib)
        out.append(base | {"role": "rollout", "engine": "vllm", "tensor_parallel_size": cfg.rollout.tensor_parallel_size,
                           "gib": {k: round(v, 2) for k, v in est.items()},
                           "fits": est["kv_cache_left"] > 0 and est["total_gpu0"] < gpu_gib})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU (H100: 80)")
    args = ap.parse_args()
    for r in rows(args.gpu_gib):
        emit(r | {"gpu_gib": args.gpu_gib})


if __name__ == "__main__":
    main()
