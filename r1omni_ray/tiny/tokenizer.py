"""Tiny tokenizers built locally (no hub access) for tests and the synthetic task.

* :func:`build_tiny_tokenizer`: a word-level Qwen2-style chat tokenizer (PreTrainedTokenizerFast).
* :func:`build_tiny_bert_tokenizer`: a WordPiece BERT tokenizer for HumanOmni's BERT gate.

Both are saved with ``save_pretrained`` so ``AutoTokenizer.from_pretrained(out_dir)`` reloads
them offline.
"""

from __future__ import annotations

import inspect
import os
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

from r1omni_ray.data.prompts import VIDEO_PAD, VISION_END, VISION_START
from r1omni_ray.labels import (
    AU_END,
    AU_START,
    AUDIO_TOKEN,
    EMOTION_QUESTION,
    LABEL_SETS,
    SYSTEM_PROMPT,
    THINK_ANSWER_SUFFIX,
    VI_END,
    VI_START,
    VIDEO_TOKEN,
)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK_TOKEN = "<unk>"
#: special tokens (skipped by ``decode(skip_special_tokens=True)``); the Qwen2-VL video tokens are there
#: because R1-Omni's trainer prompt contains them (r1omni_ray.data.prompts)
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START, IM_END, UNK_TOKEN, VISION_START, VIDEO_PAD, VISION_END)
#: multimodal placeholders / markers: special (never generated, stripped when decoding with skip)
MM_TOKENS: tuple[str, ...] = (VIDEO_TOKEN, AUDIO_TOKEN, VI_START, VI_END, AU_START, AU_END)
#: reasoning-format tags: single added tokens that are *content* (kept by skip_special_tokens)
FORMAT_TOKENS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")

# Qwen2-style template: a default system turn is inserted when the conversation lacks one.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_BASE_WORDS = ("system", "user", "assistant")
# The tiny BERT's max_position_embeddings (r1omni_ray.tiny.model): the gate text is truncated to it.
TINY_BERT_MAX_LENGTH = 128


def _base_texts(corpus: Iterable[str]) -> list[str]:
    from r1omni_ray.tiny.synthetic import SYNTHETIC_VOCAB_TEXTS

    texts: list[str] = [EMOTION_QUESTION, THINK_ANSWER_SUFFIX, SYSTEM_PROMPT, *_BASE_WORDS]
    for labels in LABEL_SETS.values():
        texts.extend(labels)
    texts.extend(SYNTHETIC_VOCAB_TEXTS)
    texts.extend(str(c) for c in corpus)
    return texts


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )


def _strip_markers(text: str, extra: Sequence[str] = ()) -> str:
    for tok in (*SPECIAL_TOKENS, *MM_TOKENS, *FORMAT_TOKENS, *extra):
        text = text.replace(tok, " ")
    return text


def build_tiny_tokenizer(out_dir: str | os.PathLike, corpus: Iterable[str] = (), extra_special: Sequence[str] = (),
                         chat_template: str = CHAT_TEMPLATE, named_tokens: dict[str, str] | None = None):
    """Build, save (``save_pretrained(out_dir)``) and return a word-level chat tokenizer.

    Vocabulary: special tokens, multimodal markers, format tags, every word (whitespace +
    punctuation pre-tokenisation, case-sensitive) of the label sets, EMOTION_QUESTION,
    THINK_ANSWER_SUFFIX, SYSTEM_PROMPT, the synthetic reasoning texts and ``corpus``, plus digits
    and ASCII punctuation.  Unknown words map to ``<unk>``.  pad = ``<|endoftext|>``, eos =
    ``<|im_end|>``.  Decoding joins tokens with single spaces. ``extra_special``: more special tokens (a
    model family's own placeholders), after the reserved ones; ``named_tokens``: attribute names for some of
    them (transformers' ``extra_special_tokens``, e.g. ``{"video_token": "<|VIDEO|>"}``).
    """
    from tokenizers import AddedToken, Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    pre = _pre_tokenizer()
    words: set[str] = set(string.digits) | set(string.punctuation)
    for text in _base_texts(corpus):
        for piece, _ in pre.pre_tokenize_str(_strip_markers(text, extra_special)):
            words.add(piece)
    reserved = [*SPECIAL_TOKENS, *MM_TOKENS, *FORMAT_TOKENS, *extra_special]
    vocab = {tok: i for i, tok in enumerate(reserved)}
    for w in sorted(words - set(reserved)):
        vocab[w] = len(vocab)

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre
    # no decoder: tokenizers joins decoded tokens with single spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (*SPECIAL_TOKENS, *MM_TOKENS, *extra_special)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in FORMAT_TOKENS])

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START, *MM_TOKENS, *extra_special],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        **({"extra_special_tokens": dict(named_tokens)} if named_tokens else {}),
    )
    hf.chat_template = chat_template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return hf


def build_tiny_bert_tokenizer(out_dir: str | os.PathLike, corpus: Iterable[str] = ()):
    """Build, save and return a lower-cased WordPiece BertTokenizerFast over the same texts."""
    from tokenizers import pre_tokenizers
    from transformers import BertTokenizerFast

    pre = pre_tokenizers.BertPreTokenizer()
    words: set[str] = set(string.digits) | set(string.punctuation)
    for text in _base_texts(corpus):
        for piece, _ in pre.pre_tokenize_str(_strip_markers(text).lower()):
            words.add(piece)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ordered = specials + sorted(words - set(specials)) + [f"##{d}" for d in string.digits]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(ordered) + "\n", encoding="utf-8")
    if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers 4.x
        bert = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True, model_max_length=TINY_BERT_MAX_LENGTH)
    else:  # transformers 5.x: BertTokenizerFast is the tokenizers-backed BertTokenizer(vocab=...)
        bert = BertTokenizerFast(vocab={w: i for i, w in enumerate(ordered)}, do_lower_case=True,
                                 model_max_length=TINY_BERT_MAX_LENGTH)
    bert.save_pretrained(str(out))
    return bert
