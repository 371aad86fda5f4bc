"""Helpers shared by the benchmark scripts: JSON-line output, summary statistics, Qwen2 parameter
shapes, the machine's memcpy bandwidth, and the text-only GRPO workload (checkpoint + prompts).

Nothing here imports Ray: the weight-broadcast benchmark's spawned receivers import this module too.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from actors.common import name_cpu_accelerator

# transformers (with accelerate installed) imports DeepSpeed in a benchmark's own process too; its notice
# would land on stdout, where only JSON lines belong.
name_cpu_accelerator()

# ----------------------------------------------------------------------------- output


def emit(record: dict[str, Any]) -> None:
    """One JSON object per line on stdout (flushed, so a killed run keeps what it measured)."""
    sys.stdout.write(json.dumps(record, sort_keys=False) + "\n")
    sys.stdout.flush()


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def rounded(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}") if x == x else x  # NaN stays NaN


def parse_int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def machine_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }


# ----------------------------------------------------------------------------- Qwen2 shapes


@dataclass(frozen=True)
class Qwen2Dims:
    """The language-model part of a Qwen2 checkpoint (what a learner broadcasts to rollout workers)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool = True

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """HF parameter names and shapes, in the order named_parameters() yields them."""
        h, kv = self.hidden_size, self.hidden_size // self.num_heads * self.num_kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab_size, h))]
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.q_proj.bias", (h,)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.v_proj.bias", (kv,)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (self.intermediate_size, h)),
                (p + "mlp.up_proj.weight", (self.intermediate_size, h)),
                (p + "mlp.down_proj.weight", (h, self.intermediate_size)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
            ]
        out.append(("model.norm.weight", (h,)))
        if not self.tie_word_embeddings:
            out.append(("lm_head.weight", (self.vocab_size, h)))
        return out

    def num_params(self) -> int:
        total = 0
        for _, shape in self.param_shapes():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total


# Qwen2.5-0.5B / 1.5B (config.json of the public checkpoints): 494,032,768 / 1,543,714,304 parameters.
QWEN25_05B = Qwen2Dims(151936, 896, 4864, 24, 14, 2, True)
QWEN25_15B = Qwen2Dims(151936, 1536, 8960, 28, 12, 2, True)


@dataclass
class TinyLMArgs:
    """The benchmark's tiny Qwen2 (flags of bench.grpo_step / bench.weight_broadcast)."""

    hidden_size: int = 256
    intermediate_size: int = 1024
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4


def tiny_vocab_size() -> int:
    """Vocabulary of the locally built tiny chat tokenizer (the GRPO benchmark's model uses it)."""
    import tempfile

    from r1omni_ray.tiny.tokenizer import build_tiny_tokenizer

    with tempfile.TemporaryDirectory() as d:
        return len(build_tiny_tokenizer(d))


def add_tiny_lm_flags(parser: Any, defaults: TinyLMArgs | None = None) -> None:
    d = defaults or TinyLMArgs()
    parser.add_argument("--hidden-size", type=int, default=d.hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=d.intermediate_size)
    parser.add_argument("--layers", type=int, default=d.num_layers)
    parser.add_argument("--heads", type=int, default=d.num_heads)
    parser.add_argument("--kv-heads", type=int, default=d.num_kv_heads)


def tiny_lm_from_flags(args: Any) -> TinyLMArgs:
    return TinyLMArgs(args.hidden_size, args.intermediate_size, args.layers, args.heads, args.kv_heads)


# ----------------------------------------------------------------------------- memcpy


def memcpy_bandwidth(nbytes: int, repeats: int = 5) -> dict[str, float]:
    """GB/s (1e9 bytes copied per second) of a large CPU tensor copy, with the current torch thread count:
    `clone` (fresh destination, page faults included: what a receiver allocating a bucket pays) and
    `copy_` into a preallocated destination (the bare memory bandwidth). Best of `repeats`: the limit,
    as free of other processes' noise as this run could see it."""
    src = torch.empty(nbytes, dtype=torch.uint8)
    src.fill_(7)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the destination pages once
    clone_t, copy_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        c = src.clone()
        clone_t.append(time.perf_counter() - t0)
        del c
        t0 = time.perf_counter()
        dst.copy_(src)
        copy_t.append(time.perf_counter() - t0)
    del src, dst
    return {
        "memcpy_bytes": float(nbytes),
        "clone_gbps": nbytes / min(clone_t) / 1e9,
        "copy_gbps": nbytes / min(copy_t) / 1e9,
    }


# ----------------------------------------------------------------------------- GRPO workload

BENCH_LABELS = ["happy", "sad", "angry", "neutral"]


def build_bench_checkpoint(out_dir: str | Path, lm: TinyLMArgs, new_tokens: int, seed: int = 0,
                           stop_ids: int = 0) -> Path:
    """A random-init HumanOmni checkpoint in the real layout with the benchmark's Qwen2 sizes. Benchmarks ask
    for fixed-length completions through the run config (rollout.min_new_tokens = max_new_tokens = new_tokens:
    eos and pad masked until then). stop_ids > 0: the checkpoint's generation_config lists that many more eos
    ids (honoured with rollout.stop_on_checkpoint_eos), so a random policy stops with about (1 + stop_ids) /
    vocab chance per token: geometric, long-tailed completion lengths, as reasoning traces have."""
    from r1omni_ray.tiny.model import TinySizes, make_tiny_checkpoint

    sizes = TinySizes(
        hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads,
    )
    out = make_tiny_checkpoint(out_dir, sizes=sizes, seed=seed)
    if stop_ids > 0:
        gen_path = out / "generation_config.json"
        gen = json.loads(gen_path.read_text())
        first = int(gen["eos_token_id"] if isinstance(gen["eos_token_id"], int) else gen["eos_token_id"][0])
        vocab = json.loads((out / "config.json").read_text())["vocab_size"]
        # Ordinary tokens from the top of the vocabulary (special tokens sit at the bottom of the tiny one).
        extra = [t for t in range(vocab - 1, 0, -1) if t not in (first, gen.get("pad_token_id"))][:stop_ids]
        gen_path.write_text(json.dumps(gen | {"eos_token_id": [first, *extra]}, indent=2) + "\n")
    (out / "bench_sizes.json").write_text(json.dumps(asdict(lm) | {"new_tokens": new_tokens, "stop_ids": stop_ids})
                                          + "\n")
    return out


def text_only_records(ckpt_dir: str | Path, num_prompts: int, prompt_tokens: int, seed: int = 0) -> list[Any]:
    """OmniRecords with no video and no audio: the processor renders a plain chat prompt (no placeholders,
    pixel_values/audio_features None), so the policy's embed_prompts only embeds text.

    The question is built from in-vocabulary words so the whole rendered prompt (system turn, question,
    the think/answer instruction, assistant header) is `prompt_tokens` long, or as short as the template
    allows when that is more."""
    import random

    from r1omni_ray.data.processor import OmniProcessor, tokenize_with_placeholders
    from r1omni_ray.data.records import OmniRecord

    proc = OmniProcessor.from_pretrained(ckpt_dir)
    tok = proc.tokenizer
    special = set(tok.all_special_tokens)
    words = sorted(w for w in tok.get_vocab() if w.isalpha() and w.islower() and w not in special)
    overhead = len(tokenize_with_placeholders(proc.build_prompt("x", False, False), tok)) - 1
    n_words = max(1, prompt_tokens - overhead)
    rng = random.Random(seed)
    records = []
    for i in range(num_prompts):
        label = BENCH_LABELS[i % len(BENCH_LABELS)]
        question = " ".join(rng.choice(words) for _ in range(n_words))
        records.append(OmniRecord(
            id=f"bench-{i}", video=None, audio=None, question=question, label=label,
            solution=f"<answer>{label}</answer>", has_video_placeholder=False, has_audio_placeholder=False,
        ))
    return records


def prompt_lengths(ckpt_dir: str | Path, records: Sequence[Any]) -> list[int]:
    from r1omni_ray.data.processor import OmniProcessor

    proc = OmniProcessor.from_pretrained(ckpt_dir)
    return [len(proc.process(r, use_video=False, use_audio=False).prompt_ids) for r in records]


# ---- one benchmark run on the real role groups (Ray imported lazily: see the module docstring) ----
RAY_ENV = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}}


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A private local Ray (address="local": never a cluster another process started here) with ``num_cpus``
    logical CPUs; one already up (a test's) is reused and left up."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, runtime_env=RAY_ENV)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def role_groups(cfg: Any, ckpt: str, labels: Sequence[str]) -> Iterator[Any]:
    """The run's RLVRGroups, shut down at exit."""
    from actors.groups import RLVRGroups

    groups = RLVRGroups.build(cfg, ckpt, list(labels))
    try:
        yield groups
    finally:
        groups.shutdown()


@contextlib.contextmanager
def bench_trainer(cfg: Any, groups: Any, records: Sequence[Any], labels: Sequence[str], out: Path) -> Iterator[Any]:
    """The driver's own step loop (RLVRTrainer) on ``groups``, logging to ``out`` without W&B."""
    from launch.train_rlvr import RLVRTrainer
    from r1omni_ray.config import WandbConfig
    from r1omni_ray.tracking import RunLogger

    logger = RunLogger(out, WandbConfig(mode="disabled"), {})
    try:
        yield RLVRTrainer(cfg, groups, list(records), None, list(labels), logger)
    finally:
        logger.finish()
