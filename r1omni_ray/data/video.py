"""Video frame loading (decord) + SigLIP preprocessing, HumanOmni style.

Frames are sampled as HumanOmni samples them (segment midpoints, short videos repeat frames), each
frame is optionally padded to a square with the image processor's mean colour (``aspect_ratio="pad"``)
and then resized and normalised by the (transformers) SiglipImageProcessor that is passed in.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from r1omni_ray.data.errors import MediaError


def sample_frame_indices(total: int, num_frames: int) -> list[int]:
    """HumanOmni's ``frame_sample(duration, mode="uniform")`` (humanomni/mm_utils.py): the rounded
    midpoints of ``num_frames`` equal segments of ``[0, total - 1]``.

    Always ``num_frames`` indices: a video shorter than that repeats frames (the reference never pads).
    """
    if total <= 0:
        return []
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    seg = float(total - 1) / num_frames
    mids = (np.arange(num_frames) * seg + np.arange(1, num_frames + 1) * seg) / 2
    # The reference adds 1e-6 before np.round, so exact halves round up, not to even.
    return np.round(mids + 1e-6).astype(np.int64).tolist()


def background_colour(image_processor) -> tuple[int, int, int]:
    """The pad colour as HumanOmni computes it: ``int(mean * 255)`` per channel (127 for SigLIP's 0.5)."""
    mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    if isinstance(mean, (int, float)):
        mean = (mean, mean, mean)
    return tuple(int(float(m) * 255) for m in mean)  # type: ignore[return-value]


def pad_to_square(frame: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Centre an HxWx3 uint8 frame on a square canvas filled with ``colour``."""
    h, w = frame.shape[:2]
    if h == w:
        return frame
    side = max(h, w)
    canvas = np.empty((side, side, 3), dtype=frame.dtype)
    canvas[...] = np.asarray(colour, dtype=frame.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = frame
    return canvas


def _preprocess(frames: np.ndarray, image_processor, pad: bool) -> torch.Tensor:
    from PIL import Image

    colour = background_colour(image_processor)
    images = [
        Image.fromarray(pad_to_square(np.ascontiguousarray(f), colour) if pad else np.ascontiguousarray(f))
        for f in frames
    ]
    out = image_processor(images=images, return_tensors="pt")
    pixel_values = out["pixel_values"]
    if not isinstance(pixel_values, torch.Tensor):
        pixel_values = torch.as_tensor(np.asarray(pixel_values))
    return pixel_values.to(torch.float32)


def load_video_frames(
    path: str | os.PathLike, num_frames: int, image_processor, pad: bool = True
) -> torch.Tensor:
    """Return ``[num_frames, 3, H, W]`` float32 pixel values for a video file.

    ``pad``: pad each frame to a square first (R1-Omni's trainer, ``aspect_ratio="pad"``); without it the
    image processor resizes the frame as it is (its inference path, ``aspect_ratio=None``).
    Raises :class:`MediaError` (naming the file) for a missing, unreadable, corrupt, truncated
    or frameless video.
    """
    path = os.fspath(path)
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if not os.path.isfile(path):
        raise MediaError("video file not found", file=path)
    if os.path.getsize(path) == 0:
        raise MediaError("video file is empty (0 bytes)", file=path)

    import decord

    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        total = len(vr)
    except Exception as e:  # decord raises DECORDError / RuntimeError with C++ messages
        raise MediaError(f"cannot open video: {_short(e)}", file=path) from None
    if total <= 0:
        raise MediaError("video has no frames", file=path)
    indices = sample_frame_indices(total, num_frames)
    try:
        frames = vr.get_batch(indices).asnumpy()
    except Exception as e:
        raise MediaError(f"cannot decode frames {indices}: {_short(e)}", file=path) from None
    finally:
        del vr
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise MediaError(f"unexpected decoded frame array shape {frames.shape}", file=path)

    try:
        pixel_values = _preprocess(frames, image_processor, pad)
    except Exception as e:
        raise MediaError(f"image preprocessing failed: {_short(e)}", file=path) from e
    return pixel_values


def _short(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split())
    return msg if len(msg) <= limit else msg[:limit] + "..."
