"""Exceptions raised by the data layer.

``DataError`` is a bad record or dataset file; its message names the file, the record index and
the field.  ``MediaError`` is an unreadable / corrupt media file; its message names the file and
what failed.  Both are ``ValueError`` subclasses so callers can catch them generically.
"""

from __future__ import annotations

import os


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
