"""Modality attribution maths on hand-made predictions."""

import pytest

from r1omni_ray.attribution import (
    OTHER,
    distribution,
    modality_attribution,
    prediction_shares,
    to_csv,
    to_markdown,
    total_variation,
    verdict,
)

LABELS = ["happy", "sad", "angry"]


def by_label(rows):
    return {r.label: r for r in rows}


def test_video_only_emotion_and_audio_only_emotion():
    gold = ["happy"] * 4 + ["sad"] * 4
    full = ["happy"] * 4 + ["sad"] * 4
    # Without video every "happy" becomes "sad"; "sad" survives. Without audio "sad" falls apart.
    no_video = ["sad"] * 4 + ["sad"] * 4
    no_audio = ["happy"] * 4 + ["angry", "happy", "sad", None]
    rows = by_label(modality_attribution(gold, full, no_video, no_audio, LABELS))
    h, s, all_ = rows["happy"], rows["sad"], rows["ALL"]
    assert (h.n, h.acc_full, h.acc_no_video, h.acc_no_audio) == (4, 1.0, 0.0, 1.0)
    assert (h.changed_no_video, h.changed_no_audio) == (1.0, 0.0)
    assert h.tv_no_video == pytest.approx(1.0) and h.tv_no_audio == 0.0
    assert h.leans_on == "video"
    assert (s.acc_no_video, s.acc_no_audio, s.changed_no_audio) == (1.0, 0.25, 0.75)
    # full: all sad; no audio: angry / happy / sad / other -> TV = 0.75
    assert s.tv_no_audio == pytest.approx(0.75)
    assert s.leans_on == "audio"
    assert all_.n == 8 and all_.acc_full == 1.0 and all_.acc_no_video == 0.5
    assert all_.leans_on == "both"
    assert "angry" not in rows  # no ground-truth support -> no row


def test_unchanged_predictions_lean_on_neither_even_when_wrong():
    gold = ["happy", "sad", "angry"]
    wrong = ["sad", "angry", "happy"]
    rows = modality_attribution(gold, wrong, wrong, wrong, LABELS)
    for r in rows:
        assert r.acc_full == 0.0 and r.changed_no_video == 0.0 and r.tv_no_audio == 0.0
        assert r.leans_on == "neither"


def test_flips_count_even_if_the_distribution_does_not_move():
    # Predictions swap between two examples: TV is 0 but every prediction changed.
    gold = ["happy", "happy"]
    full, no_video = ["happy", "sad"], ["sad", "happy"]
    r = by_label(modality_attribution(gold, full, no_video, full, LABELS))["happy"]
    assert r.tv_no_video == 0.0 and r.changed_no_video == 1.0 and r.leans_on == "video"


def test_normalisation_aliases_and_out_of_set():
    gold = ["Fear", "surprise"]
    preds = [" fearful ", "excited"]  # RAVDESS alias -> fear; "excited" is outside the set
    rows = by_label(modality_attribution(gold, preds, preds, [None, "Surprised"], ["fear", "surprise"]))
    assert rows["fear"].acc_full == 1.0 and rows["surprise"].acc_full == 0.0
    assert rows["surprise"].acc_no_audio == 1.0 and rows["fear"].changed_no_audio == 1.0


@pytest.mark.parametrize(
    "v,a,expected",
    [(0.0, 0.0, "neither"), (0.5, 0.1, "video"), (0.1, 0.5, "audio"), (0.5, 0.4, "both"), (0.8, 0.3, "video"),
     (0.2, 0.2, "both"), (0.19, 0.0, "neither")],
)
def test_verdict(v, a, expected):
    assert verdict(v, a) == expected


def test_distribution_and_tv():
    d = distribution(["happy", "happy", OTHER, "sad"], LABELS)
    assert d == {"happy": 0.5, "sad": 0.25, "angry": 0.0, OTHER: 0.25}
    assert total_variation(d, d) == 0.0
    assert total_variation({"a": 1.0}, {"b": 1.0}) == 1.0


def test_prediction_shares_sum_to_one():
    shares = prediction_shares(["happy", "sad"], ["sad", "sad"], [None, "angry"], LABELS)
    for cond in ("full", "no_video", "no_audio"):
        assert sum(s[f"share_{cond}"] for s in shares) == pytest.approx(1.0)
    assert {s["prediction"]: s["share_no_video"] for s in shares}["sad"] == 1.0


def test_errors_and_tables():
    with pytest.raises(ValueError, match="length mismatch"):
        modality_attribution(["happy"], ["happy"], [], ["happy"], LABELS)
    with pytest.raises(ValueError, match="not in the label set"):
        modality_attribution(["bored"], ["happy"], ["happy"], ["happy"], LABELS)
    rows = modality_attribution(["happy"], ["happy"], ["sad"], ["happy"], LABELS)
    csv_text, md = to_csv(rows), to_markdown(rows)
    assert csv_text.splitlines()[0].startswith("label,n,acc_full") and len(csv_text.splitlines()) == 3
    assert md.count("\n") == 4 and "| happy | 1 |" in md
