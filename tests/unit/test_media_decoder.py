"""The rollout worker's media decoding: records decode side by side on threads, in order, bad ones as their
DataError; the next step's records decode ahead and are not decoded twice."""

import threading
from dataclasses import dataclass

from r1omni_ray.data.errors import MediaError
from r1omni_ray.data.media_decoder import MediaDecoder


@dataclass(frozen=True)
class Rec:
    id: str


class Counting:
    def __init__(self, barrier: threading.Barrier | None = None) -> None:
        self.calls: list[tuple[str, bool, bool]] = []
        self.lock = threading.Lock()
        self.barrier = barrier

    def __call__(self, rec: Rec, video: bool, audio: bool):
        with self.lock:
            self.calls.append((rec.id, video, audio))
        if self.barrier is not None:
            self.barrier.wait(timeout=10)  # passes only when `parties` decodes run at the same time
        if rec.id.startswith("bad"):
            raise MediaError("cannot decode", file=f"/data/{rec.id}.mp4")
        return f"inputs:{rec.id}:{video}:{audio}"


def test_records_decode_in_parallel_in_order_with_errors_as_values():
    proc = Counting(threading.Barrier(3))
    dec = MediaDecoder(proc, threads=3)
    out = dec.decode([Rec("a"), Rec("bad1"), Rec("c")], True, False)
    assert out[0] == "inputs:a:True:False" and out[2] == "inputs:c:True:False"
    assert isinstance(out[1], MediaError) and "/data/bad1.mp4" in str(out[1])
    dec.close()


def test_prefetched_records_are_not_decoded_again_and_an_unused_prefetch_is_dropped():
    proc = Counting()
    dec = MediaDecoder(proc, threads=2)
    dec.prefetch([Rec("x"), Rec("y"), Rec("y")], True, True)  # a record twice in a step: decoded twice
    assert dec.decode([Rec("y"), Rec("x"), Rec("y")], True, True) == ["inputs:y:True:True", "inputs:x:True:True",
                                                                      "inputs:y:True:True"]
    assert sorted(proc.calls) == [("x", True, True), ("y", True, True), ("y", True, True)]
    # Another modality choice is another input: decoded anew. A newer prefetch replaces an unused one.
    dec.prefetch([Rec("z")], True, True)
    assert dec.decode([Rec("z")], True, False) == ["inputs:z:True:False"]
    dec.prefetch([Rec("w")], True, True)
    assert list(dec.ahead) == [("w", True, True)]
    assert dec.decode([Rec("w")], True, True) == ["inputs:w:True:True"]
    assert proc.calls.count(("w", True, True)) == 1
    dec.close()


def test_the_real_processor_on_four_threads_equals_one_record_at_a_time(tiny_ckpt, synth_data):
    """Frames, audio, features and both tokenisers on 4 threads (the tokenisers take turns): every input equals
    the serial one exactly."""
    import torch

    from r1omni_ray.data.processor import OmniProcessor
    from r1omni_ray.data.records import load_records

    proc = OmniProcessor.from_pretrained(tiny_ckpt)
    recs = load_records(synth_data / "train.json").records * 3
    dec = MediaDecoder(lambda r, v, a: proc.process(r, use_video=v, use_audio=a), threads=4)
    parallel = dec.decode(recs, True, True)
    dec.close()
    for r, got in zip(recs, parallel, strict=True):
        want = proc.process(r)
        assert got.prompt_ids == want.prompt_ids and got.bert_input_ids == want.bert_input_ids
        for name in ("pixel_values", "audio_features"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None and b is None) or torch.equal(a, b), (r.id, name)
