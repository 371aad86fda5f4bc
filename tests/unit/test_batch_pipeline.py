"""actors/batch_pipeline.BatchPipeline through its public API, on in-process stand-ins for the role groups (the
real ones run in tests/system/test_off_policy.py): the staleness window, stale prompts redrawn, and DAPO's
group filter with deterministic refills."""

from types import SimpleNamespace

import pytest

from actors.batch_pipeline import REFILL_UID_STRIDE, BatchPipeline
from actors.rollout import PromptSamples
from actors.rollout_group import PendingRollout
from r1omni_ray.config import config_from_dict
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

    def submit(self, items, params, use_video=True, use_audio=True, next_items=None):
        self.submitted.append([u for u, _ in items])
        out = []
        for uid, rec in items:
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


def make(records, **train):
    cfg = config_from_dict({"rollout": {"group_size": G},
                            "train": {"steps": 10, "prompts_per_step": 4} | train})
    groups = SimpleNamespace(rollout=Rollout(), rewards=Rewards())
    return BatchPipeline(cfg, groups, records), groups


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
                                            "filter/flat_groups_seen": 12.0, "filter/short_steps": 1.0})
