"""Emotion-recognition evaluation metrics: WAR, UAR, per-class recall and confusion matrix.

WAR (weighted average recall) is plain accuracy; UAR (unweighted average recall) is the mean of
per-class recalls over classes present in the labels — the two numbers R1-Omni reports on
DFEW/MAFW/RAVDESS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from r1omni_ray.labels import canonical_label


@dataclass
class EmotionMetrics:
    war: float
    uar: float
    per_class_recall: dict[str, float]  # only classes with support > 0 (recall is undefined otherwise)
    confusion: np.ndarray  # [L, L+1] int64; rows = true label, last column = outside the label set
    n: int
    parse_failures: int  # predictions that were not text at all (None from a failed parse)
    label_set: tuple[str, ...]
    out_of_set: int = 0  # predictions in the last column (parse failures included)
    support: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (plain Python types only)."""
        return {
            "war": self.war,
            "uar": self.uar,
            "per_class_recall": dict(self.per_class_recall),
            "support": dict(self.support),
            "confusion": self.confusion.tolist(),
            "n": self.n,
            "parse_failures": self.parse_failures,
            "out_of_set": self.out_of_set,
            "label_set": list(self.label_set),
        }


def emotion_metrics(
    predictions: Sequence[str | None],
    labels: Sequence[str],
    label_set: Sequence[str],
) -> EmotionMetrics:
    """Score predictions against ground-truth labels.

    Predictions, labels and the label set are all normalised with ``canonical_label`` (strip,
    lower-case, RAVDESS aliases). A prediction that is None/not a str or not in the label set is
    wrong and lands in the confusion matrix's last column. Raises ValueError on length mismatch,
    an empty or duplicated label set, or a ground-truth label outside the label set.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"got {len(predictions)} predictions but {len(labels)} labels")
    classes = tuple(canonical_label(x) for x in label_set)
    if not classes:
        raise ValueError("label_set is empty")
    if len(set(classes)) != len(classes):
        raise ValueError(f"label_set has duplicates after normalisation: {classes}")
    index = {c: i for i, c in enumerate(classes)}
    n_cls = len(classes)

    confusion = np.zeros((n_cls, n_cls + 1), dtype=np.int64)
    parse_failures = 0
    for k, (pred, label) in enumerate(zip(predictions, labels, strict=True)):
        if not isinstance(label, str) or canonical_label(label) not in index:
            raise ValueError(f"label #{k} {label!r} is not in the label set {list(classes)}")
        row = index[canonical_label(label)]
        if isinstance(pred, str):
            col = index.get(canonical_label(pred), n_cls)
        else:
            parse_failures += 1
            col = n_cls
        confusion[row, col] += 1

    n = len(labels)
    correct = int(np.trace(confusion[:, :n_cls]))
    support_arr = confusion.sum(axis=1)
    support = {c: int(s) for c, s in zip(classes, support_arr, strict=True)}
    per_class = {
        c: float(confusion[i, i] / support_arr[i]) for i, c in enumerate(classes) if support_arr[i] > 0
    }
    return EmotionMetrics(
        war=correct / n if n else 0.0,
        uar=float(np.mean(list(per_class.values()))) if per_class else 0.0,
        per_class_recall=per_class,
        confusion=confusion,
        n=n,
        parse_failures=parse_failures,
        label_set=classes,
        out_of_set=int(confusion[:, n_cls].sum()),
        support=support,
    )
