"""`make fetch-models`: download the pretrained parts into <codecs.pretrained_dir>/<name>/.

Each source gets a `.complete.json` marker only after its files are all there and check out, so
a run that dies mid-way is resumed (huggingface_hub keeps partial files in the folder) or redone,
never mistaken for complete. HF_TOKEN is honoured for gated repos (SVD needs its terms accepted).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from jointdit.config import repo_path
from jointdit.errors import UserError

MARKER = ".complete.json"
# Per sub-folder: configs and tokenizer files (tokenizer.json, RoBERTa's vocab.json and
# merges.txt, T5's spiece.model), and full-precision safetensors only (no .bin, no fp16 copies).
FOLDER_PATTERNS = (
    "*.json",
    "*.txt",
    "spiece.model",
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
)
# A full CLIPModel repo: its config, weights and tokenizer files at the top level.
CLIP_PATTERNS = ["config.json", "model.safetensors", "*token*.json", "vocab.json", "merges.txt"]
# What a sub-folder must hold to count as downloaded: a model, processor or tokenizer config.
CONFIG_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json")


def _marker_body(src) -> dict:
    return {"repo": src.repo, "revision": src.revision, "subfolders": list(src.subfolders)}


def is_complete(dest: Path, src) -> bool:
    marker = dest / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == _marker_body(src)


def _check_folders(dest: Path, src) -> None:
    for sub in src.subfolders:
        if not any((dest / sub / name).is_file() for name in CONFIG_FILES):
            raise UserError(
                f"{src.repo}: sub-folder {sub}/ came back without a config file; "
                "check codecs.sources and re-run `make fetch-models`"
            )


def _split_clip(stage: Path, dest: Path) -> None:
    """Keep the text tower (with its projection) and the tokenizer of a full CLIPModel repo."""
    from transformers import CLIPConfig, CLIPTextModelWithProjection, CLIPTokenizer

    full = CLIPConfig.from_pretrained(stage)
    text_cfg = full.text_config
    text_cfg.projection_dim = full.projection_dim  # kept on the full config, not the text one
    model, info = CLIPTextModelWithProjection.from_pretrained(
        stage, config=text_cfg, output_loading_info=True
    )
    if info["missing_keys"] or info["mismatched_keys"]:
        raise UserError(
            f"{stage}: the CLIP text tower does not match its checkpoint "
            f"(missing {list(info['missing_keys'])[:3]}); check codecs.sources.clip_text.repo"
        )
    model.save_pretrained(dest / "text_encoder")
    CLIPTokenizer.from_pretrained(stage).save_pretrained(dest / "tokenizer")


def _explain(name: str, src, err: Exception) -> str:
    where = f"codecs.sources.{name}"
    if isinstance(err, GatedRepoError):
        return (
            f"{src.repo} is gated: accept its terms on huggingface.co, then set HF_TOKEN "
            "and re-run `make fetch-models`"
        )
    if isinstance(err, RevisionNotFoundError):
        return f"{src.repo} has no revision {src.revision!r} (check {where}.revision)"
    if isinstance(err, RepositoryNotFoundError):
        return f"{src.repo} not found or not accessible (check {where}.repo; private repos need HF_TOKEN)"
    if isinstance(err, LocalEntryNotFoundError):
        return (
            f"cannot download {src.repo}: no connection to huggingface.co (offline or "
            "HF_HUB_OFFLINE=1); connect and re-run `make fetch-models`, or point the codecs "
            "config at models you already have"
        )
    if isinstance(err, HfHubHTTPError) and getattr(err.response, "status_code", None) in (401, 403):
        return f"{src.repo}: access denied; set a valid HF_TOKEN and re-run `make fetch-models`"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"downloading {src.repo} failed ({first}); re-run `make fetch-models` to resume"


def fetch_models(
    cfg_codecs,
    names: list[str] | None = None,
    download: Callable[..., str] = snapshot_download,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Download every configured source (or those in `names`); returns {name: folder}."""
    sources = cfg_codecs.sources
    names = list(sources) if not names else names
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise UserError(f"unknown model source(s) {unknown}; accepted: {', '.join(sources)}")
    root = repo_path(cfg_codecs.pretrained_dir)
    token = os.environ.get("HF_TOKEN") or None
    done: dict[str, Path] = {}
    for name in names:
        src, dest = sources[name], root / name
        done[name] = dest
        if is_complete(dest, src):
            log(f"{name}: complete in {dest}, skipped")
            continue
        (dest / MARKER).unlink(missing_ok=True)
        log(f"{name}: downloading {src.repo}@{src.revision} -> {dest}")
        try:
            if src.kind == "diffusers":
                patterns = [f"{sub}/{pat}" for sub in src.subfolders for pat in FOLDER_PATTERNS]
                download(
                    src.repo,
                    revision=src.revision,
                    local_dir=dest,
                    allow_patterns=patterns,
                    token=token,
                )
            elif src.kind == "clip_text":
                stage = dest / "_download"
                download(
                    src.repo,
                    revision=src.revision,
                    local_dir=stage,
                    allow_patterns=CLIP_PATTERNS,
                    token=token,
                )
                _split_clip(stage, dest)
                shutil.rmtree(stage)
            else:
                raise UserError(
                    f"codecs.sources.{name}.kind={src.kind!r}; accepted: diffusers, clip_text"
                )
        except UserError:
            raise
        except Exception as e:  # network, auth and hub errors all end in one line
            raise UserError(_explain(name, src, e)) from None
        _check_folders(dest, src)
        tmp = dest / (MARKER + ".tmp")
        tmp.write_text(json.dumps(_marker_body(src)))
        os.replace(tmp, dest / MARKER)
        log(f"{name}: complete")
    return done
