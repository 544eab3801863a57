"""The AVSync15 clip index (layout published with the ASVA paper, Zhang et al., ECCV 2024).

    <root>/videos/<class>/<clip>.mp4
    <root>/train.txt, <root>/test.txt    one `<class>/<clip>.mp4` per line, relative to videos/;
                                         a line may be `path,start,end` (seconds)
    <root>/class_mapping.json            optional {folder name: readable class text}
    <root>/events/<class>/<clip>.json    optional per-clip sidecar (the synthetic set writes
                                         one); its "caption" replaces the class caption

The synthetic sounding-video set (jointdit.data.synthetic) uses the same layout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jointdit.errors import UserError

# val has no list of its own in AVSync15: the test list is the validation set
SPLIT_FILES = {"train": "train.txt", "test": "test.txt", "val": "test.txt"}
EVENTS_DIR = "events"
HOW_TO_GET = (
    "AVSync15 is released with the ASVA paper (https://lzhangbj.github.io/projects/asva/asva.html);"
    " accept its terms, download it, and unpack it so that <root>/videos/<class>/*.mp4 and"
    " <root>/train.txt, <root>/test.txt exist (default root: data/AVSync15/);"
    " or run `make synth` for the synthetic set (data/synth)"
)


@dataclass
class ClipRecord:
    """One clip of a split: where it is, its class, its caption, and an optional time window."""

    clip_id: str
    path: Path
    cls: str
    caption: str
    split: str
    start: float | None = None
    end: float | None = None


def sidecar_path(root: str | Path, cls: str, stem: str) -> Path:
    """Where a clip's sidecar JSON lives (ground-truth events of the synthetic set)."""
    return Path(root) / EVENTS_DIR / cls / f"{stem}.json"


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """A sidecar's contents; a damaged one is an error naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path}: damaged sidecar ({e}); delete it and re-run `make synth`"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a sidecar must hold a JSON object")
    return data


def readable_class(folder: str, mapping: Mapping[str, str] | None) -> str:
    """Class text for captions: class_mapping.json if it names the folder, else the folder name."""
    if mapping and folder in mapping:
        return str(mapping[folder])
    return folder.replace("_", " ")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _load_mapping(root: Path) -> dict[str, str]:
    path = root / "class_mapping.json"
    if not path.is_file():
        return {}
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(mapping, dict):
        raise UserError(f"{path}: must hold a mapping {{folder name: class text}}")
    return mapping


def _parse_line(line: str, where: str) -> tuple[str, float | None, float | None]:
    parts = [p.strip() for p in line.split(",")]
    if len(parts) == 1:
        return parts[0], None, None
    if len(parts) != 3:
        raise UserError(f"{where}: expected `<class>/<clip>.mp4` or `path,start,end`, got {line!r}")
    try:
        start, end = float(parts[1]), float(parts[2])
    except ValueError:
        raise UserError(f"{where}: start and end must be seconds, got {line!r}") from None
    if not 0 <= start < end:
        raise UserError(f"{where}: need 0 <= start < end, got {line!r}")
    return parts[0], start, end


def load_split(
    root: str | Path, split: str, split_files: Mapping[str, str] | None = None
) -> list[ClipRecord]:
    """Clip records of one split (train | test | val; val reads the test list).

    `split_files` maps split names to list files under `root` (default: SPLIT_FILES).
    Records keep the list's order; listed videos are not opened here.
    """
    files = dict(split_files or SPLIT_FILES)
    if split not in files:
        raise UserError(f"unknown split {split!r}; accepted: {', '.join(files)}")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset root {root} not found. {HOW_TO_GET}")
    list_path = root / files[split]
    if not list_path.is_file():
        raise UserError(f"split list {list_path} not found. {HOW_TO_GET}")
    mapping = _load_mapping(root)
    records: list[ClipRecord] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(list_path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{list_path}:{number}"
        rel, start, end = _parse_line(line, where)
        rel_path = Path(rel)
        if len(rel_path.parts) != 2 or rel_path.is_absolute():
            raise UserError(f"{where}: expected `<class>/<clip>.mp4` under videos/, got {rel!r}")
        cls, stem = rel_path.parts[0], rel_path.stem
        clip_id = f"{_safe(cls)}__{_safe(stem)}"
        if start is not None:
            clip_id += f"__{start:g}-{end:g}"  # one video may be listed with several windows
        if clip_id in seen:
            raise UserError(f"{where}: {line!r} repeats line {seen[clip_id]}")
        seen[clip_id] = number
        caption = f"a video of {readable_class(cls, mapping)}"
        sidecar = sidecar_path(root, cls, stem)
        if sidecar.is_file():
            caption = read_sidecar(sidecar).get("caption", caption)
        records.append(
            ClipRecord(
                clip_id=clip_id,
                path=root / "videos" / rel_path,
                cls=cls,
                caption=caption,
                split=split,
                start=start,
                end=end,
            )
        )
    return records
