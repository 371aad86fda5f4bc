"""actors/batch_pipeline.BatchPipeline through its public API, on in-process stand-ins for the role groups (the
real ones run in tests/system/test_off_policy.py): the staleness window, stale prompts redrawn, and DAPO's
group filter with deterministic refills."""

import json
from types import SimpleNamespace

import pytest

from actors.batch_pipeline import REFILL_UID_STRIDE, BatchPipeline
from actors.rollout import PromptSamples
from actors.rollout_group import PendingRollout
from r1omni_ray.config import config_from_dict
from r1omni_ray.data.bad_records import BadRecords
from r1omni_ray.data.errors import DataError
from r1omni_ray.data.records import OmniRecord
from r1omni_ray.engines.base import Completion
from r1omni_ray.rewards import RewardSpec, score_completions

G = 4
GOOD = "<think>x</think><answer>happy</answer>"


class Rollout:
    """Samples drawn at submit time with the weights the workers hold then. Records whose label is "flat" get
    G identical completions (equal rewards); the others alternate right and wrong."""

    def __init__(self):
        self.version = 0
        self.submitted: list[list[int]] = []  # uids of each call
        self.decoded: list[str] = []  # record ids sent to be decoded

    def submit(self, items, params, use_video=True, use_audio=True, next_items=None):
        self.submitted.append([u for u, _ in items])
        self.decoded += [rec.id for _, rec in items]
        out = []
        for uid, rec in items:
            if rec.label == "bad":  # its media fails to decode on the worker
                out.append(PromptSamples(uid, rec.id, None, error=f"/data/{rec.id}.mp4: cannot open video", worker=0))
                continue
            texts = [GOOD] * G if rec.label == "flat" else [GOOD if j % 2 else "no" for j in range(G)]
            comps = [Completion([7] * (j + 1), t, "stop", logprobs=[-0.5] * (j + 1)) for j, t in enumerate(texts)]
            inputs = SimpleNamespace(label="happy", solution="<answer>happy</answer>", prompt_ids=[1, 2])
            out.append(PromptSamples(uid, rec.id, inputs, comps, weight_version=self.version, worker=0))
        return [PendingRollout(0, items, out, [])]

    def collect(self, pending, params, use_video=True, use_audio=True):
        return sorted([s for p in pending for s in p.ref], key=lambda s: s.uid)


class Rewards:
    def score(self, texts, sols):
        return score_completions(texts, sols, [RewardSpec("accuracy", 1.0)])


def make(records, bad=None, **train):
    cfg = config_from_dict({"rollout": {"group_size": G},
                            "train": {"steps": 10, "prompts_per_step": 4} | train})
    groups = SimpleNamespace(rollout=Rollout(), rewards=Rewards())
    return BatchPipeline(cfg, groups, records, bad=bad), groups


def recs(labels):
    return [OmniRecord(f"r{i}-{lab}", None, None, "q", lab, "<answer>happy</answer>") for i, lab in enumerate(labels)]


def test_the_window_submits_up_to_k_steps_ahead_and_each_step_once():
    pipe, groups = make(recs(["happy"] * 8), max_staleness=2)
    pipe.fill(0)
    assert len(groups.rollout.submitted) == 3  # steps 0, 1, 2 at version 0
    batch = pipe.next_batch(0, learner_version=0)
    assert len(batch.samples) == 4 and batch.counters["async/stale_redrawn"] == 0
    pipe.fill(1)
    assert len(groups.rollout.submitted) == 4  # step 3 only
    pipe.fill(1)
    assert len(groups.rollout.submitted) == 4
    assert sorted(pipe.window) == [1, 2, 3]
    pipe.discard()
    assert not pipe.in_flight()


def test_samples_older_than_max_staleness_are_redrawn_never_trained_on():
    pipe, groups = make(recs(["happy"] * 8), max_staleness=1)
    pipe.fill(0)  # steps 0 and 1 drawn at version 0
    groups.rollout.version = 2  # the learners moved on twice (e.g. a rollout left waiting)
    batch = pipe.next_batch(1, learner_version=2)
    assert batch.counters["async/stale_redrawn"] == 4 and pipe.stale_dropped == 4
    assert all(g.weight_version == 2 for g in batch.samples)
    assert [g.uid for g in batch.samples] == [0, 1, 2, 3]


def test_group_filter_keeps_informative_groups_and_refills_deterministically():
    labels = ["happy", "flat"] * 8
    pipe, groups = make(recs(labels), filter_groups=True, filter_max_rounds=5)
    batch = pipe.next_batch(0, learner_version=0)
    assert len(batch.samples) == 4 and all(r.split("-")[1] == "happy" for r in [g.record_id for g in batch.samples])
    assert batch.advantages.abs().gt(0).all()  # every kept group has signal
    assert batch.counters["filter/rounds"] >= 1 and batch.counters["filter/informative_groups"] >= 4
    refills = [u for call in groups.rollout.submitted[1:] for u in call]
    assert refills and all(u >= REFILL_UID_STRIDE for u in refills)  # fresh uids: fresh per-sample seeds
    assert len(batch.scored) > len(batch.rewards)  # the reward metrics see every group sampled
    # A pure function of (seed, step): a second pipeline picks the same records and refill ids.
    again, groups2 = make(recs(labels), filter_groups=True, filter_max_rounds=5)
    assert [g.record_id for g in again.next_batch(0, 0).samples] == [g.record_id for g in batch.samples]
    assert groups2.rollout.submitted == groups.rollout.submitted


def test_group_filter_short_of_signal_tops_up_with_flat_groups_and_says_so():
    pipe, _ = make(recs(["flat"] * 8), filter_groups=True, filter_max_rounds=2)
    batch = pipe.next_batch(0, learner_version=0)
    assert len(batch.samples) == 4 and not batch.advantages.any()
    assert batch.counters == pytest.approx({"async/stale_redrawn": 0.0, "async/stale_redrawn_total": 0.0,
                                            "filter/rounds": 2.0, "filter/informative_groups": 0.0,
                                            "filter/flat_groups_seen": 12.0, "filter/short_steps": 1.0,
                                            "data/known_bad_records": 0.0})


def test_a_record_that_fails_to_decode_is_counted_once_and_never_decoded_again(tmp_path, caplog):
    """Six epochs over 8 records, one of them bad, with steps submitted 2 ahead: it is named, counted and
    listed once (a step already in flight when it was found does not count it again), then never sent."""
    records = recs(["happy"] * 7 + ["bad"])
    bad = BadRecords(tmp_path / "skipped_records.jsonl", "rlvr")
    pipe, groups = make(records, bad=bad, max_staleness=2, steps=12)
    counted, sent_after = [], []
    with caplog.at_level("WARNING", logger="r1omni_ray"):
        for step in range(12):
            pipe.fill(step)
            batch = pipe.next_batch(step, learner_version=step)
            counted.append(len(batch.skipped))
            assert "r7-bad" not in [g.record_id for g in batch.samples]
            if sum(counted) and not batch.skipped:
                sent_after.append(groups.rollout.decoded.count("r7-bad"))
    assert sum(counted) == 1 and batch.counters["data/known_bad_records"] == 1.0
    assert caplog.text.count("skipped record 'r7-bad'") == 1 and "left out of the rest of the run" in caplog.text
    # sent at most once more: the steps already in flight when it was found, then never again
    assert len(set(sent_after)) == 1 and groups.rollout.decoded.count("r7-bad") <= 3
    lines = [json.loads(x) for x in (tmp_path / "skipped_records.jsonl").read_text().splitlines()]
    assert lines == [{"record": "r7-bad", "phase": "rlvr", "step": lines[0]["step"],
                      "reason": "/data/r7-bad.mp4: cannot open video"}]


def test_the_bad_record_list_survives_resume_and_a_fresh_run_starts_its_own(tmp_path):
    path = tmp_path / "skipped_records.jsonl"
    sft = BadRecords(path, "sft")
    assert sft.add("clip-1", "no audio track", None) and not sft.add("clip-1", "no audio track", None)
    run = BadRecords(path, "rlvr")
    run.add("clip-2", "truncated", 3)
    run.add("clip-3", "garbage", 9)
    resumed = BadRecords(path, "rlvr", resume_step=5)  # steps 6.. are replayed: what they found is found again
    assert "clip-2" in resumed and "clip-3" not in resumed and "clip-1" not in resumed and len(resumed) == 1
    assert [json.loads(x)["record"] for x in path.read_text().splitlines()] == ["clip-1", "clip-2"]
    fresh = BadRecords(path, "rlvr")  # a new RLVR run (--overwrite) keeps the SFT stage's entries only
    assert len(fresh) == 0 and [json.loads(x)["phase"] for x in path.read_text().splitlines()] == ["sft"]
    path.write_text(path.read_text() + '{"record": "cut-sh')  # a crash mid-write
    assert len(BadRecords(path, "sft", resume_step=0)) == 1


def test_a_run_where_no_record_decodes_stops_with_a_named_error():
    pipe, _ = make(recs(["bad"] * 4))
    with pytest.raises(DataError, match="none of the 4 training records decodes .*cannot open video"):
        pipe.next_batch(0, learner_version=0)


def test_a_group_without_completions_is_counted_but_not_remembered():
    """Only a record whose media failed is left out for the rest of the run: an empty group is not its fault."""
    pipe, groups = make(recs(["happy"] * 4))
    real_submit = groups.rollout.submit

    def empty_first(items, params, *a, **k):
        pending = real_submit(items, params, *a, **k)
        for p in pending:
            for s in p.ref:
                if s.record_id == "r0-happy":
                    s.completions = []
        return pending

    groups.rollout.submit = empty_first
    batch = pipe.next_batch(0, learner_version=0)
    assert [g.record_id for g in batch.skipped] == ["r0-happy"] and len(pipe.bad) == 0
    assert "r0-happy" in [rec.id for _, rec in pipe.items_for(1)]  # every step draws all 4: still drawn
