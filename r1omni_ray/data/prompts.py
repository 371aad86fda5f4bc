"""The prompt text and BERT-gate text that R1-Omni's code builds, in its two styles.

Owns the exact strings the policy sees; tokenisation and media loading live in processor.py.

- ``trainer`` (the default): R1-Omni's GRPO trainer (src/r1-v/src/open_r1/trainer/humanOmni_grpo_trainer.py,
  ``compute_loss``; the conversation from src/r1-v/src/open_r1/grpo.py ``make_conversation_video``). The user
  message is ``[{"type": "video"}, {"type": "text", "text": QUESTION_TEMPLATE}]``; the text item gets the
  ``<vi_start><video><vi_end>\\n<au_start><audio><au_end>\\n`` prefix and is rendered with the Qwen2-VL
  processor's chat template, which writes the default system turn and ``<|vision_start|><|video_pad|>
  <|vision_end|>`` for the video item. The BERT gate reads the text item without the prefix.
- ``inference``: R1-Omni's ``inference.py`` / ``humanomni.mm_infer``. The checkpoint tokenizer's own chat
  template over one user turn ``"<video>\\n<audio>\\n" + instruction``, then each placeholder wrapped in its
  start/end markers. The BERT gate reads the whole instruction.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1omni_ray.labels import (
    AU_END,
    AU_START,
    AUDIO_TOKEN,
    THINK_ANSWER_SUFFIX,
    VI_END,
    VI_START,
    VIDEO_TOKEN,
)

INPUT_STYLES = ("trainer", "inference")

# Qwen2-VL's chat template: a user turn without a system turn gets this one, and a video content item
# renders as these three special tokens (they exist in the Qwen2.5 vocabulary: 151652, 151656, 151653).
QWEN2VL_DEFAULT_SYSTEM = "You are a helpful assistant."
VISION_START, VIDEO_PAD, VISION_END = "<|vision_start|>", "<|video_pad|>", "<|vision_end|>"


@dataclass(frozen=True)
class PromptText:
    prompt: str  # rendered chat prompt with <video>/<audio> placeholders
    bert_text: str  # what the BERT gate reads


def trainer_question(question: str) -> str:
    """grpo.py QUESTION_TEMPLATE: "{Question}\\nOutput the thinking process in ... tags."."""
    return f"{question}\n{THINK_ANSWER_SUFFIX}"


def inference_instruction(question: str) -> str:
    """The instruction of R1-Omni's README inference command: question, two spaces, then the suffix."""
    return f"{question}  {THINK_ANSWER_SUFFIX}"


def _modal_prefix(use_video: bool, use_audio: bool) -> str:
    prefix = ""
    if use_video:
        prefix += f"{VI_START}{VIDEO_TOKEN}{VI_END}\n"
    if use_audio:
        prefix += f"{AU_START}{AUDIO_TOKEN}{AU_END}\n"
    return prefix


def trainer_prompt(question: str, use_video: bool = True, use_audio: bool = True) -> PromptText:
    text = trainer_question(question)
    # The video content item comes first in the message (its Qwen2-VL tokens), then the text item.
    video_item = f"{VISION_START}{VIDEO_PAD}{VISION_END}" if use_video else ""
    prompt = (
        f"<|im_start|>system\n{QWEN2VL_DEFAULT_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{video_item}{_modal_prefix(use_video, use_audio)}{text}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    return PromptText(prompt, text)


def inference_prompt(question: str, tokenizer, use_video: bool = True, use_audio: bool = True) -> PromptText:
    instruction = inference_instruction(question)
    modal = "\n".join(t for t, on in ((VIDEO_TOKEN, use_video), (AUDIO_TOKEN, use_audio)) if on)
    content = f"{modal}\n{instruction}"  # mm_infer: modal_token + "\n" + instruct, even when modal is ""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    prompt = prompt.replace(VIDEO_TOKEN, f"{VI_START}{VIDEO_TOKEN}{VI_END}")
    prompt = prompt.replace(AUDIO_TOKEN, f"{AU_START}{AUDIO_TOKEN}{AU_END}")
    return PromptText(prompt, instruction)


def build_prompt(
    question: str, tokenizer, style: str = "trainer", use_video: bool = True, use_audio: bool = True
) -> PromptText:
    if style == "trainer":
        return trainer_prompt(question, use_video, use_audio)
    if style == "inference":
        return inference_prompt(question, tokenizer, use_video, use_audio)
    raise ValueError(f"input style {style!r} is not one of {INPUT_STYLES}")
