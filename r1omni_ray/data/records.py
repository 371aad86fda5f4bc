"""R1-Omni JSON dataset records.

A dataset file is a JSON list (or JSONL: one object per line) of records such as::

    {"video": "DFEW/videos/1.mp4",
     "audio": "DFEW/audios/1.wav",            # optional; absent -> the video's own audio track
     "id": "dfew-1",                          # optional
     "conversations": [
        {"from": "human", "value": "<video>\\n<audio>\\nAs an emotional recognition expert; ...?"},
        {"from": "gpt", "value": "sad"}]}

The gpt value is a bare label (``"sad"``), ``"<answer>sad</answer>"`` or a cold-start reasoning
response ``"<think>...</think>\\n<answer>sad</answer>"``.  Relative media paths are resolved
against ``root`` (default: the folder of the JSON file).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1omni_ray.data.errors import DataError
from r1omni_ray.labels import (
    AU_END,
    AU_START,
    AUDIO_TOKEN,
    THINK_ANSWER_SUFFIX,
    VI_END,
    VI_START,
    VIDEO_TOKEN,
    canonical_label,
)

HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_PLACEHOLDER_RE = re.compile(
    "|".join(re.escape(t) for t in (VI_START, VI_END, AU_START, AU_END, VIDEO_TOKEN, AUDIO_TOKEN))
)


@dataclass(frozen=True)
class OmniRecord:
    """One parsed training / evaluation example.

    ``video``/``audio`` are absolute paths.  When the JSON record has no "audio" key the audio
    is the video's own track, so ``audio`` equals ``video``.  ``question`` is the human turn with
    the ``<video>``/``<audio>`` placeholder lines (and a trailing THINK_ANSWER_SUFFIX, if the
    dataset already had one) removed.  ``solution`` is ``"<answer>label</answer>"`` (what the
    accuracy reward compares against); ``response`` is the full gpt value when it contains a
    ``<think>`` reasoning part (cold-start SFT target), else None.
    """

    id: str
    video: str | None
    audio: str | None
    question: str
    label: str
    solution: str
    response: str | None = None
    has_video_placeholder: bool = True
    has_audio_placeholder: bool = True


@dataclass
class LoadResult:
    records: list[OmniRecord]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (record index, reason)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)


# ----------------------------------------------------------------------------------------------
# parsing helpers
# ----------------------------------------------------------------------------------------------


def _read_raw(path: Path) -> list[tuple[int, int | None, Any | DataError]]:
    """Return ``[(record_index, line_number_or_None, obj_or_DataError)]`` for a JSON / JSONL file.

    A malformed JSON list is a file-level error (raised).  In JSONL a malformed line becomes a
    per-record DataError (so skip mode can skip it).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("dataset file not found", file=path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read dataset file: {e}", file=path) from None

    stripped = text.lstrip()
    if not stripped:
        raise DataError("dataset is empty (no records)", file=path)

    is_jsonl = path.suffix.lower() == ".jsonl" or not stripped.startswith("[")
    if not is_jsonl:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", file=path, line=e.lineno) from None
        if not isinstance(data, list):
            raise DataError(f"top-level JSON must be a list of records, got {type(data).__name__}", file=path)
        return [(i, None, obj) for i, obj in enumerate(data)]

    out: list[tuple[int, int | None, Any | DataError]] = []
    index = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError as e:
            obj = DataError(f"malformed JSON line: {e.msg} (column {e.colno})", file=path, index=index, line=lineno)
        out.append((index, lineno, obj))
        index += 1
    return out


def _strip_placeholders(value: str) -> str:
    """Remove the <video>/<audio> (and <vi_start>.. markers) placeholders and their lines."""
    lines = []
    for line in value.split("\n"):
        cleaned = _PLACEHOLDER_RE.sub("", line)
        if cleaned.strip() == "" and cleaned != line:
            continue  # a placeholder-only line
        lines.append(cleaned)
    question = "\n".join(lines).strip()
    if question.endswith(THINK_ANSWER_SUFFIX):
        question = question[: -len(THINK_ANSWER_SUFFIX)].rstrip()
    return question


def _resolve(root: Path, p: str) -> str:
    return os.path.abspath(p if os.path.isabs(p) else os.path.join(root, p))


def _parse_record(
    obj: Any,
    *,
    index: int,
    file: Path,
    line: int | None,
    root: Path,
    allowed: dict[str, str] | None,
    check_files: bool,
) -> OmniRecord:
    def err(reason: str, fld: str | None = None) -> DataError:
        return DataError(reason, file=file, index=index, field=fld, line=line)

    if not isinstance(obj, Mapping):
        raise err(f"record must be a JSON object, got {type(obj).__name__}")

    # --- conversations -------------------------------------------------------------------
    if "conversations" not in obj:
        raise err("missing required key", "conversations")
    conv = obj["conversations"]
    if not isinstance(conv, list):
        raise err(f"must be a list of turns, got {type(conv).__name__}", "conversations")
    human_value: str | None = None
    gpt_value: str | None = None
    for t, turn in enumerate(conv):
        fld = f"conversations[{t}]"
        if not isinstance(turn, Mapping):
            raise err(f"turn must be an object, got {type(turn).__name__}", fld)
        role, value = turn.get("from"), turn.get("value")
        if not isinstance(role, str):
            raise err(f"missing or non-string 'from' ({role!r})", f"{fld}.from")
        if not isinstance(value, str):
            raise err(f"missing or non-string 'value' ({type(value).__name__})", f"{fld}.value")
        if role in HUMAN_ROLES and human_value is None:
            human_value = value
        elif role in GPT_ROLES and human_value is not None and gpt_value is None:
            gpt_value = value
    if human_value is None:
        raise err("no human turn", "conversations")
    if gpt_value is None:
        raise err("no gpt turn after the human turn", "conversations")

    # --- label / solution / response -----------------------------------------------------
    gpt = gpt_value.strip()
    m = _ANSWER_RE.search(gpt)
    if m is not None:
        label = m.group(1).strip()
    elif "<think>" in gpt or "<answer>" in gpt:
        raise err("gpt value has <think>/<answer> tags but no complete <answer>...</answer>", "conversations")
    else:
        label = gpt
    if not label or "<" in label or "\n" in label:
        raise err(f"cannot extract an emotion label from gpt value {gpt_value[:80]!r}", "conversations")
    if allowed is not None:
        key = canonical_label(label)
        if key not in allowed:
            raise err(f"unknown label {label!r} (allowed: {', '.join(sorted(set(allowed.values())))})",
                      "conversations")
        label = allowed[key]
    else:
        label = label.lower()
    response = gpt if "<think>" in gpt else None

    # --- media -----------------------------------------------------------------------------
    if "video" not in obj:
        raise err("missing required key", "video")
    video = obj["video"]
    if not isinstance(video, str) or not video.strip():
        raise err(f"must be a non-empty string path, got {video!r}", "video")
    video_path = _resolve(root, video.strip())
    audio_raw = obj.get("audio")
    if audio_raw is None:
        audio_path = video_path  # the video's own audio track
    elif isinstance(audio_raw, str) and audio_raw.strip():
        audio_path = _resolve(root, audio_raw.strip())
    else:
        raise err(f"must be a non-empty string path, got {audio_raw!r}", "audio")
    if check_files:
        if not os.path.isfile(video_path):
            raise err(f"media file not found: {video_path}", "video")
        if audio_path != video_path and not os.path.isfile(audio_path):
            raise err(f"media file not found: {audio_path}", "audio")

    rid = obj.get("id")
    if rid is None:
        rid = f"{file.stem}-{index}"
    elif not isinstance(rid, (str, int)):
        raise err(f"must be a string or int, got {type(rid).__name__}", "id")

    return OmniRecord(
        id=str(rid),
        video=video_path,
        audio=audio_path,
        question=_strip_placeholders(human_value),
        label=label,
        solution=f"<answer>{label}</answer>",
        response=response,
        has_video_placeholder=VIDEO_TOKEN in human_value,
        has_audio_placeholder=AUDIO_TOKEN in human_value,
    )


def load_records(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    label_set: Sequence[str] | None = None,
    on_error: str = "raise",
    check_files: bool = True,
) -> LoadResult:
    """Parse an R1-Omni JSON / JSONL dataset file.

    ``on_error="raise"`` raises the first bad record as a :class:`DataError` naming the file, the
    record index and the field; ``"skip"`` skips bad records and reports ``(index, reason)`` in
    ``LoadResult.skipped``.  A dataset with no (valid) records raises DataError in both modes.
    With ``label_set`` the labels are validated (via ``canonical_label``) and normalised to the
    label set's spelling.  Media existence is checked when ``check_files``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    root_dir = Path(root) if root is not None else path.resolve().parent
    allowed = None
    if label_set is not None:
        allowed = {canonical_label(lab): lab for lab in label_set}

    raw = _read_raw(path)
    records: list[OmniRecord] = []
    skipped: list[tuple[int, str]] = []
    for index, line, obj in raw:
        try:
            if isinstance(obj, DataError):
                raise obj
            records.append(
                _parse_record(obj, index=index, file=path, line=line, root=root_dir,
                              allowed=allowed, check_files=check_files)
            )
        except DataError as e:
            if on_error == "raise":
                raise
            skipped.append((index, str(e)))
    if not records:
        detail = f"; all {len(skipped)} records were invalid, first: {skipped[0][1]}" if skipped else ""
        raise DataError(f"dataset is empty (no valid records){detail}", file=path)
    return LoadResult(records=records, skipped=skipped)


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def record_to_dict(record: OmniRecord, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Convert an OmniRecord back to R1-Omni JSON (paths relative to ``root`` when given)."""

    def rel(p: str) -> str:
        return os.path.relpath(p, root) if root is not None else p

    placeholders = (["<video>"] if record.has_video_placeholder else []) + (
        ["<audio>"] if record.has_audio_placeholder else []
    )
    human = "\n".join(placeholders + [record.question])
    d: dict[str, Any] = {"id": record.id}
    if record.video is not None:
        d["video"] = rel(record.video)
    if record.audio is not None and record.audio != record.video:
        d["audio"] = rel(record.audio)
    d["conversations"] = [
        {"from": "human", "value": human},
        {"from": "gpt", "value": record.response if record.response is not None else record.label},
    ]
    return d


def save_records(records_as_dicts: Iterable[Mapping[str, Any] | OmniRecord], path: str | os.PathLike) -> Path:
    """Write records in R1-Omni format: a JSON list, or JSONL when ``path`` ends in ``.jsonl``.

    OmniRecord items are converted with :func:`record_to_dict` (paths relative to the file's folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.resolve().parent
    items = [record_to_dict(r, root) if isinstance(r, OmniRecord) else dict(r) for r in records_as_dicts]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        if path.suffix.lower() == ".jsonl":
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        else:
            json.dump(items, f, ensure_ascii=False, indent=1)
            f.write("\n")
    os.replace(tmp, path)
    return path
