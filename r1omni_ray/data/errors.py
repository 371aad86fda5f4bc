"""Exceptions raised by the data layer.

``DataError`` is a bad record or dataset file; its message names the file, the record index and
the field.  ``MediaError`` is an unreadable / corrupt media file; its message names the file and
what failed.  Both are ``ValueError`` subclasses so callers can catch them generically.
"""

from __future__ import annotations

import os
import re


class DataError(ValueError):
    """A bad dataset file or record.

    Attributes ``file``, ``index`` (0-based record index, or None for file-level problems),
    ``field`` (the offending key, or None) and ``reason`` (the bare explanation) are kept so that
    callers (e.g. ``load_records(on_error="skip")``) can report them without parsing the message.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | os.PathLike | None = None,
        index: int | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.reason = reason
        self.file = None if file is None else str(file)
        self.index = index
        self.field = field
        self.line = line
        super().__init__(self._format())

    def _format(self) -> str:
        parts: list[str] = []
        if self.file is not None:
            parts.append(self.file)
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.index is not None:
            parts.append(f"record {self.index}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        prefix = ": ".join(parts)
        return f"{prefix}: {self.reason}" if prefix else self.reason

    def __reduce__(self):  # keep picklable (Ray ships exceptions between processes)
        return (
            _rebuild_error,
            (type(self), self.reason, self.file, self.index, self.field, self.line),
        )


class MediaError(DataError):
    """An unreadable, corrupt, truncated or empty media file (video or audio)."""

    def __init__(self, reason: str, *, file: str | os.PathLike | None = None, **kwargs) -> None:
        super().__init__(reason, file=file, **kwargs)


def _rebuild_error(cls, reason, file, index, field, line):
    return cls(reason, file=file, index=index, field=field, line=line)


# decord's C++ log prefix ("[22:19:12] /github/workspace/src/audio/audio_reader.cc:136: ") and the native
# stack trace it appends say nothing to a user; the sentence between them is the cause.
_NATIVE_PREFIX = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+:\d+: ")
_OPENING = re.compile(r"ERROR opening: .*?, ")  # decord repeats the path the MediaError already names
_BARE = {"NoBackendError": "no audio backend recognises the file", "EOFError": "the file ends before any audio"}


def media_cause(e: BaseException, path: str | None = None, limit: int = 200) -> str:
    """A decoder exception's cause in one line: without decord's timestamp, C++ source path and stack trace,
    PyAV's errno, or the path (the MediaError names the file); the exception's type where it says nothing."""
    text = getattr(e, "strerror", None) or str(e)
    if path:
        text = text.replace(f"'{path}'", "the file").replace(path, "the file")
    text = text.split("Stack trace", 1)[0]
    lines = [_OPENING.sub("", _NATIVE_PREFIX.sub("", ln)).strip() for ln in text.splitlines()]
    msg = " ".join(ln for ln in lines if ln)
    if not msg or msg == type(e).__name__:
        msg = _BARE.get(type(e).__name__, type(e).__name__)
    return msg if len(msg) <= limit else msg[:limit] + "..."
