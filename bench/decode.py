"""Video decoding: 8 frames (HumanOmni's sampling) of a 10 s 720p H.264 clip, by the reference's decord 0.6
and by this project's PyAV path (r1omni_ray.data.video.decode_frames), side by side in one process, one
decode thread each (as the rollout worker's decode pool runs them). The clips are made here with PyAV: one
keyframe every second (streamed/camera files) and one keyframe for the whole clip (x264's default GOP of 250).
Prints one JSON line per clip: seconds per decode for both (median and range over --repeats), their ratio, and
whether the frames were equal.

    python -m bench.decode [--repeats 5] [--seconds 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from bench.common import emit, machine_info, median, rounded


def write_clip(path: Path, seconds: int, gop: int | None, fps: int = 25, width: int = 1280, height: int = 720) -> None:
    import av

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    noise = rng.normal(0, 6, (height, width, 3))
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"preset": "veryfast", "crf": "23"} | ({"g": str(gop)} if gop else {})
        for t in range(seconds * fps):
            img = np.stack([(x + 3 * t) % 256, (y + 2 * t) % 256, ((x + y) // 2 + t) % 256], -1)
            frame = av.VideoFrame.from_ndarray(np.clip(img + np.roll(noise, 7 * t, axis=1), 0, 255).astype(np.uint8),
                                               format="rgb24")
            frame.pts = t
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args(argv)
    from r1omni_ray.data.video import decode_frames, sample_frame_indices

    try:
        import decord
    except ImportError:
        decord = None
    emit({"bench": "decode", "machine": machine_info(), "decord": getattr(decord, "__version__", None)})
    with tempfile.TemporaryDirectory() as tmp:
        for name, gop in (("keyframe_every_1s", 25), ("one_keyframe", None)):
            path = Path(tmp) / f"{name}.mp4"
            write_clip(path, args.seconds, gop)
            ours_s, ref_s, equal = [], [], None
            for _ in range(args.repeats):  # interleaved, so drift on the machine hits both alike
                t0 = time.perf_counter()
                ours = decode_frames(path, 8, threads=1)
                ours_s.append(time.perf_counter() - t0)
                if decord is not None:
                    t0 = time.perf_counter()
                    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
                    ref = vr.get_batch(sample_frame_indices(len(vr), 8)).asnumpy()
                    del vr
                    ref_s.append(time.perf_counter() - t0)
                    equal = bool(np.array_equal(ours, ref)) if equal in (None, True) else False
            rec = {"clip": name, "seconds": args.seconds, "size": "1280x720", "mb": rounded(path.stat().st_size / 2**20, 3),
                   "pyav_s": rounded(median(ours_s)), "pyav_range_s": [rounded(min(ours_s)), rounded(max(ours_s))]}
            if ref_s:
                rec |= {"decord_s": rounded(median(ref_s)), "decord_range_s": [rounded(min(ref_s)), rounded(max(ref_s))],
                        "pyav_over_decord": rounded(median(ours_s) / median(ref_s), 3), "frames_equal": equal}
            emit(rec)


if __name__ == "__main__":
    main()
