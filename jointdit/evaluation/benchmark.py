"""`make eval-avsync15`: generate a test split per protocol with JointDiT and the cascade
baseline of the same checkpoint, score both against the split's own windows, print one table.

1. Windows: `eval.clips_per_video` per test video at evenly spaced starts (the protocol).
2. Generation, resumable (a window whose meta.json exists is skipped): from each window's
   first frame (saved as pictures/<window>.png, the picture as the source shows it) and the
   clip's caption, each group samples one clip with the window's own seed (infer.seed + window
   index, the same in both groups: the pair differs only by the group's settings).
   joint = JointDiT; cascade = the experts side by side (`pipeline.sampling_groups`' "iso").
3. Scoring: generated clips are resampled to the protocol (`Protocol.resample`), the
   reference windows read in it; per-clip outputs are cached (`suite.group_outputs`), the
   reference's under <eval.out_dir>/reference/<dataset>/ (computed once per protocol and
   weights, for every checkpoint), the groups' under the run's folder.
4. The table: rows joint, cascade, ground truth (the reference windows' own per-clip scores)
   and the paired contrast joint - cascade, each cell a mean with a bootstrap 95% interval
   over windows; results.json beside it holds the same with the protocol, its hash, N and
   the weights used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from jointdit import media
from jointdit.config import portable_path, repo_path, save_resolved
from jointdit.data.avsync15 import ClipRecord, load_split, read_sidecar, sidecar_path
from jointdit.errors import UserError
from jointdit.evaluation.protocol import Protocol, video_duration
from jointdit.evaluation.suite import (
    EvalClip,
    available_networks,
    format_scores,
    group_outputs,
    score_groups,
)
from jointdit.evaluation.weights import weights_dir

# table row -> the sampling group of `pipeline.sampling_groups` it uses
GROUPS = {"joint": "joint", "cascade": "iso"}


@dataclass(frozen=True)
class Window:
    key: str
    record: ClipRecord
    start: float
    seed: int


def windows(cfg: DictConfig, protocol: Protocol) -> list[Window]:
    """The protocol's windows of the split, in the split list's order, each with its seed."""
    d = cfg.data
    records = load_split(repo_path(d.root), protocol.split, d.split_files)
    out = []
    for record in records:
        if record.start is not None:  # the list gives the video's window
            length = float(record.end) - float(record.start)
            starts = [record.start + s for s in protocol.starts(length)]
        else:
            starts = protocol.starts(video_duration(record.path))
        for k, start in enumerate(starts):
            key = record.clip_id if protocol.clips_per_video == 1 else f"{record.clip_id}__w{k}"
            out.append(Window(key, record, start, cfg.infer.seed + len(out)))
    if not out:
        raise UserError(f"{d.root}: the {protocol.split} split lists no clips")
    return out


def _family(record: ClipRecord, root: Path) -> str | None:
    sidecar = sidecar_path(root, record.cls, record.path.stem)
    return read_sidecar(sidecar).get("family") if sidecar.is_file() else None


def _picture(window: Window, folder: Path) -> Path:
    """The window's first frame as the source shows it (full size), saved once as a PNG."""
    path = folder / f"{window.key}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        frame = media.read_video(window.record.path, 1.0, None, window.start, 1.0)[0]
        pixels = ((frame.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
        Image.fromarray(pixels).save(tmp)
        os.replace(tmp, path)
    return path


def generate(cfg: DictConfig, ckpt: str, wins: list[Window], run_dir: Path) -> None:
    """Sample every window for every group into <run_dir>/<group>/<window>/ (resumable)."""
    from jointdit.pipeline import Generator, Request, sampling_groups, weights_from_config

    todo = [
        (group, w)
        for group in GROUPS
        for w in wins
        if not (run_dir / group / w.key / "meta.json").is_file()
    ]
    if not todo:
        return
    gen = Generator(ckpt)
    settings = sampling_groups(weights_from_config(cfg.infer))
    for group, w in tqdm(todo, desc=f"sampling {run_dir}", unit="clip"):
        gen.generate(
            Request(
                out_dir=run_dir / group / w.key,
                image=str(_picture(w, run_dir / "pictures")),
                prompt=w.record.caption,
                steps=cfg.infer.steps,
                seed=w.seed,
                **settings[GROUPS[group]],
            )
        )


def _generated(protocol: Protocol, folder: Path, reference: EvalClip) -> EvalClip:
    meta = json.loads((folder / "meta.json").read_text())
    clip = media.read_clip(folder / "out.mp4", meta["fps"], None, meta["sample_rate"])
    frames, audio = protocol.resample(clip.frames, clip.fps, clip.audio, clip.sample_rate)
    return EvalClip(
        reference.key, frames, audio, reference.picture, reference.caption, reference.family
    )


def run_dir_of(cfg: DictConfig, ckpt_dir: Path) -> Path:
    """<eval.out_dir>/<run>/<step>/ for a checkpoint folder <...>/<run>/<step>/."""
    return repo_path(cfg.eval.out_dir) / ckpt_dir.parent.name / ckpt_dir.name


def evaluate_checkpoint(cfg: DictConfig, ckpt: str) -> dict[str, Any]:
    """Generate (resumably), score and tabulate; returns results.json's contents + "table"."""
    from jointdit.checkpoint import resolve_checkpoint

    protocol = Protocol.from_config(cfg)
    ckpt_dir = resolve_checkpoint(ckpt)
    run_dir = run_dir_of(cfg, ckpt_dir)
    wins = windows(cfg, protocol)
    generate(cfg, str(ckpt_dir), wins, run_dir)

    folder = weights_dir(cfg)
    skipped: list[str] = []

    def say(line: str) -> None:
        skipped.append(line)
        print(line)

    networks = available_networks(folder, say)
    root = repo_path(cfg.data.root)
    reference = []
    for w in tqdm(wins, desc="reading reference windows", unit="clip"):
        frames, audio = protocol.read_window(w.record.path, w.start)
        reference.append(
            EvalClip(w.key, frames, audio, frames[0], w.record.caption, _family(w.record, root))
        )
    common = dict(
        networks=networks,
        protocol_hash=protocol.hash,
        fps=protocol.fps,
        sample_rate=protocol.sample_rate,
    )
    ref_dir = repo_path(cfg.eval.out_dir) / "reference" / f"{root.name}-{protocol.split}"
    ref_out = group_outputs(reference, cache_dir=ref_dir, **common)
    outputs = {
        group: group_outputs(
            [_generated(protocol, run_dir / group / r.key, r) for r in reference],
            cache_dir=run_dir / "features" / group,
            **common,
        )
        for group in GROUPS
    }
    e = cfg.eval
    rows = score_groups(outputs, ref_out, tuple(GROUPS), e.bootstrap, e.fd_bootstrap, e.seed)
    table = format_scores(rows)
    results = {
        "checkpoint": portable_path(ckpt_dir),
        "protocol": protocol.as_dict(),
        "protocol_hash": protocol.hash,
        "dataset": portable_path(root),
        "n_clips": len(wins),
        "n_videos": len({w.record.clip_id for w in wins}),
        "weights": {n.name: {"file": n.file, "sha256": n.sha256} for n in networks if n.name},
        "skipped": skipped,
        "scores": rows,
    }
    tmp = run_dir / f".results.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, run_dir / "results.json")
    save_resolved(cfg, run_dir, name="eval_config.yaml")
    return results | {"table": table, "run_dir": run_dir}
