"""R1-Omni JSON / JSONL record parsing (r1omni_ray.data.records)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from r1omni_ray.data.errors import DataError, MediaError
from r1omni_ray.data.records import LoadResult, OmniRecord, load_records, record_to_dict, save_records
from r1omni_ray.labels import DFEW_LABELS, EMOTION_QUESTION, RAVDESS_LABELS, THINK_ANSWER_SUFFIX

HUMAN = "<video>\n<audio>\n" + EMOTION_QUESTION


def rec(video="v/1.mp4", gpt="sad", human=HUMAN, **extra):
    d = {"video": video, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}
    d.update(extra)
    return d


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    for name in ("v/1.mp4", "v/2.mp4", "v/3.mp4", "a/1.wav"):
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return tmp_path


def write_json(path: Path, items) -> Path:
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def test_parse_json_list_fields(root: Path):
    think = "<think>The face is tense and the voice trembles.</think>\n<answer>fear</answer>"
    path = write_json(
        root / "train.json",
        [
            rec("v/1.mp4", "sad", id="a"),
            rec("v/2.mp4", "<answer> Happy </answer>", audio="a/1.wav", id=7),
            rec("v/3.mp4", think),
        ],
    )
    res = load_records(path)
    assert isinstance(res, LoadResult) and len(res) == 3 and res.skipped == []
    r0, r1, r2 = res.records
    assert r0 == OmniRecord(
        id="a",
        video=str(root / "v/1.mp4"),
        audio=str(root / "v/1.mp4"),  # no "audio" key -> the video's own track
        question=EMOTION_QUESTION,
        label="sad",
        solution="<answer>sad</answer>",
        response=None,
        has_video_placeholder=True,
        has_audio_placeholder=True,
    )
    assert r1.id == "7" and r1.label == "happy" and r1.solution == "<answer>happy</answer>"
    assert r1.audio == str(root / "a/1.wav")
    assert r2.id == "train-2" and r2.label == "fear" and r2.response == think
    assert all(Path(r.video).is_absolute() for r in res)


def test_parse_jsonl_and_root_override(root: Path, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    path = other / "data.jsonl"
    path.write_text(json.dumps(rec("v/1.mp4")) + "\n\n" + json.dumps(rec("v/2.mp4", "angry")) + "\n")
    res = load_records(path, root=root)
    assert [r.label for r in res] == ["sad", "angry"]
    assert res.records[1].video == str(root / "v/2.mp4")
    # default root is the JSON file's folder -> media missing there
    with pytest.raises(DataError, match="not found"):
        load_records(path)
    assert len(load_records(path, check_files=False)) == 2


def test_question_placeholders_and_suffix_removed(root: Path):
    human = "<video>\n<audio>\n" + EMOTION_QUESTION + "\n" + THINK_ANSWER_SUFFIX
    audio_only = "<audio>\nWhat emotion?"
    res = load_records(write_json(root / "q.json", [rec(human=human), rec(human=audio_only)]))
    assert res.records[0].question == EMOTION_QUESTION
    assert res.records[1].question == "What emotion?"
    assert not res.records[1].has_video_placeholder and res.records[1].has_audio_placeholder


@pytest.mark.parametrize(
    ("bad", "field", "reason"),
    [
        ({"video": "v/1.mp4"}, "conversations", "missing"),
        ({"conversations": rec()["conversations"]}, "video", "missing"),
        (rec(video=3), "video", "string"),
        ({"video": "v/1.mp4", "conversations": "sad"}, "conversations", "list"),
        (rec(audio=["x"]), "audio", "string"),
        ({"video": "v/1.mp4", "conversations": [{"from": "human", "value": 5}]}, "conversations[0].value", "non-string"),
        ({"video": "v/1.mp4", "conversations": [{"from": "human", "value": "hi"}]}, "conversations", "no gpt"),
        (rec(gpt="<think>hmm</think>"), "conversations", "<answer>"),
        (rec(gpt="bored"), "conversations", "unknown label 'bored'"),
        (rec(video="v/missing.mp4"), "video", "not found"),
        (rec(audio="a/missing.wav"), "audio", "not found"),
        (["not", "a", "dict"], None, "JSON object"),
    ],
)
def test_bad_record_error_names_file_index_field(root: Path, bad, field, reason):
    path = write_json(root / "bad.json", [rec(), rec("v/2.mp4"), bad, rec("v/3.mp4")])
    with pytest.raises(DataError) as ei:
        load_records(path, label_set=DFEW_LABELS)
    msg = str(ei.value)
    assert "bad.json" in msg and "record 2" in msg and reason in msg, msg
    assert ei.value.index == 2 and ei.value.field == field
    if field is not None:
        assert repr(field) in msg
    assert not isinstance(ei.value, MediaError)


def test_malformed_json_reports_line(root: Path):
    path = root / "broken.json"
    path.write_text('[\n {"video": "v/1.mp4",\n  "conversations": [}\n]')
    with pytest.raises(DataError, match=r"broken\.json: line 3: malformed JSON"):
        load_records(path)
    obj = root / "obj.json"
    obj.write_text('{"video": "v/1.mp4"}')  # an object that is not a list and not JSONL-complete
    with pytest.raises(DataError, match="obj.json"):
        load_records(obj)


def test_malformed_jsonl_line_raise_and_skip(root: Path):
    path = root / "x.jsonl"
    path.write_text(json.dumps(rec()) + "\n" + '{"video": "v/2.mp4", "conv\n' + json.dumps(rec("v/3.mp4")) + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl: line 2: record 1: malformed JSON line"):
        load_records(path)
    res = load_records(path, on_error="skip")
    assert [Path(r.video).name for r in res] == ["1.mp4", "3.mp4"]
    assert len(res.skipped) == 1 and res.skipped[0][0] == 1 and "malformed" in res.skipped[0][1]


def test_skip_mode_counts_reasons(root: Path):
    items = [rec(), {"video": "v/2.mp4"}, rec(gpt="bored"), rec("v/gone.mp4"), rec("v/3.mp4", "Fearful")]
    res = load_records(write_json(root / "mix.json", items), label_set=RAVDESS_LABELS, on_error="skip")
    assert [r.label for r in res] == ["sad", "fearful"]
    assert [i for i, _ in res.skipped] == [1, 2, 3]
    reasons = [r for _, r in res.skipped]
    assert "'conversations'" in reasons[0] and "unknown label" in reasons[1] and "not found" in reasons[2]


def test_label_set_canonical_matching(root: Path):
    # RAVDESS "fearful"/"surprised" match DFEW's "fear"/"surprise" via canonical_label
    path = write_json(root / "rav.json", [rec(gpt="fearful"), rec(gpt="<answer>SURPRISED</answer>")])
    assert [r.label for r in load_records(path, label_set=DFEW_LABELS)] == ["fear", "surprise"]
    assert [r.label for r in load_records(path, label_set=RAVDESS_LABELS)] == ["fearful", "surprised"]
    assert [r.label for r in load_records(path)] == ["fearful", "surprised"]


def test_empty_dataset_is_an_error(root: Path):
    with pytest.raises(DataError, match="empty"):
        load_records(write_json(root / "e.json", []))
    (root / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_records(root / "blank.jsonl")
    with pytest.raises(DataError, match="all 1 records were invalid"):
        load_records(write_json(root / "allbad.json", [{"video": "v/1.mp4"}]), on_error="skip")
    with pytest.raises(DataError, match="not found"):
        load_records(root / "nope.json")
    with pytest.raises(ValueError, match="on_error"):
        load_records(root / "e.json", on_error="ignore")


def test_save_records_round_trip(root: Path):
    items = [rec(id="a"), rec("v/2.mp4", "<think>t</think>\n<answer>happy</answer>", audio="a/1.wav", id="b")]
    first = load_records(save_records(items, root / "out.json"))
    # OmniRecords are written back with paths relative to the new file's folder
    second = load_records(save_records(first.records, root / "sub" / "out.jsonl"))
    assert first.records == second.records
    assert [r.id for r in second] == ["a", "b"]
    assert second.records[1].audio == str(root / "a/1.wav")
    assert second.records[1].response == "<think>t</think>\n<answer>happy</answer>"
    d = record_to_dict(first.records[0], root)
    assert d["video"] == "v/1.mp4" and "audio" not in d
    assert d["conversations"][0]["value"] == HUMAN


def test_errors_pickle_and_hierarchy():
    e = DataError("bad thing", file="f.json", index=3, field="video")
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e) == "f.json: record 3: field 'video': bad thing"
    m = pickle.loads(pickle.dumps(MediaError("cannot open video", file="x.mp4")))
    assert isinstance(m, MediaError) and isinstance(m, DataError) and isinstance(m, ValueError)
    assert str(m) == "x.mp4: cannot open video"
