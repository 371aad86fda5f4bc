"""WAR/UAR/confusion checked by hand and against an independent re-implementation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1omni_ray.emotion_metrics import EmotionMetrics, emotion_metrics
from r1omni_ray.labels import DFEW_LABELS, MAFW_LABELS, RAVDESS_LABELS


def test_hand_example() -> None:
    labels = ["happy", "happy", "sad", "sad", "sad", "angry"]
    preds = ["happy", "sad", "sad", " SAD\n", None, "banana"]
    m = emotion_metrics(preds, labels, DFEW_LABELS)
    assert isinstance(m, EmotionMetrics)
    assert m.n == 6 and m.parse_failures == 1 and m.out_of_set == 2
    assert m.war == pytest.approx(3 / 6)
    assert m.per_class_recall == pytest.approx({"happy": 0.5, "sad": 2 / 3, "angry": 0.0})
    assert m.uar == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)  # only classes with support count
    assert m.support["happy"] == 2 and m.support["fear"] == 0
    assert m.label_set == DFEW_LABELS
    L = len(DFEW_LABELS)
    assert m.confusion.shape == (L, L + 1) and m.confusion.dtype.kind == "i"
    i = {c: k for k, c in enumerate(DFEW_LABELS)}
    assert m.confusion[i["happy"], i["happy"]] == 1 and m.confusion[i["happy"], i["sad"]] == 1
    assert m.confusion[i["sad"], i["sad"]] == 2 and m.confusion[i["sad"], L] == 1
    assert m.confusion[i["angry"], L] == 1
    assert m.confusion.sum() == 6


def test_perfect_and_all_wrong() -> None:
    labels = list(MAFW_LABELS)
    assert emotion_metrics(labels, labels, MAFW_LABELS).war == 1.0
    assert emotion_metrics([x.upper() for x in labels], labels, MAFW_LABELS).uar == 1.0
    wrong = emotion_metrics([None] * len(labels), labels, MAFW_LABELS)
    assert wrong.war == 0.0 and wrong.uar == 0.0 and wrong.parse_failures == len(labels)


def test_ravdess_aliases_are_canonicalised() -> None:
    # R1-Omni maps RAVDESS "fearful"/"surprised" onto "fear"/"surprise".
    m = emotion_metrics(["fear", "Surprised", "calm"], ["fearful", "surprise", "calm"], RAVDESS_LABELS)
    assert m.war == 1.0
    assert "fear" in m.label_set and "fearful" not in m.label_set


def test_uar_differs_from_war_on_imbalance() -> None:
    labels = ["happy"] * 9 + ["sad"]
    preds = ["happy"] * 10
    m = emotion_metrics(preds, labels, DFEW_LABELS)
    assert m.war == pytest.approx(0.9) and m.uar == pytest.approx(0.5)


def test_errors() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        emotion_metrics(["sad", "sad"], ["sad"], DFEW_LABELS)
    with pytest.raises(ValueError, match="'calm' is not in the label set"):
        emotion_metrics(["sad"], ["calm"], DFEW_LABELS)
    with pytest.raises(ValueError, match="not in the label set"):
        emotion_metrics(["sad"], [None], DFEW_LABELS)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="empty"):
        emotion_metrics([], [], [])
    with pytest.raises(ValueError, match="duplicates"):
        emotion_metrics([], [], ["fear", "Fearful"])


def test_empty_and_to_dict_json() -> None:
    m = emotion_metrics([], [], DFEW_LABELS)
    assert m.war == 0.0 and m.uar == 0.0 and m.n == 0 and m.per_class_recall == {}
    d = emotion_metrics(["sad", None], ["sad", "happy"], DFEW_LABELS).to_dict()
    back = json.loads(json.dumps(d))
    assert back["war"] == 0.5 and back["parse_failures"] == 1
    assert len(back["confusion"]) == len(DFEW_LABELS) and len(back["confusion"][0]) == len(DFEW_LABELS) + 1
    assert back["label_set"] == list(DFEW_LABELS)


pred_pool = list(DFEW_LABELS) + ["banana", " Happy ", None]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(pred_pool), st.sampled_from(DFEW_LABELS)), max_size=40))
def test_against_independent_computation(pairs: list[tuple[str | None, str]]) -> None:
    preds = [p for p, _ in pairs]
    labels = [y for _, y in pairs]
    m = emotion_metrics(preds, labels, DFEW_LABELS)

    def norm(p: str | None) -> str | None:
        return p.strip().lower() if isinstance(p, str) else None

    correct = [norm(p) == y for p, y in pairs]
    assert m.war == pytest.approx(sum(correct) / len(pairs) if pairs else 0.0)
    recalls = []
    for c in DFEW_LABELS:
        idx = [k for k, y in enumerate(labels) if y == c]
        if idx:
            recalls.append(sum(correct[k] for k in idx) / len(idx))
            assert m.per_class_recall[c] == pytest.approx(recalls[-1])
    assert m.uar == pytest.approx(float(np.mean(recalls)) if recalls else 0.0)
    assert m.confusion.sum() == len(pairs)
    assert m.confusion.sum(axis=1).tolist() == [labels.count(c) for c in DFEW_LABELS]
    assert m.parse_failures == preds.count(None)
    assert m.confusion[:, -1].sum() == sum(norm(p) not in DFEW_LABELS for p in preds)
