"""Synthetic omni emotion dataset: label mapping, cue recoverability, determinism, speed."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from r1omni_ray.data.audio import load_audio
from r1omni_ray.data.records import load_records
from r1omni_ray.labels import DFEW_LABELS, EMOTION_QUESTION, MAFW_LABELS, RAVDESS_LABELS
from r1omni_ray.tiny.synthetic import (
    COLOURS,
    DEFAULT_LABELS,
    PITCHES,
    SYNTHETIC_CUES,
    SYNTHETIC_VOCAB_TEXTS,
    cue_table,
    make_corrupt_media,
    make_synthetic_dataset,
)
from tests.synthetic_oracles import (
    classify_colour,
    classify_pitch,
    dominant_frequency,
    expected_cues,
    label_for_cues,
)

FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def _labels_by(table, modality: int) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for lab, cells in table.items():
        for cell in cells:
            out.setdefault(cell[modality], set()).add(lab)
    return out


def _needs_both(table, label) -> bool:
    by_colour, by_pitch = _labels_by(table, 0), _labels_by(table, 1)
    return all(len(by_colour[c]) > 1 and len(by_pitch[p]) > 1 for c, p in table[label])


@pytest.mark.parametrize("labels", [DEFAULT_LABELS, DFEW_LABELS, MAFW_LABELS, RAVDESS_LABELS, ("a", "b"), ("a", "b", "c")])
def test_cue_table_needs_both_modalities(labels):
    table = cue_table(labels)
    assert set(table) == set(labels)
    cells = [c for cs in table.values() for c in cs]
    assert len(cells) == len(set(cells))  # a function cells -> label
    # neither modality alone determines every label ...
    assert any(len(s) > 1 for s in _labels_by(table, 0).values())
    assert any(len(s) > 1 for s in _labels_by(table, 1).values())
    # ... and some labels need both
    assert any(_needs_both(table, lab) for lab in labels)
    for lab in labels:
        for colour, pitch in expected_cues(lab, labels):
            assert colour in COLOURS and pitch in PITCHES
            assert label_for_cues(colour, pitch, labels) == lab


def test_default_table_every_label_needs_both():
    assert SYNTHETIC_CUES == cue_table(DEFAULT_LABELS)
    assert all(_needs_both(SYNTHETIC_CUES, lab) for lab in DEFAULT_LABELS)
    assert expected_cues("happy") == (("red", "low"),)
    with pytest.raises(ValueError):
        cue_table(["only"])
    with pytest.raises(ValueError):
        cue_table([f"l{i}" for i in range(13)])
    with pytest.raises(KeyError):
        expected_cues("bored")


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("syn")
    t0 = time.perf_counter()
    path = make_synthetic_dataset(out, 64, seed=3, with_reasoning=True)
    return path, time.perf_counter() - t0


def test_dataset_fast_balanced_and_loadable(ds):
    path, seconds = ds
    assert seconds < 20.0, f"64 samples took {seconds:.1f}s"
    raw = json.loads(path.read_text())
    assert len(raw) == 64 and all(r["conversations"][0]["value"] == "<video>\n<audio>\n" + EMOTION_QUESTION for r in raw)
    res = load_records(path, label_set=DEFAULT_LABELS)
    assert len(res) == 64 and not res.skipped
    assert Counter(r.label for r in res) == dict.fromkeys(DEFAULT_LABELS, 16)
    n_sep = sum(r.audio != r.video for r in res)
    assert 16 < n_sep < 48  # separate_audio=0.5
    for r in res:
        assert r.response is not None and FORMAT_RE.fullmatch(r.response)
        assert r.response.endswith(f"<answer>{r.label}</answer>")


def test_cues_recoverable_from_media(ds):
    import decord

    path, _ = ds
    root = path.parent
    raw = json.loads(path.read_text())
    for r in raw[:12]:
        label = r["conversations"][1]["value"].rsplit("<answer>", 1)[1].split("</answer>")[0]
        vr = decord.VideoReader(str(root / r["video"]))
        frames = vr.get_batch(list(range(len(vr)))).asnumpy()
        assert len(vr) == 8 and frames.shape[1:] == (32, 32, 3)
        assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 2  # motion / noise
        colour = classify_colour(frames.reshape(-1, 3).mean(0))
        pitch = classify_pitch(dominant_frequency(load_audio(root / r["video"])))
        assert (colour, pitch) in expected_cues(label)
        assert (colour, pitch) == (r["cues"]["colour"], r["cues"]["pitch"])
        assert colour in r["conversations"][1]["value"] and pitch in r["conversations"][1]["value"]
        if "audio" in r:
            assert classify_pitch(dominant_frequency(load_audio(root / r["audio"]))) == pitch


def test_deterministic_and_options(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", 6, labels=DFEW_LABELS, seed=5, separate_audio=True, prefix="val")
    b = make_synthetic_dataset(tmp_path / "b", 6, labels=DFEW_LABELS, seed=5, separate_audio=True, prefix="val")
    c = make_synthetic_dataset(tmp_path / "c", 6, labels=DFEW_LABELS, seed=6, separate_audio=False)
    assert a.name == "val.json" and a.read_text() == b.read_text() != c.read_text()
    ra, rc = json.loads(a.read_text()), json.loads(c.read_text())
    assert all("audio" in r for r in ra) and not any("audio" in r for r in rc)
    assert all(r["conversations"][1]["value"] in DFEW_LABELS for r in ra)  # bare labels
    for r in ra:
        np.testing.assert_array_equal(
            load_audio(tmp_path / "a" / r["audio"]), load_audio(tmp_path / "b" / r["audio"])
        )


def test_vocab_texts_cover_cue_words():
    words = set(" ".join(SYNTHETIC_VOCAB_TEXTS).split())
    assert set(COLOURS) <= words and set(PITCHES) <= words and set(DEFAULT_LABELS) <= words


def test_make_corrupt_media(tmp_path):
    paths = make_corrupt_media(tmp_path)
    for key in ("truncated_mp4", "no_audio_mp4", "zero_length_wav", "garbage_mp4"):
        assert paths[key].is_file()
    assert paths["empty_file_wav"].stat().st_size == 0
