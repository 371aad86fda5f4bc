"""A tiny random Qwen2.5-Omni checkpoint, built locally (no hub): for tests, the CPU demo and benchmarks.

``layout="full"`` saves transformers' own ``Qwen2_5OmniForConditionalGeneration`` (thinker + talker +
token2wav, tiny) as the published checkpoints are laid out (``thinker.*`` / ``talker.*`` / ``token2wav.*``);
``layout="thinker"`` saves the thinker on its own, as this project's exports are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import WhisperFeatureExtractor

from r1omni_ray.data.qwen_omni_processor import (
    OMNI_TOKENS,
    QWEN_OMNI_SYSTEM_PROMPT,
    QwenOmniProcessor,
    VideoSpec,
    thinker_token_ids,
)
from r1omni_ray.tiny.synthetic import SYNTHETIC_VOCAB_TEXTS
from r1omni_ray.tiny.tokenizer import build_tiny_tokenizer

# Qwen2.5-Omni's chat template in structure: a default system turn when none is given, and content items
# rendered as the real template renders them (video/audio/image as bos + placeholder + eos).
QWEN_OMNI_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'video' -%}{{ '<|vision_bos|><|VIDEO|><|vision_eos|>' }}"
    "{%- elif item['type'] == 'audio' -%}{{ '<|audio_bos|><|AUDIO|><|audio_eos|>' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<|vision_bos|><|IMAGE|><|vision_eos|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass
class TinyOmniSizes:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2  # head_dim 32: vLLM's CPU attention rejects 16
    num_key_value_heads: int = 1
    vision_hidden: int = 32
    patch_size: int = 4
    num_mel_bins: int = 16
    audio_hidden: int = 32
    max_pixels: int = 32 * 32  # the synthetic 32x32 frames keep their size: an 8x8 patch grid
    min_pixels: int = 16 * 16


def _thinker_config(vocab: int, tok, s: TinyOmniSizes) -> dict:
    head = s.hidden_size // s.num_attention_heads
    return dict(
        text_config=dict(
            vocab_size=vocab, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
            num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
            num_key_value_heads=s.num_key_value_heads, max_position_embeddings=4096, tie_word_embeddings=False,
            # mrope_section splits head_dim / 2 rotary frequencies over (t, h, w), as the real 16/24/24 of 64
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [head // 8, head * 3 // 16, head * 3 // 16]},
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        ),
        vision_config=dict(
            depth=2, hidden_size=s.vision_hidden, intermediate_size=2 * s.vision_hidden, num_heads=2,
            patch_size=s.patch_size, spatial_merge_size=2, temporal_patch_size=2, window_size=4 * s.patch_size,
            out_hidden_size=s.hidden_size, fullatt_block_indexes=[1],
        ),
        audio_config=dict(
            num_mel_bins=s.num_mel_bins, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=2 * s.audio_hidden,
            d_model=s.audio_hidden, output_dim=s.hidden_size, max_source_positions=1500, n_window=50,
        ),
        tie_word_embeddings=False, **thinker_token_ids(tok),
    )


def _tiny_speech_configs(vocab: int, thinker: dict) -> dict:
    """A talker and token2wav of the smallest sizes that build: only their tensor names matter here."""
    return dict(
        talker_config=dict(
            vocab_size=64, embedding_size=thinker["text_config"]["hidden_size"], hidden_size=32, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            text_vocab_size=vocab, audio_config=thinker["audio_config"], vision_config=thinker["vision_config"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            tts_codec_start_token_id=60, tts_codec_end_token_id=61, tts_codec_pad_token_id=62,
            tts_codec_mask_token_id=63, tts_text_start_token_id=0, tts_text_end_token_id=1, tts_text_pad_token_id=2,
            **dict.fromkeys(("audio_token_index", "image_token_index", "video_token_index", "vision_start_token_id",
                             "vision_end_token_id", "audio_start_token_id", "audio_end_token_id"), 3),
        ),
        token2wav_config=dict(
            dit_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16, ff_mult=1,
                            emb_dim=16, num_embeds=64, mel_dim=8, enc_emb_dim=8, enc_dim=8,
                            enc_channels=[16, 16, 16, 16, 32], enc_attention_channels=8, enc_se_channels=8,
                            look_ahead_layers=[], look_backward_layers=[]),
            bigvgan_config=dict(mel_dim=8, upsample_initial_channel=16, resblock_kernel_sizes=[3],
                                resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[2], upsample_kernel_sizes=[4]),
        ),
    )


def make_tiny_qwen_omni_processor(out_dir: str | Path, corpus: tuple[str, ...] = (),
                                  sizes: TinyOmniSizes | None = None) -> tuple:
    s = sizes or TinyOmniSizes()
    texts = list(SYNTHETIC_VOCAB_TEXTS) + [QWEN_OMNI_SYSTEM_PROMPT] + [str(c) for c in corpus]
    tok = build_tiny_tokenizer(out_dir, texts, extra_special=tuple(OMNI_TOKENS.values()),
                               chat_template=QWEN_OMNI_CHAT_TEMPLATE, named_tokens=OMNI_TOKENS)
    fe = WhisperFeatureExtractor(feature_size=s.num_mel_bins, chunk_length=30, sampling_rate=16000)
    spec = VideoSpec(patch_size=s.patch_size, min_pixels=s.min_pixels, max_pixels=s.max_pixels)
    return tok, fe, spec


def make_tiny_qwen_omni_checkpoint(out_dir: str | Path, corpus: tuple[str, ...] = (), sizes: TinyOmniSizes | None = None,
                                   seed: int = 0, layout: str = "full") -> Path:
    """A random tiny Qwen2.5-Omni checkpoint in the published layout (``full``) or as a thinker alone."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (
        Qwen2_5OmniConfig,
        Qwen2_5OmniThinkerConfig,
    )
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniForConditionalGeneration,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    if layout not in ("full", "thinker"):
        raise ValueError(f"layout must be 'full' or 'thinker', got {layout!r}")
    s = sizes or TinyOmniSizes()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok, fe, spec = make_tiny_qwen_omni_processor(out, corpus, s)
    thinker = _thinker_config(len(tok), tok, s)
    torch.manual_seed(seed)
    if layout == "full":
        model = Qwen2_5OmniForConditionalGeneration(Qwen2_5OmniConfig(thinker_config=thinker,
                                                                      **_tiny_speech_configs(len(tok), thinker)))
    else:
        model = Qwen2_5OmniThinkerForConditionalGeneration(Qwen2_5OmniThinkerConfig(**thinker))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    QwenOmniProcessor(tok, fe, thinker, spec).save_pretrained(out)
    return out
