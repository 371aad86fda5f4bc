"""Where the SigLIP, Whisper and BERT tower folders are, for the model loader and the processor alike.

A HumanOmni / R1-Omni config.json names its towers by ``mm_vision_tower``, ``mm_audio_tower`` and (ours)
``text_model_path``; the published one holds hub ids there and no BERT key at all, because the reference
code hard-codes the BERT path. The run config's ``model.vision_tower_path`` / ``audio_tower_path`` /
``bert_path`` override them so that checkpoint loads unedited. Relative paths resolve against the
checkpoint directory, never the current directory. This module only resolves paths; it loads nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Default sub-folders of a checkpoint written by this project.
VISION_SUBDIR = "vision_tower"
AUDIO_SUBDIR = "audio_tower"
BERT_SUBDIR = "bert"


@dataclass(frozen=True)
class TowerPaths:
    """Overrides from the run config; None keeps what config.json says."""

    vision: str | None = None
    audio: str | None = None
    bert: str | None = None


@dataclass(frozen=True)
class TowerDirs:
    vision: Path
    audio: Path
    bert: Path | None  # None: no folder found (fine when the checkpoint embeds the BERT config)


# (TowerDirs field, config.json key, default sub-folder, run-config key that overrides it)
_TOWERS = (
    ("vision", "mm_vision_tower", VISION_SUBDIR, "model.vision_tower_path"),
    ("audio", "mm_audio_tower", AUDIO_SUBDIR, "model.audio_tower_path"),
    ("bert", "text_model_path", BERT_SUBDIR, "model.bert_path"),
)


def read_config_json(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None


def checkpoint_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, which must have one (an error naming the directory)."""
    path = Path(ckpt_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    return read_config_json(path)


def tower_dir(ckpt_dir: str | Path, which: str, overrides: TowerPaths = TowerPaths()) -> Path:
    """The folder of one tower (``which``: vision, audio or bert): the override, else config.json's value,
    else the default sub-folder; relative to ``ckpt_dir``. A folder that does not exist is an error naming
    the key to set."""
    ckpt = Path(ckpt_dir).resolve()
    _, key, default, override_key = next(t for t in _TOWERS if t[0] == which)
    given = getattr(overrides, which)
    value = given or read_config_json(ckpt).get(key) or None
    path = ckpt / (value or default)  # an absolute value replaces ckpt entirely
    if not path.is_dir():
        source = override_key if given else f"{ckpt / 'config.json'} field {key}"
        raise FileNotFoundError(
            f"{source} = {value or default!r} -> {path} is not a local directory; "
            f"point {override_key} at the downloaded folder (relative paths resolve against {ckpt})"
        )
    return path


def resolve_tower_dirs(ckpt_dir: str | Path, overrides: TowerPaths = TowerPaths()) -> TowerDirs:
    """All three folders (what the processor needs). A missing default BERT folder gives None."""
    try:
        bert: Path | None = tower_dir(ckpt_dir, "bert", overrides)
    except FileNotFoundError:
        if overrides.bert or read_config_json(Path(ckpt_dir).resolve()).get("text_model_path"):
            raise
        bert = None
    return TowerDirs(tower_dir(ckpt_dir, "vision", overrides), tower_dir(ckpt_dir, "audio", overrides), bert)
