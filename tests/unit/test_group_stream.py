"""Streamed groups (train.stream_groups) through BatchPipeline's public API, on an in-process stand-in for the
rollout group with a simulated clock: calls end in the order their workers would finish them (a "slow" record
takes ten times as long). The real workers run in tests/system/test_off_policy.py."""

from types import SimpleNamespace

from actors.batch_pipeline import BatchPipeline
from actors.rollout_group import PendingRollout
from r1omni_ray.config import config_from_dict
from tests.unit.test_batch_pipeline import G, Rewards, Rollout, recs

N = 4


class StreamRollout(Rollout):
    def __init__(self, workers: int = 2):
        super().__init__()
        self.ids = list(range(workers))
        self.free = dict.fromkeys(self.ids, 0.0)  # when each worker's queue ends
        self.now = 0.0
        self.ends: dict[int, float] = {}

    def worker_ids(self):
        return list(self.ids)

    def ensure_min(self):
        pass

    def submit_to(self, wid, items, params, use_video=True, use_audio=True):
        ref = self.submit(items, params)[0].ref
        dur = max(10.0 if rec.label == "slow" else 1.0 for _, rec in items)
        self.free[wid] = max(self.free[wid], self.now) + dur
        self.ends[id(ref)] = self.free[wid]
        return PendingRollout(wid, items, ref, [])

    def wait_any(self, pending):
        first = min(pending, key=lambda p: self.ends[id(p.ref)])
        self.now = self.ends[id(first.ref)]
        return [first], [p for p in pending if p is not first]


def make(records, workers=2, calls=2, **train):
    cfg = config_from_dict({"rollout": {"group_size": G, "stream_calls_per_worker": calls},
                            "train": {"steps": 10, "prompts_per_step": N, "max_staleness": 1,
                                      "stream_groups": True} | train})
    groups = SimpleNamespace(rollout=StreamRollout(workers), rewards=Rewards())
    return BatchPipeline(cfg, groups, records), groups


def run(pipe, steps, start=0):
    out = []
    for t in range(start, start + steps):
        pipe.fill(t)
        b = pipe.next_batch(t, learner_version=t)
        pipe.groups.rollout.version = t + 1  # the broadcast after the update
        out.append(b)
        pipe.fill(t + 1)
    return out


def test_a_slow_group_holds_only_itself_and_a_later_step_trains_it():
    pipe, _ = make(recs(["happy"] * 8))
    slow = 1  # position 1 of step 0's block is slow
    idx = int(pipe.stream.item(slow)[1].id.split("-")[0][1:])
    records = recs(["slow" if i == idx else "happy" for i in range(8)])
    # one call per worker: nothing queues behind the slow call (with two, the one behind it waits too)
    pipe, groups = make(records, calls=1, max_staleness=2)
    assert pipe.stream.item(slow)[1].label == "slow"
    batches = run(pipe, 4)
    # step 0 trained the next block's first group instead, and a later step trained the slow one (within k)
    assert slow not in [g.uid for g in batches[0].samples] and len(batches[0].samples) == N
    assert batches[0].counters["stream/other_step_groups"] == 1
    assert len([b for b in batches if slow in [g.uid for g in b.samples]]) == 1
    assert sum(b.counters["async/stale_redrawn"] for b in batches) == 0
    # every position trained once at most; the ones skipped so far are exactly those still ahead
    trained = [g.uid for b in batches for g in b.samples]
    assert len(trained) == len(set(trained)) == 4 * N
    assert sorted(set(range(max(trained) + 1)) - set(trained)) == sorted(
        p for p in pipe.stream.positions_ahead() if p < max(trained))
    assert all(len(b.samples) == N and b.advantages.shape == (N * G,) for b in batches)


def test_the_stream_keeps_each_worker_fed_within_the_window():
    pipe, groups = make(recs(["happy"] * 16), workers=2, max_staleness=2)
    pipe.fill(0)
    # (k + 1) * N = 12 groups may be ahead, but each worker holds at most stream_calls_per_worker (2) calls of
    # stream_chunk (1) prompt
    assert len(pipe.in_flight()) == 4 and {p.worker_id for p in pipe.in_flight()} == {0, 1}
    pipe, _ = make(recs(["happy"] * 16), workers=8, max_staleness=1)
    pipe.fill(0)
    assert sum(len(p.items) for p in pipe.in_flight()) == 2 * N  # the window, not the workers, binds
    pipe.fill(9)  # the last step: only its own groups
    assert sum(len(p.items) for p in pipe.in_flight()) == 2 * N
    pipe, _ = make(recs(["happy"] * 16), workers=8, max_staleness=1)
    pipe.fill(9)
    assert sum(len(p.items) for p in pipe.in_flight()) == N
    # by default a worker queues what the window holds: the driver sends nothing while the learners update
    pipe, _ = make(recs(["happy"] * 16), workers=2, calls=None, max_staleness=2)
    pipe.fill(0)
    assert len(pipe.in_flight()) == 3 * N and {p.worker_id for p in pipe.in_flight()} == {0, 1}


def test_stale_groups_are_drawn_again_never_trained_on():
    pipe, groups = make(recs(["happy"] * 16))
    pipe.fill(0)
    while pipe.in_flight():  # everything ahead completes at version 0
        pipe.stream.receive()
    groups.rollout.version = 3
    b = pipe.next_batch(3, learner_version=3)
    assert b.counters["async/stale_redrawn"] == 4  # 2 workers x 2 calls of one prompt were ahead
    assert all(g.weight_version == 3 for g in b.samples)
    assert sorted(g.uid for g in b.samples) == list(range(N))  # drawn again first, in order


def test_a_checkpoint_state_resumes_without_repeating_or_skipping_a_prompt():
    records = recs(["happy"] * 5 + ["slow"] * 3)
    pipe, _ = make(records)
    before = run(pipe, 3)
    state = pipe.state()
    assert state["redo"] == pipe.stream.positions_ahead() and state["next"] > max(state["redo"])
    again, groups = make(records)
    groups.rollout.version = 3  # the checkpoint's weights, loaded into the workers
    again.restore(state, 3)
    assert not again.in_flight()
    after = run(again, 3, start=3)
    trained = [g.uid for b in before + after for g in b.samples]
    assert len(trained) == len(set(trained)) == 6 * N
    lost = set(range(max(trained) + 1)) - set(trained)
    assert lost <= set(again.stream.positions_ahead())
    # a run that did not stream (no saved state) continues at its step's block
    fresh, _ = make(records)
    fresh.restore(None, 5)
    fresh.fill(5)
    assert min(u for p in fresh.in_flight() for u, _ in p.items) == 5 * N


def test_the_group_filter_streams_on_past_flat_groups():
    pipe, _ = make(recs(["happy", "flat"] * 8), filter_groups=True, filter_max_rounds=3)
    batches = run(pipe, 3)
    for b in batches:
        assert len(b.samples) == N and b.advantages.abs().gt(0).all()
        assert b.counters["filter/informative_groups"] == N and b.counters["filter/short_steps"] == 0
        assert len(b.scored) == (N + b.counters["filter/flat_groups_seen"]) * G
    pipe, _ = make(recs(["flat"] * 8), filter_groups=True, filter_max_rounds=2)
    b = run(pipe, 1)[0]
    assert len(b.samples) == N and b.counters["filter/short_steps"] == 1
    assert b.counters["filter/flat_groups_seen"] == 3 * N and b.counters["filter/rounds"] == 2


def test_a_record_that_fails_to_decode_is_counted_once_and_its_positions_pass_without_a_call():
    pipe, groups = make(recs(["happy"] * 7 + ["bad"]), steps=12)
    batches = run(pipe, 12)  # six epochs of the 8 records
    assert sum(len(b.skipped) for b in batches) == 1
    assert batches[-1].counters["data/known_bad_records"] == 1.0
    assert groups.rollout.decoded.count("r7-bad") <= 2  # found, plus a call already in flight then
    # the step that found it trains N - 1 groups (as an unstreamed step does); the rest are full
    assert sorted(len(b.samples) for b in batches) == [N - 1] + [N] * 11
