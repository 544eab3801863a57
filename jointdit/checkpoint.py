"""Checkpoints: `checkpoints/<run>/step_<N>/`, written atomically, the last K kept.

A checkpoint holds what training changed, plus a reference to what it builds on:
    model.safetensors   the trainable tensors, and any frozen tensor no referenced file holds
                        (e.g. from-scratch tiny experts); never the pretrained weights
    ema.safetensors     EMA of the trainable parameters (inference prefers these)
    optimizer.pt        optimizer + LR scheduler state (tensors and plain types only;
                        read back with torch.load(weights_only=True))
    rng.safetensors     torch RNG states per rank; python/numpy states live in state.json
    base.json           the frozen parts it builds on: pretrained expert folders and/or the
                        `init_from` checkpoint, each with its path and content hash
    state.json          step, samples seen, config fingerprint, rank count (written last)
    config.yaml         the resolved config of the run
It is assembled under a temporary name and renamed into place, so a crash mid-save leaves the
previous checkpoint as the latest complete one.

Loading (`restore`) rebuilds the frozen parts from the references (checking their hashes),
then loads the saved tensors. A checkpoint without base.json (the older format, which saved
the whole model) loads as one that references nothing.

Content hashes are SHA-256 of the files' bytes. Reading 10 GB of pretrained weights costs
seconds, so each file's hash is memoised in `<checkpoints>/.content_hashes.json` under its
(resolved path, size, mtime): later checks only stat the files, and a file rewritten in
place (new mtime or size) is hashed again. A header-only hash would be cheaper but cannot
tell two fine-tunes of the same architecture apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from jointdit.config import REPO_ROOT, load_saved_config, repo_path
from jointdit.errors import UserError

STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_DIR = re.compile(r"^\.tmp_step_\d+_(\d+)$")  # .tmp_step_<N>_<pid>: a save in progress
HASH_MEMO = ".content_hashes.json"


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
    base: dict | None = None,
) -> Path:
    """Write step_<step>/ atomically and prune all but the newest `keep_last`.

    `model_state` holds only what `plan_base` says to save; `base` is its base.json."""
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
    if base is not None:
        (tmp / "base.json").write_text(json.dumps(base, indent=1))
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


# ---------------------------------------------------------------------------------------------
# what a checkpoint builds on


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(path: str | os.PathLike, memo_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (relative names and their hashes,
    hidden files skipped). File hashes are memoised in `memo_dir`/.content_hashes.json by
    (resolved path, size, mtime), so a 10 GB folder is read once per machine."""
    root = Path(path).resolve()
    if root.is_file():
        files = [root]
    else:
        files = sorted(
            f
            for f in root.rglob("*")
            if f.is_file() and not any(x.startswith(".") for x in f.relative_to(root).parts)
        )
    if not files:
        raise UserError(f"{root}: nothing to hash (missing or empty)")
    memo_file = Path(memo_dir) / HASH_MEMO if memo_dir is not None else None
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}  # a damaged memo only costs a re-hash
    changed = False
    lines = []
    for f in files:
        st = f.stat()
        key = f"{f}|{st.st_size}|{st.st_mtime_ns}"
        digest = memo.get(key)
        if digest is None:
            digest = _file_sha256(f)
            memo = {k: v for k, v in memo.items() if not k.startswith(f"{f}|")}
            memo[key] = digest
            changed = True
        lines.append(f"{f.relative_to(root).as_posix() if f != root else ''} {digest}")
    if changed and memo_file is not None:
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_file.with_name(f"{HASH_MEMO}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo, indent=0))
            os.replace(tmp, memo_file)
        except OSError:
            pass  # read-only checkpoints folder: hash again next time
    if root.is_file():
        return lines[0].split()[-1]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _portable(path: Path) -> str:
    """A path as configs spell it: relative to the repo root when inside it."""
    p = Path(path).resolve()
    try:
        return p.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(p)


def frozen_sources(cfg) -> list[dict[str, str]]:
    """The pretrained folders `build_model(cfg)` loads: [{"prefix", "path"}] per expert."""
    from jointdit.model.sizes import get_size

    m = cfg.model
    if m.random_init:
        return []  # random weights of the published architecture: no file holds them
    size = get_size(m.size)
    out = []
    for prefix, spec, path in (
        ("video_expert.unet.", size.video_unet, m.video_unet),
        ("audio_expert.unet.", size.audio_unet, m.audio_unet),
    ):
        if spec is None:
            out.append({"prefix": prefix, "path": _portable(repo_path(path))})
    return out


def select_saved(
    model: torch.nn.Module, covered: tuple[str, ...], init_saved: set[str] | None = None
) -> tuple[list[str], bool]:
    """(state-dict keys a checkpoint holds, whether it must reference the init checkpoint).

    Saved: the trainable parameters, buffers under no `covered` prefix (the pretrained
    folders' parts), and frozen parameters under none unless the init checkpoint provides
    them. The init checkpoint is needed only when a frozen parameter comes from it: a Stage B
    that trains everything Stage A trained loads without Stage A's files."""
    state_keys = list(model.state_dict().keys())
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    frozen = [k for k in state_keys if k in params and k not in trainable]
    need_init = init_saved is not None and any(
        k in init_saved or not k.startswith(covered) for k in frozen
    )
    keys = [
        k
        for k in state_keys
        if k in trainable or (not k.startswith(covered) and (k not in params or not need_init))
    ]
    return keys, need_init


def plan_base(model: torch.nn.Module, cfg, init: Path | None, memo_dir) -> tuple[list[str], dict]:
    """What this run's checkpoints hold (`select_saved`) and their base.json: the pretrained
    folders and, where needed, the `init_from` checkpoint, each with its content hash."""
    sources = frozen_sources(cfg)
    init_saved = set(saved_keys(init)) if init is not None else None
    keys, need_init = select_saved(model, tuple(s["prefix"] for s in sources), init_saved)
    base = {
        "pretrained": [
            {**s, "sha256": content_hash(repo_path(s["path"]), memo_dir)} for s in sources
        ],
        "init": None,
    }
    if need_init:
        base["init"] = {
            "path": _portable(init),
            "sha256": content_hash(init / "model.safetensors", memo_dir),
        }
    return keys, base


def saved_bytes(model: torch.nn.Module, keys: list[str]) -> dict[str, int]:
    """Bytes a checkpoint of `model` would take (works on the meta device): the saved
    tensors, their fp32 EMA and AdamW's two fp32 moments of the trainable parameters."""
    state = model.state_dict()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "model": sum(state[k].numel() * state[k].element_size() for k in keys),
        "ema": 4 * trainable,
        "optimizer": 8 * trainable,
    }


def saved_keys(ckpt: Path) -> list[str]:
    """Names of the tensors a checkpoint's model.safetensors holds (header only)."""
    with safe_open(str(Path(ckpt) / "model.safetensors"), "pt") as f:
        return list(f.keys())


def read_base(ckpt: Path) -> dict | None:
    """base.json of a checkpoint, or None for the older format (the whole model saved)."""
    path = Path(ckpt) / "base.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _check_reference(ref: dict, target: Path, owner: Path, memo_dir) -> None:
    if not target.exists():
        raise UserError(
            f"{owner / 'base.json'}: it builds on {target}, which is missing (`make "
            "fetch-models` restores pretrained experts; a pruned init_from run cannot be rebuilt)"
        )
    digest = content_hash(target, memo_dir)
    if digest != ref["sha256"]:
        raise UserError(
            f"{target}: content hash {digest[:12]} differs from {ref['sha256'][:12]} recorded "
            f"in {owner / 'base.json'}; the frozen weights changed since this checkpoint was "
            "trained"
        )


def restore(model: torch.nn.Module, ckpt_path, memo_dir=None, partial: bool = False) -> set[str]:
    """Load a checkpoint into a model built from its config: check and rebuild the frozen
    parts it references (the `init_from` chain, recursively; pretrained experts are loaded by
    `build_model`), then load its saved tensors. Returns the state-dict keys it set. Every
    key must be set unless `partial` (an `init_from` start, whose new tensors - e.g. LoRA
    adapters - keep their fresh values)."""
    ckpt = resolve_checkpoint(ckpt_path)
    weights = ckpt / "model.safetensors"
    saved = load_tensors(ckpt, "model.safetensors")
    state = model.state_dict()
    unknown = sorted(set(saved) - set(state))
    if unknown:
        raise UserError(
            f"{weights}: {len(unknown)} tensors the model lacks, e.g. {unknown[0]!r} "
            "(was it trained with a different model config?)"
        )
    have = set(saved)
    base = read_base(ckpt)
    if base is not None:
        for ref in base["pretrained"]:
            _check_reference(ref, repo_path(ref["path"]), ckpt, memo_dir)
        covered = tuple(ref["prefix"] for ref in base["pretrained"])
        have |= {k for k in state if k.startswith(covered)} if covered else set()
        if base.get("init"):
            init = repo_path(base["init"]["path"])
            _check_reference(base["init"], init / "model.safetensors", ckpt, memo_dir)
            have |= restore(model, init, memo_dir, partial=True)
    missing = [k for k in state if k not in have]
    if missing and not partial:
        raise UserError(
            f"{weights}: lacks {len(missing)} tensors that no referenced file holds, e.g. "
            f"{missing[0]!r}"
        )
    try:
        model.load_state_dict(saved, strict=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{weights}: does not fit the model: {first}") from None
    return have


def build_trained_model(cfg):
    """The model a run trains: `build_model(cfg)` plus the LoRA adapters `cfg.train` names."""
    from jointdit.model import build_model  # model import is heavy; only when loading one
    from jointdit.model.lora import apply_lora

    model = build_model(cfg)
    if cfg.train.lora_rank > 0:
        apply_lora(model, list(cfg.train.unfreeze), cfg.train.lora_rank, cfg.train.lora_alpha)
    return model


def load_model(ckpt_path: str | os.PathLike, ema: bool = True, device: str = "cpu"):
    """Build the model a checkpoint was trained with, rebuild its frozen parts from the
    references in base.json and load its trained (EMA) tensors.

    Returns (model, cfg, ckpt_dir). The config is the resolved one saved with the run, so
    inference uses the same model size, codecs and diffusion settings as training.
    """
    ckpt = resolve_checkpoint(ckpt_path)
    cfg = load_saved_config(ckpt / "config.yaml")
    model = build_trained_model(cfg)
    restore(model, ckpt, memo_dir=ckpt.parent.parent)
    if ema:
        ema_state = load_tensors(ckpt, "ema.safetensors")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in ema_state.items():
                params[name].copy_(value)
    return model.to(device).eval(), cfg, ckpt
