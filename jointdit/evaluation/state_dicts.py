"""Reading a published state dict as it is, and checking it against the module that loads it.

The evaluation networks load weight files the user places by hand; a wrong or renamed file must
stop with one line that names the file and the first key that differs, never load half a
network or fail later with a shape error deep inside a forward.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from jointdit.errors import UserError


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The dict of tensors in `path`, read with `weights_only` (memory-mapped where the format
    allows, so a 4.5 GB file costs no copy); a UserError names a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} weights not found: {path} (place the published file there)")
    try:
        state = torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except Exception as err:  # pickle, zip and torch errors all mean "not a state dict"
        raise UserError(f"{path}: not a readable {what} state dict ({err})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a {what} state dict")
    return state


def check_state_dict(
    state: dict[str, torch.Tensor],
    module: torch.nn.Module,
    path: str | Path,
    what: str,
    optional: tuple[str, ...] = (),
) -> None:
    """Check that `state` holds exactly `module`'s keys with the same shapes (keys ending in one
    of `optional` may be absent); a UserError names the file and the first key that differs."""
    expected = module.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            if key.endswith(optional):
                continue
            raise UserError(f"{path}: key {key!r} is missing; not the published {what} file")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(
                f"{path}: key {key!r} has shape {tuple(state[key].shape)} where {what} "
                f"expects {tuple(tensor.shape)}"
            )
    for key in state:
        if key not in expected:
            raise UserError(f"{path}: unexpected key {key!r}; not the published {what} file")
