"""Records into model inputs on a thread pool, with the next step's records decoding ahead.

Decoding is video frames (decord/ffmpeg), the audio track (decord), Whisper features (a torch STFT) and
tokenisation: each of these spends its time outside the GIL, so threads run them side by side. A rollout
worker decodes a step's records in parallel and, while it generates, the next step's (``prefetch``): on a
GPU node the media are then ready when the next rollout call arrives, instead of 1-2 s of serial decode on
its critical path. Decoding does not depend on the weights, so a prefetched record is the same input.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from r1omni_ray.data.errors import DataError

Decoded = Any  # OmniInputs, or the DataError that a bad record raised


class MediaDecoder:
    def __init__(self, process: Callable[[Any, bool, bool], Any], threads: int) -> None:
        """process(record, use_video, use_audio) -> OmniInputs, raising DataError for bad media."""
        self.process = process
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="media-decode")
        self.ahead: dict[tuple[str, bool, bool], deque[Future]] = defaultdict(deque)

    def _one(self, record: Any, use_video: bool, use_audio: bool) -> Decoded:
        try:
            return self.process(record, use_video, use_audio)
        except DataError as e:
            return e

    def _submit(self, record: Any, use_video: bool, use_audio: bool) -> Future:
        return self.pool.submit(self._one, record, use_video, use_audio)

    def decode(self, records: Sequence[Any], use_video: bool, use_audio: bool) -> list[Decoded]:
        """Each record's inputs (or its DataError), in order: prefetched ones as they are, the rest now, in
        parallel."""
        futures = []
        for r in records:
            queue = self.ahead.get((r.id, use_video, use_audio))
            futures.append(queue.popleft() if queue else self._submit(r, use_video, use_audio))
        return [f.result() for f in futures]

    def prefetch(self, records: Sequence[Any], use_video: bool, use_audio: bool) -> None:
        """Start decoding records that a later call will ask for. Replaces an earlier prefetch that went
        unused (a re-issued step, the run's end): at most one step is held ahead."""
        for queue in self.ahead.values():
            for f in queue:
                f.cancel()
        self.ahead.clear()
        for r in records:
            self.ahead[(r.id, use_video, use_audio)].append(self._submit(r, use_video, use_audio))

    def close(self) -> None:
        self.prefetch([], True, True)
        self.pool.shutdown(wait=False, cancel_futures=True)
