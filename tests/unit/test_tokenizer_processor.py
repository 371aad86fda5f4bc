"""Tiny tokenizers, prompt building, placeholder tokenisation and the OmniProcessor."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from r1omni_ray.data.errors import MediaError
from r1omni_ray.data.processor import (
    OmniInputs,
    OmniProcessor,
    tokenize_with_placeholders,
)
from r1omni_ray.data.prompts import build_prompt
from r1omni_ray.data.records import OmniRecord, load_records
from r1omni_ray.labels import (
    AUDIO_TOKEN_INDEX,
    EMOTION_QUESTION,
    LABEL_SETS,
    SYSTEM_PROMPT,
    THINK_ANSWER_SUFFIX,
    VIDEO_TOKEN_INDEX,
)
from r1omni_ray.tiny.processor import make_tiny_processor
from r1omni_ray.tiny.synthetic import SYNTHETIC_VOCAB_TEXTS, make_corrupt_media, make_synthetic_dataset
from r1omni_ray.tiny.tokenizer import build_tiny_bert_tokenizer, build_tiny_tokenizer

FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@pytest.fixture(scope="module")
def proc_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_proc")
    make_tiny_processor(out, corpus=["zebra crossing 42"])
    return out


@pytest.fixture(scope="module")
def proc(proc_dir) -> OmniProcessor:
    return OmniProcessor.from_pretrained(proc_dir)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[OmniRecord]:
    out = tmp_path_factory.mktemp("syn_tp")
    return load_records(make_synthetic_dataset(out, 3, with_reasoning=True, separate_audio=0.5)).records


def test_tokenizer_round_trip_and_format_regex(proc):
    tok = proc.tokenizer
    text = "<think> the video is red </think> <answer> sad </answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded == text
    assert FORMAT_RE.fullmatch(decoded)
    assert ANSWER_RE.search(decoded).group(1).strip() == "sad"
    # no spaces around tags and with a newline: still one token per tag, still matches
    compact = tok.decode(tok("<think>The video is red.</think>\n<answer>sad</answer>")["input_ids"], skip_special_tokens=True)
    assert FORMAT_RE.fullmatch(compact) and ANSWER_RE.search(compact).group(1).strip() == "sad"


def test_tokenizer_special_tokens_and_vocab(proc):
    tok = proc.tokenizer
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>" and tok.unk_token == "<unk>"
    assert tok.pad_token_id != tok.eos_token_id
    ids = tok("<|im_start|>user <vi_start><video><vi_end> happy<|im_end|>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 7
    assert tok.decode(ids, skip_special_tokens=True) == "user happy"
    texts = [EMOTION_QUESTION, THINK_ANSWER_SUFFIX, SYSTEM_PROMPT, "zebra crossing 42", *SYNTHETIC_VOCAB_TEXTS]
    texts += [lab for labels in LABEL_SETS.values() for lab in labels]
    for t in texts:
        assert tok.unk_token_id not in tok(t, add_special_tokens=False)["input_ids"], t
    assert tok.unk_token_id in tok("qwertyuiop", add_special_tokens=False)["input_ids"]
    assert tok(" 2025 ", add_special_tokens=False)["input_ids"] == tok("2 0 2 5", add_special_tokens=False)["input_ids"]


def test_tokenizers_reload_offline(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tiny_tokenizer(tmp_path / "tok", corpus=["hello"])
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    s = "<|im_start|>user hello <answer> sad </answer><|im_end|>"
    assert again(s)["input_ids"] == tok(s)["input_ids"]
    assert again.chat_template == tok.chat_template and again.eos_token == "<|im_end|>"

    bert = build_tiny_bert_tokenizer(tmp_path / "bert", corpus=["Hello"])
    bert2 = AutoTokenizer.from_pretrained(str(tmp_path / "bert"))
    assert (tmp_path / "bert" / "vocab.txt").is_file()
    ids = bert2("As an Emotional expert, hello 12?")["input_ids"]
    toks = bert2.convert_ids_to_tokens(ids)
    assert toks[0] == "[CLS]" and toks[-1] == "[SEP]" and "[UNK]" not in toks
    assert ids == bert("As an Emotional expert, hello 12?")["input_ids"]


def test_trainer_prompt_is_what_r1_omnis_grpo_trainer_renders(proc):
    p = build_prompt(EMOTION_QUESTION, proc.tokenizer, "trainer")
    assert p.prompt == (
        # Qwen2-VL's chat template adds its default system turn when the conversation has none.
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        # make_conversation_video: content[0] is {"type": "video"} -> the template writes the Qwen2-VL
        # video tokens; humanOmni_grpo_trainer.py compute_loss then prefixes the text item (content[1])
        # with '<vi_start><video><vi_end>\n<au_start><audio><au_end>\n'.
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
        "<vi_start><video><vi_end>\n<au_start><audio><au_end>\n"
        # grpo.py QUESTION_TEMPLATE = "{Question}\nOutput the thinking process in <think> </think> and
        # final emotion in <answer> </answer> tags."
        "As an emotional recognition expert; throughout the video, which emotion conveyed by the characters "
        "is the most obvious to you?\nOutput the thinking process in <think> </think> and final emotion in "
        "<answer> </answer> tags.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # compute_loss: bert_prompts.append(prompt[0]['content'][1]['text']) before the prefix is added.
    assert p.bert_text == f"{EMOTION_QUESTION}\n{THINK_ANSWER_SUFFIX}"
    ids = tokenize_with_placeholders(p.prompt, proc.tokenizer)
    assert proc.tokenizer.unk_token_id not in ids
    toks = proc.tokenizer.convert_ids_to_tokens(ids[: ids.index(VIDEO_TOKEN_INDEX)])
    assert toks[-4:] == ["<|vision_start|>", "<|video_pad|>", "<|vision_end|>", "<vi_start>"]
    only_audio = build_prompt("Q?", proc.tokenizer, "trainer", use_video=False).prompt
    assert "<video>" not in only_audio and "<|video_pad|>" not in only_audio


def test_inference_prompt_is_what_r1_omnis_inference_script_renders(proc):
    tok = proc.tokenizer
    p = build_prompt(EMOTION_QUESTION, tok, "inference")
    # inference.py README command: --instruct "<question>  Output the thinking process ..." (two spaces)
    instruction = f"{EMOTION_QUESTION}  {THINK_ANSWER_SUFFIX}"
    # humanomni/__init__.py mm_infer: content = "<video>\n<audio>" + "\n" + instruct, the tokenizer's own
    # chat template, then <video> -> <vi_start><video><vi_end> and <audio> -> <au_start><audio><au_end>.
    rendered = tok.apply_chat_template([{"role": "user", "content": "<video>\n<audio>\n" + instruction}],
                                       tokenize=False, add_generation_prompt=True)
    assert p.prompt == rendered.replace("<video>", "<vi_start><video><vi_end>").replace(
        "<audio>", "<au_start><audio><au_end>")
    assert p.prompt == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
        f"<vi_start><video><vi_end>\n<au_start><audio><au_end>\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert p.bert_text == instruction  # mm_infer: question=args.instruct goes to the BERT tokenizer


def test_the_processor_follows_the_chosen_style(proc_dir, records):
    trainer = OmniProcessor.from_pretrained(proc_dir).process(records[0])
    inference = OmniProcessor.from_pretrained(proc_dir, input_style="inference").process(records[0])
    assert trainer.prompt == build_prompt(records[0].question, trainer_tok(proc_dir), "trainer").prompt
    assert inference.prompt == build_prompt(records[0].question, trainer_tok(proc_dir), "inference").prompt
    assert trainer.prompt_ids != inference.prompt_ids
    # Both gate texts are question + suffix; BERT's tokenizer reads "\n" and "  " alike as whitespace.
    bert = OmniProcessor.from_pretrained(proc_dir).bert_tokenizer
    assert trainer.bert_input_ids == inference.bert_input_ids
    assert "output the thinking process" in bert.decode(trainer.bert_input_ids)


def trainer_tok(proc_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(proc_dir))


def test_tokenize_with_placeholders(proc):
    tok = proc.tokenizer
    ids = tokenize_with_placeholders(build_prompt(EMOTION_QUESTION, tok).prompt, tok)
    assert ids.count(VIDEO_TOKEN_INDEX) == 1 and ids.count(AUDIO_TOKEN_INDEX) == 1
    v, a = ids.index(VIDEO_TOKEN_INDEX), ids.index(AUDIO_TOKEN_INDEX)
    assert tok.convert_ids_to_tokens(ids[v - 1 : v + 2 : 2]) == ["<vi_start>", "<vi_end>"]
    assert tok.convert_ids_to_tokens(ids[a - 1 : a + 2 : 2]) == ["<au_start>", "<au_end>"]
    assert tokenize_with_placeholders("<video><audio>", tok) == [VIDEO_TOKEN_INDEX, AUDIO_TOKEN_INDEX]
    plain = "the video is red"
    assert tokenize_with_placeholders(plain, tok) == tok(plain, add_special_tokens=False)["input_ids"]
    mixed = tokenize_with_placeholders("sad <audio> happy", tok)
    assert mixed[1] == AUDIO_TOKEN_INDEX and len(mixed) == 3 and all(i >= 0 for i in (mixed[0], mixed[2]))


def test_process_record(proc, records):
    rec = records[0]
    x = proc.process(rec)
    assert isinstance(x, OmniInputs) and x.record_id == rec.id
    assert x.pixel_values.shape == (4, 3, 32, 32) and x.pixel_values.dtype == torch.float32
    assert x.audio_features.shape == (16, 200)
    assert x.prompt_ids.count(VIDEO_TOKEN_INDEX) == 1 and x.prompt_ids.count(AUDIO_TOKEN_INDEX) == 1
    assert x.label == rec.label and x.solution == f"<answer>{rec.label}</answer>" and x.response == rec.response
    assert x.prompt_ids == tokenize_with_placeholders(x.prompt, proc.tokenizer)
    bert_toks = proc.bert_tokenizer.convert_ids_to_tokens(x.bert_input_ids)
    assert bert_toks[:3] == ["[CLS]", "as", "an"] and bert_toks[-1] == "[SEP]"

    only_audio = proc.process(rec, use_video=False)
    assert only_audio.pixel_values is None and VIDEO_TOKEN_INDEX not in only_audio.prompt_ids
    assert torch.equal(only_audio.audio_features, x.audio_features)
    only_video = proc.process(rec, use_audio=False)
    assert only_video.audio_features is None and AUDIO_TOKEN_INDEX not in only_video.prompt_ids


def test_bert_ids_truncated(proc, records):
    from dataclasses import replace

    long = replace(records[0], question=" ".join(["emotion"] * 200))
    # truncation=True: the BERT tokenizer's own model_max_length (the tiny BERT's 128 positions)
    assert len(proc.process(long, use_video=False, use_audio=False).bert_input_ids) == 128


def test_response_ids(proc, records):
    resp = records[0].response
    ids = proc.response_ids(resp)
    assert ids[-1] == proc.tokenizer.eos_token_id and proc.tokenizer.unk_token_id not in ids
    text = proc.tokenizer.decode(ids, skip_special_tokens=True)
    assert FORMAT_RE.fullmatch(text) and ANSWER_RE.search(text).group(1).strip() == records[0].label


def test_process_corrupt_media_raises(proc, records, tmp_path):
    from dataclasses import replace

    bad = make_corrupt_media(tmp_path)
    rec = replace(records[0], video=str(bad["garbage_mp4"]), audio=str(bad["garbage_mp4"]))
    with pytest.raises(MediaError, match="garbage.mp4"):
        proc.process(rec)
    rec = replace(records[0], audio=str(bad["no_audio_mp4"]))
    with pytest.raises(MediaError, match="no_audio.mp4: video container has no audio track"):
        proc.process(rec)


def test_from_pretrained_config_paths(proc_dir, records, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(proc_dir, ckpt)
    # relocate the towers and point config.json at them (relative + absolute paths)
    shutil.move(str(ckpt / "vision_tower"), str(ckpt / "towers_siglip"))
    ext_audio = tmp_path / "whisper"
    shutil.move(str(ckpt / "audio_tower"), str(ext_audio))
    (ckpt / "config.json").write_text(
        json.dumps({"mm_vision_tower": "towers_siglip", "mm_audio_tower": str(ext_audio),
                    "text_model_path": "bert", "num_frames": 2})
    )
    p = OmniProcessor.from_pretrained(ckpt)
    assert p.num_frames == 2 and p.max_audio_seconds == 2.0
    x = p.process(records[1])
    assert x.pixel_values.shape == (2, 3, 32, 32) and x.audio_features.shape == (16, 200)

    saved = p.save_pretrained(tmp_path / "resaved")
    for sub in ("vision_tower", "audio_tower", "bert"):
        assert (saved / sub).is_dir()
    q = OmniProcessor.from_pretrained(saved, num_frames=3)
    assert q.num_frames == 3
    y = q.process(records[1])
    assert y.prompt_ids == x.prompt_ids and torch.equal(y.audio_features, x.audio_features)

    (ckpt / "config.json").write_text(json.dumps({"mm_vision_tower": "google/siglip-so400m-patch14-384"}))
    with pytest.raises(FileNotFoundError, match="mm_vision_tower"):
        OmniProcessor.from_pretrained(ckpt)


def test_make_tiny_processor_validates(tmp_path):
    with pytest.raises(ValueError, match="audio_seconds"):
        make_tiny_processor(tmp_path / "x", audio_seconds=1.5)
