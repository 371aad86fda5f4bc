"""Qwen2.5-Omni inputs as the thinker reads them: the prompt with its placeholders expanded, video patches,
audio features and the TMRoPE 3-D positions of every prompt token.

Equal to the pipeline of Qwen2.5-Omni's model card on the same clip (tests/unit/test_qwen_omni_processor.py,
against stored output in tests/reference/qwen_omni/ and, where torchvision is installed, live):
qwen-omni-utils' ``process_mm_info`` chooses and resizes the frames, transformers' ``Qwen2_5OmniProcessor``
normalises and patches them, extracts the audio features and expands the placeholders, and the thinker's
``get_rope_index`` gives the positions. Here:
- frames at ``fps`` (2) by qwen-omni-utils' rule (``video_frame_count``), read by data/video.py;
- each frame resized within its pixel budget to a multiple of patch x merge (transformers' ``smart_resize``),
  with the float bicubic resize that qwen-omni-utils' torchvision call runs, then normalised and cut into
  ``temporal_patch_size`` x patch x patch cubes in the vision tower's order (``video_patches``). torchvision has
  no build for this project's CPU torch, so the few tensor operations those calls make are made here;
- audio at 16 kHz (data/audio.py, decord as R1-Omni reads it; qwen-omni-utils would use librosa over the
  ffmpeg program) through the checkpoint's WhisperFeatureExtractor, 30 s window, valid frames only;
- with ``use_audio_in_video`` the video's own audio track interleaved with its frames in 2 s chunks;
  placeholder expansion and positions are transformers' own functions, called on a small stand-in object
  (``_OmniIndex``) so no model is needed.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from r1omni_ray.data.audio import load_audio
from r1omni_ray.data.errors import MediaError
from r1omni_ray.data.processor import OmniInputs
from r1omni_ray.data.prompts import trainer_question
from r1omni_ray.data.records import OmniRecord
from r1omni_ray.data.video import read_frames

# Qwen2.5-Omni's documented system prompt (the model card: other system prompts lose the speech output;
# the thinker's text is what this project trains, and it is the prompt the model was tuned with).
QWEN_OMNI_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory "
    "and visual inputs, as well as generating text and speech."
)
# The tokenizer's placeholder and marker tokens (attribute names as transformers' processor reads them).
OMNI_TOKENS = {
    "audio_token": "<|AUDIO|>", "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>",
    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN / STD: the video processor's defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_FILE = "qwen_omni_processor.json"  # ours: the video settings (a published checkpoint has none)


def thinker_token_ids(tokenizer) -> dict[str, int]:
    """The thinker config's placeholder and marker ids for a tokenizer with OMNI_TOKENS (what a checkpoint's
    config holds; for a tokenizer built here), with Qwen2.5-Omni's time settings."""
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in OMNI_TOKENS.items()}
    return {"audio_token_index": ids["audio_token"], "image_token_index": ids["image_token"],
            "video_token_index": ids["video_token"], "vision_start_token_id": ids["vision_bos_token"],
            "vision_end_token_id": ids["vision_eos_token"], "audio_start_token_id": ids["audio_bos_token"],
            "audio_end_token_id": ids["audio_eos_token"], "position_id_per_seconds": 25, "seconds_per_chunk": 2}


@dataclass(frozen=True)
class VideoSpec:
    """The video processor's settings (preprocessor_config.json / video_preprocessor_config.json names)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 28 * 28  # per frame; qwen-omni-utils' VIDEO_MIN_TOKEN_NUM * 28 * 28, the processor's too
    max_pixels: int = 768 * 28 * 28  # per frame, before the share of total_pixels
    total_pixels: float = 128000 * 28 * 28 * 0.9  # the whole clip's budget (qwen-omni-utils: MODEL_SEQ_LEN's 90%)
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255


def video_frame_count(total: int, video_fps: float, spec: VideoSpec) -> int:
    """qwen-omni-utils' ``smart_nframes`` for an fps request: total / video_fps * fps frames, at least
    min_frames and at most max_frames and the video's own count, rounded down to an even number (the
    temporal patch)."""
    f = spec.temporal_patch_size
    n = total / video_fps * spec.fps
    n = min(max(n, spec.min_frames), spec.max_frames, total)
    n = math.floor(n / f) * f
    if n < f:
        raise MediaError(f"video has {total} frame(s); Qwen2.5-Omni needs at least {f}")
    return int(n)


def video_frame_indices(total: int, n: int) -> list[int]:
    """Evenly spaced, rounded: ``torch.linspace(0, total - 1, n).round()`` (qwen-omni-utils)."""
    return torch.linspace(0, total - 1, n).round().long().tolist()


def video_patches(frames: np.ndarray, spec: VideoSpec) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``[T, H, W, 3]`` uint8 frames -> (``[grid_t * grid_h * grid_w, 3 * tp * p * p]`` float32 patches,
    (grid_t, grid_h, grid_w)): resized as qwen-omni-utils' fetch_video resizes them, then normalised and
    patched as transformers' Qwen2VLVideoProcessor does (whose own resize then keeps the size)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # [T, C, H, W] uint8
    t, c, h, w = video.shape
    p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    # qwen-omni-utils' fetch_video: each frame's share of the clip's budget, never below 1.05 x the minimum
    max_pixels = max(min(spec.max_pixels, spec.total_pixels / t * tp), int(spec.min_pixels * 1.05))
    rh, rw = smart_resize(h, w, factor=p * m, min_pixels=spec.min_pixels, max_pixels=max_pixels)
    if (rh, rw) != (h, w):
        # torchvision.transforms.functional.resize on a uint8 tensor, as fetch_video calls it: bicubic with
        # antialiasing in float32, clamped, rounded back to uint8 (not v2's native uint8 kernel: up to 6 apart)
        x = F.interpolate(video.to(torch.float32), size=[rh, rw], mode="bicubic", align_corners=False, antialias=True)
        video = x.clamp_(0, 255).round_().to(torch.uint8)
    # The processor's fused rescale + normalise: mean and std divided by the rescale factor.
    mean = torch.tensor(spec.image_mean) * (1.0 / spec.rescale_factor)
    std = torch.tensor(spec.image_std) * (1.0 / spec.rescale_factor)
    x = video.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
    if pad := -t % tp:  # an odd frame count repeats the last frame
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        t += pad
    gt, gh, gw = t // tp, rh // p, rw // p
    x = x.view(gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p).contiguous(), (gt, gh, gw)


def audio_token_count(mel_frames: int) -> int:
    """The audio tower's output length for ``mel_frames`` valid feature frames (conv stride 2, then pooling)."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


class _OmniIndex:
    """What transformers' ``replace_multimodal_special_tokens`` and ``get_rope_index`` read of their objects:
    those two functions run here unchanged, without a model or a torchvision video processor."""

    def __init__(self, tokenizer, thinker: dict[str, Any], spec: VideoSpec) -> None:
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
            Qwen2_5OmniPreTrainedModelForConditionalGeneration as Model,
        )
        from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor as Processor

        self._expand, self._rope = Processor.replace_multimodal_special_tokens, Model.get_rope_index
        self._proc_chunks, self._model_chunks = Processor.get_chunked_index, Model.get_chunked_index
        self._vision_ids = Model.get_llm_pos_ids_for_vision
        for name, tok in OMNI_TOKENS.items():
            setattr(self, name, tok)
        self.image_processor = self.video_processor = self  # merge_size / temporal_patch_size, read off both
        self.merge_size = self.spatial_merge_size = spec.merge_size
        self.temporal_patch_size = spec.temporal_patch_size
        self.config = _Namespace(
            image_token_id=thinker["image_token_index"], video_token_id=thinker["video_token_index"],
            audio_token_id=thinker["audio_token_index"], vision_start_token_id=thinker["vision_start_token_id"],
            audio_start_token_id=thinker["audio_start_token_id"],
            position_id_per_seconds=thinker["position_id_per_seconds"], seconds_per_chunk=thinker["seconds_per_chunk"],
        )

    def get_chunked_index(self, token_indices, tokens_per_chunk, remove_index=None):
        if remove_index is None:  # the processor's version (numpy indices)
            return self._proc_chunks(self, token_indices, tokens_per_chunk)
        return self._model_chunks(self, token_indices, tokens_per_chunk, remove_index)

    def get_llm_pos_ids_for_vision(self, *args):
        return self._vision_ids(self, *args)

    def expand(self, text: str, audio_tokens: list[int], grid: tuple[int, int, int] | None,
               second_per_grid: float | None, use_audio_in_video: bool) -> str:
        return self._expand(
            self, [text], iter(audio_tokens), iter([]), iter([np.array(grid)] if grid else []),
            video_second_per_grid=iter([second_per_grid] if grid else []), use_audio_in_video=use_audio_in_video,
            position_id_per_seconds=self.config.position_id_per_seconds,
            seconds_per_chunk=self.config.seconds_per_chunk,
        )[0]

    def positions(self, ids: list[int], grid: tuple[int, int, int] | None, mel_frames: int | None,
                  second_per_grid: float | None, use_audio_in_video: bool) -> torch.Tensor:
        """[3, len(ids)] TMRoPE positions (the text-only case is 0..L-1 on all three axes)."""
        x = torch.tensor([ids], dtype=torch.long)
        if grid is None and mel_frames is None:
            return torch.arange(len(ids)).expand(3, -1).clone()
        pos, _ = self._rope(
            self, x, None, torch.tensor([grid]) if grid else None, torch.ones_like(x), use_audio_in_video,
            torch.tensor([mel_frames]) if mel_frames is not None else None,
            torch.tensor([second_per_grid]) if grid else None,
        )
        return pos[:, 0]


class _Namespace:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class QwenOmniProcessor:
    """Turns an :class:`OmniRecord` into thinker inputs (an :class:`OmniInputs` with ``positions`` and
    ``video_grid_thw``; ``pixel_values`` holds the video patches, ``audio_features`` the valid mel frames)."""

    family = "qwen2_5_omni"

    def __init__(self, tokenizer, feature_extractor, thinker: dict[str, Any], spec: VideoSpec = VideoSpec(),
                 use_audio_in_video: bool = True, system_prompt: str = QWEN_OMNI_SYSTEM_PROMPT,
                 max_prompt_tokens: int | None = None) -> None:
        self.tokenizer, self.feature_extractor, self.spec = tokenizer, feature_extractor, spec
        self.thinker = thinker
        self.use_audio_in_video = use_audio_in_video
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.index = _OmniIndex(tokenizer, thinker, spec)
        self.feature_device = "cpu"
        self.input_style = "trainer"
        self._text_lock = threading.Lock()  # see OmniProcessor: the tokenizer is not used concurrently

    # ---- prompt ----
    def messages(self, question: str, use_video: bool, use_audio: bool) -> list[dict[str, Any]]:
        """The conversation: the system prompt, then the user turn with the clip and R1-Omni's question (the
        video item carries the audio when it is the video's own track and ``use_audio_in_video``)."""
        items: list[dict[str, Any]] = []
        if use_video:
            items.append({"type": "video"})
        if use_audio and not (use_video and self.use_audio_in_video):
            items.append({"type": "audio"})
        items.append({"type": "text", "text": trainer_question(question)})
        return [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
                {"role": "user", "content": items}]

    def build_prompt(self, question: str, use_video: bool = True, use_audio: bool = True) -> str:
        return self.tokenizer.apply_chat_template(self.messages(question, use_video, use_audio), tokenize=False,
                                                  add_generation_prompt=True)

    # ---- media ----
    def video(self, path: str) -> tuple[torch.Tensor, tuple[int, int, int], float]:
        """(patches, grid, seconds per temporal patch) of one clip."""
        spec = self.spec
        chosen: dict[str, float] = {}

        def choose(total: int, fps: float) -> list[int]:
            if fps <= 0:  # sampling at 2 fps needs the clip's own rate
                raise MediaError("video stream declares no frame rate", file=path)
            n = video_frame_count(total, fps, spec)
            chosen["fps"] = n / total * fps  # the rate the frames were actually sampled at
            return video_frame_indices(total, n)

        if not os.path.isfile(path):
            raise MediaError("video file not found", file=path)
        frames, _ = read_frames(path, choose, threads=1)
        try:
            patches, grid = video_patches(frames, spec)
        except ValueError as e:  # smart_resize refuses extreme aspect ratios
            raise MediaError(f"video frames cannot be resized for Qwen2.5-Omni: {e}", file=path) from None
        return patches, grid, spec.temporal_patch_size / chosen["fps"]

    def audio(self, path: str) -> torch.Tensor:
        """[n_mels, valid frames] float32: the feature extractor's 30 s window cut to the clip's own length."""
        fe = self.feature_extractor
        wave = load_audio(path, sample_rate=fe.sampling_rate)
        out = fe(wave, sampling_rate=fe.sampling_rate, return_attention_mask=True, padding="max_length",
                 return_tensors="pt", device=self.feature_device)
        valid = int(out["attention_mask"][0].sum())
        return out["input_features"][0, :, :valid].to(torch.float32).contiguous()

    # ---- one record ----
    def process(self, record: OmniRecord, use_video: bool = True, use_audio: bool = True) -> OmniInputs:
        use_video = use_video and record.video is not None
        use_audio = use_audio and record.audio is not None
        grid = second = pixels = feats = None
        if use_video:
            pixels, grid, second = self.video(record.video)
        if use_audio:
            feats = self.audio(record.audio)
        interleave = use_video and use_audio and self.use_audio_in_video
        with self._text_lock:
            text = self.build_prompt(record.question, use_video, use_audio)
            audio_tokens = [audio_token_count(feats.shape[1])] if feats is not None else []
            expanded = self.index.expand(text, audio_tokens, grid, second, interleave)
            ids = list(self.tokenizer(expanded, add_special_tokens=False)["input_ids"])
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise MediaError(f"the clip makes a {len(ids)}-token prompt, over model.max_prompt_tokens="
                             f"{self.max_prompt_tokens}", file=record.video or record.audio)
        positions = self.index.positions(ids, grid, feats.shape[1] if feats is not None else None, second, interleave)
        return OmniInputs(
            record_id=record.id, prompt_ids=ids, pixel_values=pixels, audio_features=feats, bert_input_ids=[],
            label=record.label, solution=record.solution, response=record.response, prompt=text,
            positions=positions, video_grid_thw=grid, media_kinds=(use_video, use_audio),
        )

    def response_ids(self, text: str) -> list[int]:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("tokenizer has no eos token")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [int(eos)]

    # ---- checkpoint layout ----
    @classmethod
    def from_pretrained(cls, ckpt_dir: str | os.PathLike, use_audio_in_video: bool = True,
                        system_prompt: str | None = None, max_prompt_tokens: int | None = None,
                        **_: Any) -> QwenOmniProcessor:
        """Tokenizer, feature extractor and video settings from a local Qwen2.5-Omni checkpoint directory
        (preprocessor_config.json / video_preprocessor_config.json as published, or our own file)."""
        from transformers import AutoTokenizer, WhisperFeatureExtractor

        from r1omni_ray.model.qwen_omni import thinker_config_dict

        ckpt = Path(ckpt_dir)
        thinker = thinker_config_dict(ckpt)
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
        fe = WhisperFeatureExtractor.from_pretrained(str(ckpt))
        spec = _video_spec(ckpt)
        return cls(tokenizer, fe, thinker, spec, use_audio_in_video,
                   system_prompt if system_prompt is not None else QWEN_OMNI_SYSTEM_PROMPT, max_prompt_tokens)

    def save_pretrained(self, ckpt_dir: str | os.PathLike) -> Path:
        ckpt = Path(ckpt_dir)
        ckpt.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(ckpt))
        self.feature_extractor.save_pretrained(str(ckpt))
        s = self.spec
        video = {"patch_size": s.patch_size, "temporal_patch_size": s.temporal_patch_size, "merge_size": s.merge_size,
                 "size": {"shortest_edge": s.min_pixels, "longest_edge": s.max_pixels}, "image_mean": list(s.image_mean),
                 "image_std": list(s.image_std), "rescale_factor": s.rescale_factor, "fps": s.fps,
                 "min_frames": s.min_frames, "max_frames": s.max_frames}
        (ckpt / PROCESSOR_FILE).write_text(json.dumps(video, indent=1) + "\n", encoding="utf-8")
        return ckpt


def _video_spec(ckpt: Path) -> VideoSpec:
    """Our file, else the patch settings of a published checkpoint's video_preprocessor_config.json /
    preprocessor_config.json (its pixel budget is not read: Qwen2_5OmniProcessor passes its own video size at
    every call, VideoSpec's min/max_pixels), else the defaults."""
    base = VideoSpec()
    for name in (PROCESSOR_FILE, "video_preprocessor_config.json", "preprocessor_config.json"):
        f = ckpt / name
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{f}: cannot read ({e})") from None
        ours = name == PROCESSOR_FILE
        size = (d.get("size") or {}) if ours else {}
        return VideoSpec(
            patch_size=int(d.get("patch_size", base.patch_size)),
            temporal_patch_size=int(d.get("temporal_patch_size", base.temporal_patch_size)),
            merge_size=int(d.get("merge_size", base.merge_size)),
            min_pixels=int(size.get("shortest_edge", base.min_pixels)),
            max_pixels=int(size.get("longest_edge", base.max_pixels)),
            fps=float(d.get("fps") or base.fps) if ours else base.fps,
            min_frames=int(d.get("min_frames", base.min_frames)) if ours else base.min_frames,
            max_frames=int(d.get("max_frames", base.max_frames)) if ours else base.max_frames,
            image_mean=tuple(d.get("image_mean", base.image_mean)),
            image_std=tuple(d.get("image_std", base.image_std)),
            rescale_factor=float(d.get("rescale_factor", base.rescale_factor)),
        )
    return base
