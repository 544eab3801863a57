"""Checks shared by the codec loaders: a model folder must exist before from_pretrained sees it."""

from __future__ import annotations

from pathlib import Path

from jointdit.config import repo_path
from jointdit.errors import UserError


def require_folder(path: str | Path, what: str, marker: str) -> Path:
    """Resolve `path` (relative to the repo root) and check it holds `marker`; else a UserError."""
    folder = repo_path(path)
    if not (folder / marker).is_file():
        hint = (
            "run `make tiny-models`"
            if "embedded" in folder.parts
            else "run `make fetch-models` or point the codecs config at your copy"
        )
        raise UserError(f"{what} not found: {folder} has no {marker} ({hint})")
    return folder
