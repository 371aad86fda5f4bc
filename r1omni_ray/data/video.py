"""Video frame loading + SigLIP preprocessing, HumanOmni style.

Frames are sampled as HumanOmni samples them (segment midpoints, short videos repeat frames), each
frame is optionally padded to a square with the image processor's mean colour (``aspect_ratio="pad"``)
and then resized and normalised by the (transformers) SiglipImageProcessor that is passed in.

Decoding is PyAV's (ffmpeg), reproducing what the reference's decord 0.6 returns bit for bit: the same frame
count (every packet of the best video stream), the same frame order (presentation time), the same RGB pixels
(ffmpeg's default yuv->rgb24 conversion) and the same display-matrix rotation. decord 0.6 itself returns a
garbled or failed frame for widths whose RGB row padding is a multiple of the width (16, 24, 48, 72 px...);
this path has no such case. tests/unit/test_decoder_reference.py holds the clips and decord 0.6's arrays.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from r1omni_ray.data.errors import MediaError, media_cause


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


def decode_frames(path: str | os.PathLike, num_frames: int, threads: int = 0) -> np.ndarray:
    """``[num_frames, H, W, 3]`` uint8 RGB frames at ``sample_frame_indices(total, num_frames)``: equal to
    decord 0.6's ``VideoReader(path, ctx=cpu(0)).get_batch(indices).asnumpy()``. ``threads``: ffmpeg's decode
    threads (0: its own choice). Raises :class:`MediaError` naming the file for anything undecodable."""
    return read_frames(path, lambda total, fps: sample_frame_indices(total, num_frames), threads)[0]


def read_frames(path: str | os.PathLike, choose: Callable[[int, float], Sequence[int]], threads: int = 0
                ) -> tuple[np.ndarray, float]:
    """The frames at ``choose(total frames, average fps)`` (decord's frame numbering, as ``decode_frames``), and
    that fps. Raises :class:`MediaError` naming the file for anything undecodable."""
    import av

    path = os.fspath(path)
    try:
        container = av.open(path)
    except av.error.FFmpegError as e:
        raise MediaError(f"cannot open video: {media_cause(e, path)}", file=path) from None
    with container:
        try:
            stream = container.streams.best("video")
        except av.error.FFmpegError:
            stream = None
        if stream is None:
            raise MediaError("no video stream in the file", file=path)
        try:
            index = _frame_index(container, stream)
            if not index.pts:
                raise MediaError("video has no frames", file=path)
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0  # 0: the stream declares none (HumanOmni's sampling needs none)
            indices = list(choose(len(index.pts), fps))
            frames = _decode_at(container, stream, index, sorted(set(indices)), threads)
        except av.error.FFmpegError as e:
            raise MediaError(f"cannot decode video: {media_cause(e, path)}", file=path) from None
    missing = [i for i in indices if i not in frames]
    if missing:
        raise MediaError(f"video ends before frame {missing[0]} of the {len(index.pts)} its packets index "
                         "(truncated or corrupt)", file=path)
    return np.stack([frames[i] for i in indices]), fps


@dataclass(frozen=True)
class _FrameIndex:
    pts: list[int]  # every packet's presentation time, sorted: frame i is the i-th (decord's frame count)
    keyframes: list[int]  # frame indices that decoding can start from


def _frame_index(container, stream) -> _FrameIndex:
    """One pass over the packets (no decoding), as decord builds its index."""
    pts, keys = [], []
    for packet in container.demux(stream):
        if packet.size == 0 and packet.pts is None and packet.dts is None:
            continue  # PyAV's end-of-stream flush packet, not a packet of the file
        t = packet.pts if packet.pts is not None else packet.dts
        pts.append(t if t is not None else len(pts))
        if packet.is_keyframe:
            keys.append(pts[-1])
    order = sorted(pts)
    pos = {t: i for i, t in enumerate(order)}
    return _FrameIndex(order, sorted(pos[t] for t in keys))


class _SeekMiss(Exception):
    """A seek landed where frames can't be named by pts, or past the frame wanted."""


def _decode_at(container, stream, index: _FrameIndex, wanted: list[int], threads: int) -> dict[int, np.ndarray]:
    """The wanted frames (sorted indices): decoding forward and seeking to a keyframe where one lies between
    the last frame decoded and the next one wanted (long clips), else counting frames from the start."""
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    if len(index.keyframes) > 1 and len(set(index.pts)) == len(index.pts):
        try:
            return _decode_seeking(container, stream, index, wanted)
        except _SeekMiss:
            pass
    container.seek(0, stream=stream, backward=True, any_frame=False)
    out: dict[int, np.ndarray] = {}
    todo = set(wanted)
    for i, frame in enumerate(container.decode(stream)):
        if i in todo:
            out[i] = _rgb(frame)
            if len(out) == len(todo):
                break
    return out


def _decode_seeking(container, stream, index: _FrameIndex, wanted: list[int]) -> dict[int, np.ndarray]:
    import bisect

    pos = {t: i for i, t in enumerate(index.pts)}
    out: dict[int, np.ndarray] = {}
    todo = list(wanted)

    def keyframe_before(i: int) -> int:
        k = bisect.bisect_right(index.keyframes, i) - 1
        return index.keyframes[k] if k >= 0 else 0

    start = keyframe_before(todo[0])
    while todo:
        container.seek(index.pts[start], stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            i = pos.get(frame.pts) if frame.pts is not None else None
            if i is None or i > todo[0]:
                raise _SeekMiss
            if i == todo[0]:
                out[i] = _rgb(frame)
                todo.pop(0)
                if not todo:
                    return out
            k = keyframe_before(todo[0])
            if k > i + 1:  # a keyframe lies between this frame and the next one wanted: jump there
                start = k
                break
        else:
            return out  # the stream ended: what is still wanted does not exist
    return out


def _rgb(frame) -> np.ndarray:
    """ffmpeg's rgb24 conversion (what decord's filter graph gives), turned by the display matrix's rotation
    as decord 0.6 turns it (transpose filters in quarter turns)."""
    arr = frame.to_ndarray(format="rgb24")
    rotation = frame.rotation  # degrees counter-clockwise
    quarter = int(round(rotation / 90)) % 4 if rotation not in (None, -(2**31)) else 0
    return np.ascontiguousarray(np.rot90(arr, quarter)) if quarter else arr


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
    frames = decode_frames(path, num_frames, threads=1)
    try:
        pixel_values = _preprocess(frames, image_processor, pad)
    except Exception as e:
        raise MediaError(f"image preprocessing failed: {_short(e)}", file=path) from e
    return pixel_values


def _short(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split())
    return msg if len(msg) <= limit else msg[:limit] + "..."
