"""Checkpoints: `checkpoints/<run>/step_<N>/`, written atomically, the last K kept.

A checkpoint directory holds
    model.safetensors   the full model state (what inference loads)
    ema.safetensors     EMA of the trainable parameters (inference prefers these)
    optimizer.pt        optimizer + LR scheduler state (tensors and plain types only;
                        read back with torch.load(weights_only=True))
    rng.safetensors     torch RNG states per rank; python/numpy states live in state.json
    state.json          step, samples seen, config fingerprint, rank count (written last)
    config.yaml         the resolved config of the run
It is assembled under a temporary name and renamed into place, so a crash mid-save leaves the
previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from jointdit.config import load_config
from jointdit.errors import UserError

STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_DIR = re.compile(r"^\.tmp_step_\d+_(\d+)$")  # .tmp_step_<N>_<pid>: a save in progress


@dataclass
class CheckpointState:
    step: int
    samples_seen: int
    fingerprint: str
    extra: dict[str, Any]


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a step directory or a run directory (-> its latest checkpoint)."""
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise UserError(
            f"no checkpoint at {p} (expected a step_<N>/ folder with state.json, or a run "
            "folder holding some; `make train` or `make demo` creates them)"
        )
    return latest


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    rng_states: dict[str, torch.Tensor],
    state: CheckpointState,
    config_text: str,
    keep_last: int,
) -> Path:
    """Write step_<step>/ atomically and prune all but the newest `keep_last`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step_{step}"
    tmp = run_dir / f".tmp_step_{step}_{os.getpid()}"
    remove_stale_tmp(run_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous(model_state), tmp / "model.safetensors")
    save_file(_contiguous(ema_state), tmp / "ema.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    save_file(_contiguous(rng_states), tmp / "rng.safetensors")
    (tmp / "config.yaml").write_text(config_text)
    meta = {
        "step": state.step,
        "samples_seen": state.samples_seen,
        "fingerprint": state.fingerprint,
        **state.extra,
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))  # last: marks completeness
    for f in tmp.iterdir():  # make the contents durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # a re-save of the same step (e.g. after a resume) replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_tmp(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary folders of saves whose writer is gone (killed mid-save); a live
    writer's folder (its pid still runs) is left alone. Returns what was removed."""
    run_dir = Path(run_dir)
    removed = []
    for p in run_dir.iterdir() if run_dir.is_dir() else ():
        m = TMP_DIR.match(p.name)
        if m and p.is_dir() and (int(m.group(1)) == os.getpid() or not _alive(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def read_state(ckpt: Path) -> CheckpointState:
    try:
        meta = json.loads((ckpt / "state.json").read_text())
        step, samples, fp = meta.pop("step"), meta.pop("samples_seen"), meta.pop("fingerprint")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(
            f"{ckpt / 'state.json'}: not a valid checkpoint state (damaged or not written by "
            "this repo); delete that step folder to fall back to the one before it"
        ) from None
    return CheckpointState(step=step, samples_seen=samples, fingerprint=fp, extra=meta)


def load_tensors(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    path = Path(ckpt) / name
    if not path.is_file():
        raise UserError(f"{path}: no such file (copied incompletely?)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:  # a truncated or damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable safetensors file ({first})") from None


def load_optimizer_state(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / "optimizer.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable optimizer state ({first})") from None


def load_model(ckpt_path: str | os.PathLike, ema: bool = True, device: str = "cpu"):
    """Build the model a checkpoint was trained with and load its (EMA) weights.

    Returns (model, cfg, ckpt_dir). The config is the resolved one saved with the run, so
    inference uses the same model size, codecs and diffusion settings as training.
    """
    from jointdit.model import build_model  # model import is heavy; only when loading one

    ckpt = resolve_checkpoint(ckpt_path)
    cfg = load_config(ckpt / "config.yaml")
    model = build_model(cfg)
    model.load_state_dict(load_tensors(ckpt, "model.safetensors"))
    if ema:
        ema_state = load_tensors(ckpt, "ema.safetensors")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in ema_state.items():
                params[name].copy_(value)
    return model.to(device).eval(), cfg, ckpt
