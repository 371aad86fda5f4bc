"""Modality attribution by ablation: how predictions move when the video or the audio is removed.

Every evaluation example is scored three times (full input, no video, no audio). Per ground-truth
emotion we report accuracy under each condition, the share of predictions that changed, and the
total-variation distance between the predicted-label distributions; the verdict says which modality
the model leans on for that emotion. Pure functions on label strings (no model, no I/O).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from r1omni_ray.labels import canonical_label

OTHER = "<other>"  # a prediction outside the label set (parse failures included)
CONDITIONS = ("full", "no_video", "no_audio")


@dataclass
class AttributionRow:
    label: str  # ground-truth emotion ("ALL" for the whole set)
    n: int
    acc_full: float
    acc_no_video: float
    acc_no_audio: float
    changed_no_video: float  # share of examples whose prediction differs from the full-input one
    changed_no_audio: float
    tv_no_video: float  # total-variation distance of predicted-label distributions vs full input
    tv_no_audio: float
    leans_on: str  # video | audio | both | neither


def normalise(pred: str | None, classes: Sequence[str]) -> str:
    """Canonical label, or OTHER for None / anything outside the label set."""
    if not isinstance(pred, str):
        return OTHER
    c = canonical_label(pred)
    return c if c in classes else OTHER


def distribution(preds: Sequence[str], classes: Sequence[str]) -> dict[str, float]:
    """Share of each class (plus OTHER) among already-normalised predictions."""
    keys = list(classes) + [OTHER]
    n = len(preds)
    return {k: (sum(p == k for p in preds) / n if n else 0.0) for k in keys}


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def verdict(effect_video: float, effect_audio: float, min_effect: float = 0.2, dominance: float = 2.0) -> str:
    """Which modality matters: removing it changes at least `min_effect` of the predictions; when both
    matter, one wins if its effect is `dominance` times the other's."""
    v, a = effect_video >= min_effect, effect_audio >= min_effect
    if v and a:
        if effect_video >= dominance * effect_audio:
            return "video"
        if effect_audio >= dominance * effect_video:
            return "audio"
        return "both"
    return "video" if v else "audio" if a else "neither"


def _row(label: str, gold: list[str], full: list[str], nv: list[str], na: list[str], classes: Sequence[str],
         min_effect: float, dominance: float) -> AttributionRow:
    n = len(gold)

    def acc(p: list[str]) -> float:
        return sum(x == g for x, g in zip(p, gold, strict=True)) / n if n else 0.0

    def changed(p: list[str]) -> float:
        return sum(x != f for x, f in zip(p, full, strict=True)) / n if n else 0.0

    d_full = distribution(full, classes)
    ch_v, ch_a = changed(nv), changed(na)
    return AttributionRow(
        label=label, n=n, acc_full=acc(full), acc_no_video=acc(nv), acc_no_audio=acc(na),
        changed_no_video=ch_v, changed_no_audio=ch_a,
        tv_no_video=total_variation(d_full, distribution(nv, classes)),
        tv_no_audio=total_variation(d_full, distribution(na, classes)),
        leans_on=verdict(ch_v, ch_a, min_effect, dominance),
    )


def modality_attribution(
    labels: Sequence[str],
    pred_full: Sequence[str | None],
    pred_no_video: Sequence[str | None],
    pred_no_audio: Sequence[str | None],
    label_set: Sequence[str],
    min_effect: float = 0.2,
    dominance: float = 2.0,
) -> list[AttributionRow]:
    """One row per emotion of the label set that occurs in `labels` (label-set order), then "ALL".

    The verdict uses the share of changed predictions (a flip shows the model used that modality even
    when it was wrong either way); accuracy and TV distance are reported alongside.
    """
    n = len(labels)
    if not (len(pred_full) == len(pred_no_video) == len(pred_no_audio) == n):
        raise ValueError(
            f"length mismatch: {n} labels, {len(pred_full)}/{len(pred_no_video)}/{len(pred_no_audio)} predictions"
        )
    classes = [canonical_label(c) for c in label_set]
    gold = [canonical_label(x) for x in labels]
    unknown = sorted(set(gold) - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown} are not in the label set {classes}")
    full = [normalise(p, classes) for p in pred_full]
    nv = [normalise(p, classes) for p in pred_no_video]
    na = [normalise(p, classes) for p in pred_no_audio]
    rows = []
    for c in classes:
        idx = [i for i, g in enumerate(gold) if g == c]
        if not idx:
            continue
        rows.append(_row(c, [gold[i] for i in idx], [full[i] for i in idx], [nv[i] for i in idx],
                         [na[i] for i in idx], classes, min_effect, dominance))
    rows.append(_row("ALL", gold, full, nv, na, classes, min_effect, dominance))
    return rows


def prediction_shares(
    pred_full: Sequence[str | None], pred_no_video: Sequence[str | None], pred_no_audio: Sequence[str | None],
    label_set: Sequence[str],
) -> list[dict[str, float | str]]:
    """Per predicted emotion (plus OTHER): its share of all predictions under each condition."""
    classes = [canonical_label(c) for c in label_set]
    dists = [distribution([normalise(p, classes) for p in preds], classes)
             for preds in (pred_full, pred_no_video, pred_no_audio)]
    return [{"prediction": k, **{f"share_{cond}": d[k] for cond, d in zip(CONDITIONS, dists, strict=True)}}
            for k in dists[0]]


COLUMNS = [f.name for f in AttributionRow.__dataclass_fields__.values()]


def to_csv(rows: Sequence[AttributionRow]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in asdict(r).items()})
    return buf.getvalue()


def to_markdown(rows: Sequence[AttributionRow]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in asdict(r).values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
