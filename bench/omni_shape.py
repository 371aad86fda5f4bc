"""The learner step and the transformers engine at R1-Omni's prompt shape, before and after the omni paths.

Shape (per prompt): 8 frames -> 392 visual tokens (14x14 patches pooled 2x2, 49 per frame), 30 s of audio
-> 3000 mel frames -> 500 audio tokens (Whisper's 1500 states pooled by 3), 80 text tokens: 972 prompt
tokens, G completions of exactly --new-tokens tokens. The LM is tiny-width (bench.common.TinyLMArgs), the
towers are tiny too (--tower-hidden) but run at the real sequence lengths.

learner: one GRPO update (frozen-reference log-probs, then forward + backward + DeepSpeed step, world size
1 on gloo) through the real DeepSpeedPolicy and GRPOUpdate, in four variants side by side on the same
weights: per-completion forward on raw media (what the learner did before), shared prefix only, shipped
tower features only, both (the default now). It prints completion tokens/s and the ratio to the first.

engine: HFEngine.generate of the same prompts, G samples each: every sample prefilling and reading its own
copy of the prompt (before), and each prompt prefilled once with its samples decoding against that one copy
(r1omni_ray/engines/shared_prefix.py); then VLLMEngine (vLLM's CPU build here, --vllm) on the same weights
and prompt embeddings, with vLLM's prefix caching on (its default: a prompt's G requests can reuse the
cached blocks of its prefill) and off (every request prefills). Generated tokens/s and the ratio to the
first. With --lm-width 0.5b the LM has Qwen2.5-0.5B's dimensions (random weights; use with --parts engine).

--family qwen2_5_omni: the Qwen2.5-Omni thinker (tiny-width LM and towers, transformers' own classes) at the
shape Qwen2.5-Omni's own pipeline gives a 4 s 1280x720 clip with its audio track: 8 frames at 2 fps resized
to 560x1008 under the default 768-token budget (4 x 40 x 72 patches -> 2880 video tokens), 400 mel frames
-> 100 audio tokens, interleaved in 2 s chunks with TMRoPE positions (the processor's own functions), plus
the question: ~3.0k prompt tokens. Its vLLM variant serves the thinker's LM as engines/vllm_mrope_lm.py (token
ids, the media rows and TMRoPE positions); on CPU without prefix caching, the engine's only setting there.

Run: python -m bench.omni_shape  (one JSON line per variant, then a summary line)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from dataclasses import asdict
from types import SimpleNamespace
from typing import Any

import torch

from bench.common import (
    QWEN25_05B,
    TinyLMArgs,
    add_tiny_lm_flags,
    emit,
    machine_info,
    median,
    rounded,
    tiny_lm_from_flags,
)
from r1omni_ray.labels import AUDIO_TOKEN_INDEX, VIDEO_TOKEN_INDEX

VIDEO_SIDE_PATCHES = 14  # x 8 px patches = 112 px frames; pooled 2x2 -> 7x7 = 49 tokens per frame
MEL_FRAMES = 3000  # 30 s: Whisper -> 1500 states, pooled by 3 -> 500 tokens
TEXT_TOKENS = 80
LEARNER_VARIANTS = (  # (name, shared_prefix, shipped tower features)
    ("per_completion+raw_media", False, False),
    ("shared_prefix+raw_media", True, False),
    ("per_completion+tower_features", False, True),
    ("shared_prefix+tower_features", True, True),
)


def omni_model(lm: TinyLMArgs, vocab_size: int, tower_hidden: int, seed: int):
    """HumanOmni with the given LM dimensions and tiny towers at R1-Omni's sequence lengths."""
    from r1omni_ray.model.modeling import HumanOmniQwen2ForCausalLM
    from r1omni_ray.tiny.model import TinySizes, tiny_config

    sizes = TinySizes(
        hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads,
        image_size=VIDEO_SIDE_PATCHES * 8, patch_size=8, vision_hidden=tower_hidden, num_mel_bins=128,
        audio_frames=MEL_FRAMES, audio_hidden=tower_hidden, num_frames=8,
    )
    torch.manual_seed(seed)
    # 972 prompt + 128 new tokens: past the tiny config's 1024 positions, which vLLM enforces.
    cfg = tiny_config(vocab_size, sizes, vision_pool_stride=2, audio_pool_stride=3, max_position_embeddings=2048)
    return HumanOmniQwen2ForCausalLM(cfg).eval()


def omni_prompts(n: int, vocab_ids: list[int], seed: int) -> list[SimpleNamespace]:
    """Prompts in the R1-Omni layout: text, <video>, text, <audio>, text (80 text tokens in all)."""
    g = torch.Generator().manual_seed(seed)

    def text(k: int) -> list[int]:
        return [vocab_ids[int(i)] for i in torch.randint(len(vocab_ids), (k,), generator=g)]

    side = VIDEO_SIDE_PATCHES * 8
    return [SimpleNamespace(
        prompt_ids=text(40) + [VIDEO_TOKEN_INDEX] + text(20) + [AUDIO_TOKEN_INDEX] + text(TEXT_TOKENS - 60),
        pixel_values=torch.randn(8, 3, side, side, generator=g), audio_features=torch.randn(128, MEL_FRAMES, generator=g),
        bert_input_ids=[1] + text(30) + [2], vision_feats=None, audio_feats=None,
    ) for _ in range(n)]


QWEN_CLIP = {"frames": 100, "fps": 25.0, "height": 720, "width": 1280, "mel_frames": 400}  # 4 s of 720p, 25 fps


def qwen_omni_model(lm: TinyLMArgs, vocab_size: int, tower_hidden: int, seed: int, ids: dict[str, int]):
    """The thinker with the given LM dimensions, tiny towers of the real patch and mel sizes."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig

    from r1omni_ray.model.qwen_omni import QwenOmniThinkerPolicy

    head = lm.hidden_size // lm.num_heads
    cfg = Qwen2_5OmniThinkerConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
                         num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads,
                         num_key_value_heads=lm.num_kv_heads, max_position_embeddings=8192, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [head // 8, head * 3 // 16, head * 3 // 16]}),
        vision_config=dict(depth=2, hidden_size=tower_hidden, intermediate_size=2 * tower_hidden, num_heads=2,
                           out_hidden_size=lm.hidden_size, fullatt_block_indexes=[1]),
        audio_config=dict(encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=2 * tower_hidden,
                          d_model=tower_hidden, output_dim=lm.hidden_size),
        audio_token_index=ids["audio_token_index"], image_token_index=ids["image_token_index"],
        video_token_index=ids["video_token_index"], vision_start_token_id=ids["vision_start_token_id"],
        audio_start_token_id=ids["audio_start_token_id"])
    torch.manual_seed(seed)
    return QwenOmniThinkerPolicy(cfg).eval()


def qwen_omni_prompts(n: int, tok, ids: dict[str, int], seed: int) -> list[SimpleNamespace]:
    """Qwen2.5-Omni prompts for QWEN_CLIP: the processor's own prompt, placeholder expansion and positions,
    with random patches and mel features of the shapes its video and audio would give."""
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from r1omni_ray.data.qwen_omni_processor import (
        QwenOmniProcessor,
        VideoSpec,
        audio_token_count,
        video_frame_count,
    )

    spec, c = VideoSpec(), QWEN_CLIP
    proc = QwenOmniProcessor(tok, WhisperFeatureExtractor(feature_size=128), ids, spec)
    t = video_frame_count(c["frames"], c["fps"], spec)
    h, w = smart_resize(c["height"], c["width"], factor=28, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    grid = (t // 2, h // 14, w // 14)
    second = 2 / (t / c["frames"] * c["fps"])
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        text = proc.build_prompt("which emotion does the person show?", True, True)
        expanded = proc.index.expand(text, [audio_token_count(c["mel_frames"])], grid, second, True)
        pid = list(tok(expanded, add_special_tokens=False)["input_ids"])
        out.append(SimpleNamespace(
            prompt_ids=pid, positions=proc.index.positions(pid, grid, c["mel_frames"], second, True),
            video_grid_thw=grid, pixel_values=torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14, generator=g),
            audio_features=torch.randn(128, c["mel_frames"], generator=g), bert_input_ids=[], vision_feats=None,
            audio_feats=None, media_kinds=(True, True)))
    return out


def with_features(model, prompts: list[SimpleNamespace]) -> list[SimpleNamespace]:
    feats = model.tower_features(prompts, vision=True, audio=True)
    return [SimpleNamespace(**{**vars(p), "pixel_values": None, "audio_features": None, "vision_feats": v,
                               "audio_feats": a}) for p, (v, a) in zip(prompts, feats, strict=True)]


def _init_dist() -> None:
    import deepspeed

    from actors.common import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed print()s its shm op build: not a JSON line
        deepspeed.init_distributed(dist_backend="gloo")


def bench_learner(args: argparse.Namespace, model, prompts, vocab_ids: list[int]) -> list[dict[str, Any]]:
    from r1omni_ray.config import config_from_dict
    from r1omni_ray.learner.grpo_update import GRPOUpdate, StepSpec, TrainBatch
    from r1omni_ray.learner.policy import DeepSpeedPolicy
    from r1omni_ray.learner.reference import frozen_reference
    from r1omni_ray.model.loading import freeze_modules

    _init_dist()
    freeze_modules(model, vision=True, audio=True, bert=True)
    g = args.group_size
    n = len(prompts) * g
    gen = torch.Generator().manual_seed(args.seed + 1)
    comps = [[vocab_ids[int(i)] for i in torch.randint(len(vocab_ids), (args.new_tokens,), generator=gen)]
             for _ in range(n)]
    index = [i // g for i in range(n)]
    adv = torch.randn(n, generator=gen).tolist()
    spec = StepSpec(num_micro=len(prompts), num_global_tokens=n * args.new_tokens, num_global_seqs=n,
                    max_len=args.new_tokens)
    base = {"learner": {"num_learners": 1, "zero_stage": args.zero_stage, "micro_batch_size": g, "lr": 1e-6,
                        "torch_threads": args.threads}, "grpo": {"beta": 0.04}}
    cfg = config_from_dict(base)
    policy = DeepSpeedPolicy(model, cfg, 1e-6, 0, 1, torch.device("cpu"))
    featured = with_features(model, prompts)
    out = []
    for name, shared, feats in LEARNER_VARIANTS:
        vcfg = config_from_dict(base | {"learner": base["learner"] | {"shared_prefix": shared}})
        reference = frozen_reference(model, feats, feats, torch.device("cpu"))
        trainer = GRPOUpdate(policy, reference, vcfg)
        batch = TrainBatch(featured if feats else prompts, index, comps, adv)
        times = []
        for k in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            trainer.train(batch, spec)
            if k >= args.warmup:
                times.append(time.perf_counter() - t0)
        step = median(times)
        out.append({"bench": "omni_shape", "part": "learner", "variant": name, "shared_prefix": shared,
                    "tower_features": feats, "step_s_median": rounded(step), "step_s_all": [rounded(t, 3) for t in times],
                    "completion_tokens_per_s": rounded(n * args.new_tokens / step),
                    "reference_params": sum(p.numel() for p in reference.parameters())})
        emit(out[-1])
        del reference, trainer
    return out


def time_engine(args: argparse.Namespace, name: str, engine, featured, params) -> dict[str, Any]:
    """One engine's record: --engine-warmup untimed calls, then --engine-repeats timed ones (median)."""
    times, lengths = [], []
    for k in range(args.engine_warmup + args.engine_repeats):
        t0 = time.perf_counter()
        groups = engine.generate(featured, params)
        if k >= args.engine_warmup:
            times.append(time.perf_counter() - t0)
        lengths = [len(c.token_ids) for grp in groups for c in grp]
    t = median(times)
    return {"bench": "omni_shape", "part": "engine", "variant": name, "generate_s_median": rounded(t),
            "generate_s_all": [rounded(x, 3) for x in times], "completions": len(lengths),
            "completion_tokens": [min(lengths), max(lengths)], "gen_tokens_per_s": rounded(sum(lengths) / t)}


@torch.no_grad()
def bench_engine(args: argparse.Namespace, model, tokenizer, prompts) -> list[dict[str, Any]]:
    from r1omni_ray.engines.base import SamplingParams
    from r1omni_ray.engines.hf_engine import HFEngine

    # Every sample exactly new_tokens long: eos and pad masked until then.
    params = SamplingParams(n=args.group_size, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            seed=args.seed)
    featured = with_features(model, prompts)  # the rollout worker runs the towers once either way
    out = []
    for name, once in (("per_sample", False), ("shared_prefix", True)):
        out.append(time_engine(args, name, HFEngine(model, tokenizer, shared_prefix=once), featured, params))
        emit(out[-1])
    if args.vllm:
        out += bench_vllm(args, model, tokenizer, featured, params)
    return out


def bench_vllm(args: argparse.Namespace, model, tokenizer, featured, params) -> list[dict[str, Any]]:
    """The same prompts and sampling on VLLMEngine: one engine per variant (its start is not timed), fp32
    as the hf engine runs here, threads as --threads."""
    import copy

    # vLLM's own log handler writes to stdout, where only JSON lines belong: its records go to stderr instead
    # (Python's last-resort handler, warnings and up), here and in the processes it spawns.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    from vllm.platforms import current_platform

    from r1omni_ray.engines.vllm_engine import VLLMEngine, engine_args, serves_mrope

    out = []
    max_len = max(2048, max(len(p.prompt_ids) for p in featured) + params.max_new_tokens)
    # Prefix caching only where the engine allows it for this model (engine_args: not the M-RoPE model on CPU).
    defaults = engine_args("", current_platform.device_type, 1, "float32", 0.6, max_len, None, None,
                           mrope=serves_mrope(model))
    variants = [("vllm", True), ("vllm_no_prefix_caching", False)]
    if defaults.get("enable_prefix_caching", True) is False:
        variants = variants[1:]
    for name, caching in variants:
        with tempfile.TemporaryDirectory() as work:
            t0 = time.perf_counter()
            engine = VLLMEngine(copy.deepcopy(model), tokenizer, work, dtype="float32", threads=args.threads,
                                max_model_len=max_len, llm_overrides={"enable_prefix_caching": caching})
            start = time.perf_counter() - t0
            out.append(time_engine(args, name, engine, featured, params) | {"engine_start_s": rounded(start)})
            engine.close()
        emit(out[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tiny_lm_flags(p)
    p.add_argument("--tower-hidden", type=int, default=64, help="SigLIP / Whisper width (tiny, real lengths)")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--warmup", type=int, default=1, help="learner steps before the measured ones")
    p.add_argument("--steps", type=int, default=3, help="measured learner steps per variant")
    p.add_argument("--engine-warmup", type=int, default=0)
    p.add_argument("--engine-repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a learner or worker has 1 by default)")
    p.add_argument("--parts", default="engine,learner")
    p.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the vLLM engine (the CPU build here) on the same prompts")
    p.add_argument("--lm-width", choices=("tiny", "0.5b"), default="tiny",
                   help="tiny: the --hidden-size... flags; 0.5b: Qwen2.5-0.5B's LM dimensions (use with --parts engine)")
    p.add_argument("--family", choices=("humanomni", "qwen2_5_omni"), default="humanomni",
                   help="the policy family (and its prompt shape)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from r1omni_ray.tiny.tokenizer import build_tiny_tokenizer

    qwen = args.family == "qwen2_5_omni"
    with tempfile.TemporaryDirectory() as d:
        if qwen:
            from r1omni_ray.data.qwen_omni_processor import thinker_token_ids
            from r1omni_ray.tiny.qwen_omni import make_tiny_qwen_omni_processor

            tok = make_tiny_qwen_omni_processor(d)[0]
            ids = thinker_token_ids(tok)
        else:
            tok = build_tiny_tokenizer(d)
    specials = set(tok.all_special_ids)
    vocab_ids = [i for i in range(len(tok)) if i not in specials]
    lm, vocab = tiny_lm_from_flags(args), len(tok)
    if args.lm_width == "0.5b":
        q = QWEN25_05B
        lm = TinyLMArgs(q.hidden_size, q.intermediate_size, q.num_layers, q.num_heads, q.num_kv_heads)
        vocab = q.vocab_size
    if qwen:
        model = qwen_omni_model(lm, vocab, args.tower_hidden, args.seed, ids)
        prompts = qwen_omni_prompts(args.prompts, tok, ids, args.seed)
    else:
        model = omni_model(lm, vocab, args.tower_hidden, args.seed)
        prompts = omni_prompts(args.prompts, vocab_ids, args.seed)
    plen = len(model.embed_prompts(prompts[:1])[0])
    emit({"bench": "omni_shape", "kind": "config", "machine": machine_info(), "lm": asdict(lm),
          "tower_hidden": args.tower_hidden, "prompt_tokens": plen, "prompts": args.prompts,
          "group_size": args.group_size, "new_tokens": args.new_tokens, "threads": args.threads,
          "zero_stage": args.zero_stage, "lm_width": args.lm_width, "lm_vocab": vocab, "family": args.family})
    parts = {s.strip() for s in args.parts.split(",")}
    summary: dict[str, Any] = {"bench": "omni_shape", "kind": "summary"}
    if "engine" in parts:
        eng = bench_engine(args, model, tok, prompts)
        base = eng[0]["gen_tokens_per_s"]
        summary["engine_tokens_per_s_vs_hf_per_sample"] = {r["variant"]: rounded(r["gen_tokens_per_s"] / base, 3)
                                                          for r in eng[1:]}
    if "learner" in parts:
        res = bench_learner(args, model, prompts, vocab_ids)
        summary["learner_speedup_vs_per_completion_raw"] = {
            r["variant"]: rounded(r["completion_tokens_per_s"] / res[0]["completion_tokens_per_s"], 3) for r in res[1:]}
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
