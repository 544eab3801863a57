"""The latent cache: one safetensors file and one meta JSON per clip, written atomically, resumable.

    <cache.dir>/<split>/<clip_id>.safetensors      float32 tensors (see CACHE_KEYS)
    <cache.dir>/meta/<split>/<clip_id>.json        source, timing, caption, class, codec ids, ...
    <cache.dir>/failures/<split>.rank<R>.tsv        clip_id, source, reason of clips that failed
    <cache.dir>/config.yaml                         the resolved config of the last run

A clip is finished when both its files exist; the meta file is written last, so a run killed at
any point leaves each clip either finished or redone by the next run. The posterior (mean, std)
is stored, and `LatentDataset` samples from it at load time, so VAE noise differs per epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch.utils.data import Dataset
from tqdm import tqdm

from jointdit.config import (
    AUDIO_PROMPT,
    LATENT_DRAWS,
    REPO_ROOT,
    frame_hw,
    repo_path,
    save_resolved,
)
from jointdit.data.avsync15 import ClipRecord, load_split, sidecar_path
from jointdit.errors import UserError
from jointdit.media import has_audio_stream, read_clip

# 2: first_frame holds cache.first_frame_draws pixel-space noise-augmented encodings (K,4,h,w),
# CLIP sees SVD's resize, and AudioLDM2's prompt encoding may be cached (AUDIO_PROMPT_KEYS).
CACHE_VERSION = 2
SPLITS = ("train", "val")
# Tensors of one record; `shapes` in the meta JSON lists them for validation at load time.
CACHE_KEYS = (
    "video_mean",
    "video_std",
    "audio_mean",
    "audio_std",
    "first_frame",
    "image_emb",
    "text_emb",
    "text_mask",
)
# With codecs.audio_prompt: the caption's AudioLDM2 prompt encoding and the empty prompt's.
AUDIO_PROMPT_KEYS = (*AUDIO_PROMPT, *(f"null_{k}" for k in AUDIO_PROMPT))
SIDECAR_KEYS = ("family", "events", "event_frames")


@dataclass
class CacheReport:
    split: str
    total: int  # clips of this rank's shard
    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (clip_id, reason)
    seconds: float = 0.0

    @property
    def failed_frac(self) -> float:
        return len(self.failed) / self.total if self.total else 0.0

    @property
    def clips_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"cache {self.split}: {self.written} written, {self.skipped} already done, "
            f"{len(self.failed)} failed of {self.total} ({self.clips_per_s:.2f} clips/s)"
        )


def _atomic_write(target: Path, data: bytes) -> None:
    """Write through a temporary sibling, then rename: readers never see a partial file."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_tmp(clip_ids: set[str], folders) -> None:
    """Temporary files a killed run left for this shard's clips (other shards' are not touched)."""
    for folder in folders:
        for tmp in folder.glob(".*.tmp"):
            target = tmp.name[1:].rsplit(".", 2)[0]  # .<clip_id>.<ext>.<pid>.tmp
            if Path(target).stem in clip_ids:
                tmp.unlink(missing_ok=True)


def _window(length: int, want: int, mode: str) -> int:
    """First index of a `want`-long window in `length` items (center | start)."""
    if length <= want or mode == "start":
        return 0
    return (length - want) // 2


def _read_window(record: ClipRecord, cfg) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
    """Frames (T,3,H,W) and audio (N,) of the clip's window, the window start in seconds, and
    whether the source has an audio stream (without one: a failure, or silence when
    cache.no_audio=silence)."""
    d = cfg.data
    has_audio = has_audio_stream(record.path)
    if not has_audio and cfg.cache.no_audio == "fail":
        raise ValueError(
            "no audio stream (cache.no_audio=silence would cache it as silence, marked in its "
            "meta JSON)"
        )
    span = None if record.start is None else record.end - record.start
    clip = read_clip(
        record.path,
        d.fps,
        frame_hw(d.size),
        d.sample_rate,
        start=record.start or 0.0,
        duration=span,
    )
    n_frames = round(d.duration * d.fps)
    n_samples = round(d.duration * d.sample_rate)
    if clip.frames.shape[0] < n_frames:
        raise ValueError(
            f"too short: {clip.frames.shape[0]} frames at {d.fps} fps, need {n_frames} "
            f"({d.duration} s)"
        )
    first = _window(clip.frames.shape[0], n_frames, cfg.cache.window)
    offset = round(first / d.fps * d.sample_rate)
    frames = clip.frames[first : first + n_frames]
    audio = clip.audio[offset : offset + n_samples]
    if audio.shape[0] < n_samples:
        raise ValueError(f"audio too short: {audio.shape[0]} samples, need {n_samples}")
    return frames, audio, (record.start or 0.0) + first / d.fps, has_audio


def _sidecar(root: Path, record: ClipRecord, window_start: float, fps: float) -> dict:
    """The synthetic set's ground truth for this clip (family, event times, event frames)."""
    path = sidecar_path(root, record.cls, Path(record.path).stem)
    if not path.is_file():
        return {}
    body = json.loads(path.read_text())
    out = {k: body[k] for k in SIDECAR_KEYS if k in body}
    if window_start and "events" in out:  # times and frames become relative to the window
        shift = round(window_start * fps)
        out["events"] = [t - window_start for t in out["events"]]
        out["event_frames"] = [f - shift for f in out.get("event_frames", [])]
    return out


class _Encoder:
    """The codecs, loaded once, turning one clip's window into the cache tensors."""

    def __init__(self, cfg, device: str):
        from jointdit.codecs import codec_ids, load_codecs  # heavy; only when there is work

        self.codecs = load_codecs(cfg.codecs, device=device)
        self.ids = codec_ids(cfg.codecs)
        self.noise_aug = float(cfg.diffusion.cond_aug)
        self.draws = int(cfg.cache.first_frame_draws)

    def __call__(
        self, frames: torch.Tensor, audio: torch.Tensor, caption: str, clip_id: str
    ) -> dict:
        c = self.codecs
        video_mean, video_std = c.video.encode(frames)
        audio_mean, audio_std = c.audio.encode(audio)
        text_emb, text_mask = c.cond.text([caption])
        # SVD's noise augmentation is in pixel space, so training needs encodings of noised
        # frames: a few per clip, drawn from the clip's own seed (the same on every re-run).
        g = torch.Generator().manual_seed(zlib.crc32(clip_id.encode()))
        first = [
            c.video.encode_first_frame(frames[0], self.noise_aug, g) for _ in range(self.draws)
        ]
        tensors = {
            "video_mean": video_mean,
            "video_std": video_std,
            "audio_mean": audio_mean,
            "audio_std": audio_std,
            "first_frame": torch.stack(first),
            "image_emb": c.cond.image(frames[0]),
            "text_emb": text_emb[0],
            "text_mask": text_mask[0],
        }
        if c.prompt is not None:
            tensors |= c.prompt.encode(caption)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        for k, v in tensors.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise ValueError(f"non-finite values in {k}")
        return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}


def _size_stamp(size) -> int | list[int]:
    h, w = frame_hw(size)
    return h if h == w else [h, w]


def _stamp(cfg) -> str:
    """Hash of what decides a record's contents: the codec folders and the clip window settings."""
    from jointdit.codecs import codec_ids

    d = cfg.data
    what = {
        "codecs": codec_ids(cfg.codecs),
        # square frames stamp as an int, so caches written before [height, width] stay valid
        "window": [d.fps, _size_stamp(d.size), d.duration, d.sample_rate, cfg.cache.window],
        "first_frame": [float(cfg.diffusion.cond_aug), int(cfg.cache.first_frame_draws)],
        "version": CACHE_VERSION,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def check_version(meta: dict, path: Path) -> None:
    """A record written by an older cache layout stops with what to rebuild."""
    version = meta.get("cache_version", 1)
    if version != CACHE_VERSION:
        raise UserError(
            f"{path}: written by cache version {version}, this code reads {CACHE_VERSION} (the "
            "first frame is noise-augmented in pixel space, CLIP sees SVD's resize, the audio "
            "expert's prompt encoding is cached); rebuild the cache: make cache-train and make "
            "cache-val with ARGS=--overwrite, or a new cache.dir"
        )


def cache_dirs(cache_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(tensor folder, meta folder) of one split."""
    root = repo_path(cache_dir)
    return root / split, root / "meta" / split


def _is_done(tensor_dir: Path, meta_dir: Path, clip_id: str, stamp: str) -> bool:
    meta_path = meta_dir / f"{clip_id}.json"
    if not (meta_path.is_file() and (tensor_dir / f"{clip_id}.safetensors").is_file()):
        return False
    try:
        old = json.loads(meta_path.read_text()).get("fingerprint")
    except (ValueError, AttributeError):
        return False  # a damaged meta file: the clip is encoded again
    if old != stamp:
        raise UserError(
            f"{meta_path} was cached with other codecs or data settings (fingerprint {old} != "
            f"{stamp}); re-run with --overwrite or set cache.dir to a new folder"
        )
    return True


def cache_split(
    cfg, split: str, overwrite: bool = False, rank: int = 0, world: int = 1, device=None
) -> CacheReport:
    """Encode this rank's share of a split (every world-th clip) into the cache.

    Clips already cached are skipped unless `overwrite`; clips that cannot be read or encoded go
    to the failures file with their reason, never into the cache.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} is outside world size {world} (RANK / WORLD_SIZE)")
    root = repo_path(cfg.data.root)
    records = load_split(root, split, dict(cfg.data.split_files))[
        rank::world
    ]  # same list order in every process
    tensor_dir, meta_dir = cache_dirs(cfg.cache.dir, split)
    for folder in (tensor_dir, meta_dir, repo_path(cfg.cache.dir) / "failures"):
        folder.mkdir(parents=True, exist_ok=True)
    stamp = _stamp(cfg)
    device = device or (
        f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    )

    _remove_stale_tmp({r.clip_id for r in records}, (tensor_dir, meta_dir))
    report = CacheReport(split=split, total=len(records))
    todo = []
    for r in records:
        if not overwrite and _is_done(tensor_dir, meta_dir, r.clip_id, stamp):
            report.skipped += 1
        else:
            todo.append(r)
    if rank == 0:  # after the fingerprint check: a mismatch leaves the old config in place
        save_resolved(cfg, repo_path(cfg.cache.dir))
    encoder = _Encoder(cfg, device) if todo else None
    start = time.perf_counter()
    bar = tqdm(todo, desc=f"cache {split} [rank {rank}/{world}]", unit="clip", dynamic_ncols=True)
    for record in bar:
        try:
            frames, audio, window_start, has_audio = _read_window(record, cfg)
            tensors = encoder(frames, audio, record.caption, record.clip_id)
        except (UserError, ValueError, RuntimeError, OSError) as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            report.failed.append((record.clip_id, f"{record.path}\t{reason}"))
            bar.set_postfix(failed=len(report.failed))
            continue
        meta = _meta(cfg, record, root, window_start, tensors, encoder.ids, stamp)
        meta["audio_stream"] = has_audio  # False: the source had no sound, cached as silence
        _atomic_write(tensor_dir / f"{record.clip_id}.safetensors", save(tensors))
        _atomic_write(meta_dir / f"{record.clip_id}.json", json.dumps(meta, indent=1).encode())
        report.written += 1
    report.seconds = time.perf_counter() - start
    failures = repo_path(cfg.cache.dir) / "failures" / f"{split}.rank{rank}.tsv"
    lines = [f"{cid}\t{why}\n" for cid, why in report.failed]
    _atomic_write(failures, "".join(lines).encode())
    return report


def _display_path(path: Path) -> str:
    """Repo-relative when under the repo (no machine paths in shared files), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(Path(path).resolve())


def _meta(cfg, record, root, window_start, tensors, ids, stamp) -> dict:
    d = cfg.data
    return {
        "clip_id": record.clip_id,
        "split": record.split,
        "source": _display_path(record.path),
        "class": record.cls,
        "caption": record.caption,
        "fps": float(d.fps),
        "frames": int(tensors["video_mean"].shape[0]),
        "duration": float(d.duration),
        "sample_rate": int(d.sample_rate),
        "num_samples": round(d.duration * d.sample_rate),
        "start": float(window_start),
        "end": float(window_start + d.duration),
        "codecs": ids,
        "cache_version": CACHE_VERSION,
        "fingerprint": stamp,
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        **_sidecar(root, record, window_start, float(d.fps)),
    }


class LatentDataset(Dataset):
    """Cached clips as dicts of tensors; video and audio latents are drawn from their posterior
    (mean + std * noise, `latents="sample"`) or are its mean (`latents="mean"`).

    Keys: video (T,4,h,w), audio (8,t,16), first_frame (4,h,w) (one of the clip's noise-augmented
    encodings, at random), image_emb (D,), text_emb (L,D), text_mask (L,) int64, clip_id (str),
    and AUDIO_PROMPT_KEYS where cached. With max_t > 0 only frames [0, max_t) are kept and the
    audio latents are cropped to the same duration.
    """

    def __init__(self, cache_dir: str | Path, split: str, max_t: int = 0, latents: str = "sample"):
        if latents not in LATENT_DRAWS:
            raise UserError(
                f"latents {latents!r} is not known; accepted: {', '.join(LATENT_DRAWS)}"
            )
        self.draw = latents == "sample"
        self.tensor_dir, self.meta_dir = cache_dirs(cache_dir, split)
        # a clip counts once both files exist (the meta file is written last)
        self.metas = [
            p
            for p in sorted(self.meta_dir.glob("*.json"))
            if (self.tensor_dir / f"{p.stem}.safetensors").is_file()
        ]
        if not self.metas:
            raise UserError(
                f"no cached clips in {self.tensor_dir} (run `make cache-{split}` with this cache.dir)"
            )
        self.max_t = max_t
        self.meta(0)  # an old cache layout stops here, before any training

    def __len__(self) -> int:
        return len(self.metas)

    def meta(self, index: int) -> dict:
        path = self.metas[index]
        try:
            meta = json.loads(path.read_text())
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or not {"clip_id", "shapes"} <= meta.keys():
            raise UserError(f"{path}: not a cache meta JSON (damaged?); re-cache it")
        check_version(meta, path)
        return meta

    def __getitem__(self, index: int) -> dict:
        meta = self.meta(index)
        path = self.tensor_dir / f"{meta['clip_id']}.safetensors"
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: not a readable safetensors file ({e}); re-cache it") from None
        for key, shape in meta["shapes"].items():
            if key not in tensors or list(tensors[key].shape) != shape:
                got = list(tensors[key].shape) if key in tensors else "missing"
                raise UserError(f"{path}: {key} is {got}, its meta says {shape}; re-cache it")
        video, audio = (
            tensors[f"{m}_mean"] + tensors[f"{m}_std"] * torch.randn_like(tensors[f"{m}_std"])
            if self.draw
            else tensors[f"{m}_mean"]
            for m in ("video", "audio")
        )
        if self.max_t > 0 and self.max_t < video.shape[0]:
            keep_a = math.ceil(audio.shape[1] * self.max_t / video.shape[0])
            video, audio = video[: self.max_t], audio[:, :keep_a]
        draws = tensors["first_frame"]  # one of the clip's noise-augmented encodings
        return {
            "video": video,
            "audio": audio,
            "first_frame": draws[torch.randint(draws.shape[0], ())],
            "image_emb": tensors["image_emb"],
            "text_emb": tensors["text_emb"],
            "text_mask": tensors["text_mask"],
            **{k: tensors[k] for k in AUDIO_PROMPT_KEYS if k in tensors},
            "clip_id": meta["clip_id"],
        }
