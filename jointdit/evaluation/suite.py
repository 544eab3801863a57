"""The field's metrics on protocol-shaped clips: per-clip outputs, cached; scores; the table.

A group (joint, cascade, the reference windows) is a list of `EvalClip`s in one order, the
same windows in every group. Each network of `weights.WEIGHTS` (and the signal-processing
detectors, network None) turns a clip into named outputs (`NETWORK_OUTPUTS`), cached per group
and network in an .npz stamped with the protocol hash and the weights' sha256: a cache made
under another protocol or other weights is refused, never mixed in. Metrics (`METRICS`) are
then either per-clip scores (a mean with a bootstrap interval over clips) or set distances
against the reference windows (FVD, KVD, FAD; the bootstrap resamples the generated clips and
recomputes the distance on the cached features, the reference statistics fixed).
`score_folder` gives `make eval DIR=...` the per-clip ones for any folder of clips.

To plug in another network: a `WeightFile` in `weights.WEIGHTS`, a function here turning a clip
into outputs (one entry of `NETWORK_OUTPUTS`), and its metrics in `METRICS`.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from jointdit import media, metrics
from jointdit.checkpoint import content_hash
from jointdit.errors import UserError
from jointdit.evaluation import av_align, text_scores, vggish
from jointdit.evaluation.fd import Gaussian, frechet_distance, kvd
from jointdit.evaluation.weights import WEIGHTS, skip_line


@dataclass
class EvalClip:
    """One scored window in the protocol's shape."""

    key: str
    frames: np.ndarray  # uint8 (T, H, W, 3)
    audio: np.ndarray  # float32 (S,)
    picture: np.ndarray  # uint8 (H, W, 3): the picture generation was conditioned on
    caption: str
    family: str | None = None  # the synthetic set's event family (sync score); None elsewhere


@dataclass(frozen=True)
class Metric:
    name: str  # the table's column
    output: str  # the per-clip output it reads
    network: str | None  # a WEIGHTS key; None: no network (signal processing)
    higher_is_better: bool
    distance: Callable[[np.ndarray, np.ndarray], float] | None = None  # set-level, vs reference
    digits: int = 3


def _fd(gen: np.ndarray, ref: np.ndarray) -> float:
    """Fréchet distance between feature sets; clips with several features (VGGish: one per
    0.96 s) give all of them."""
    return frechet_distance(Gaussian.of(_flat(gen)), Gaussian.of(_flat(ref)))


def _kvd(gen: np.ndarray, ref: np.ndarray) -> float:
    return kvd(_flat(gen), _flat(ref))


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1])


METRICS = (
    Metric("FVD", "i3d", "i3d", False, _fd, digits=1),
    Metric("KVD", "i3d", "i3d", False, _kvd, digits=2),
    Metric("FAD", "vggish", "vggish", False, _fd, digits=3),
    Metric("IB-AV", "ib_av", "imagebind", True),
    Metric("IB-IV", "ib_iv", "imagebind", True),
    Metric("IB-IA", "ib_ia", "imagebind", True),
    Metric("CLIP", "clip", "clip", True),
    Metric("CLAP", "clap", "clap", True),
    Metric("AV-Align", "av_align", None, True),
    Metric("AV-Align (own)", "av_align_own", None, True),
    Metric("sync", "sync", None, True),
)


# ---------------------------------------------------------------------------------------------
# per-clip outputs of each network


def _float_frames(clip: EvalClip) -> torch.Tensor:
    return torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _signal(_: Any, clip: EvalClip, fps: float, sr: int) -> dict[str, Any]:
    pictures = _float_frames(clip)
    return {
        "av_align": av_align.av_align(clip.frames, clip.audio, fps, sr),
        "av_align_own": metrics.av_align(pictures, clip.audio, fps, sr),
        "sync": metrics.sync_score(pictures, clip.audio, fps, sr, clip.family),
    }


def _i3d(model: Any, clip: EvalClip, fps: float, sr: int) -> dict[str, Any]:
    i3d = importlib.import_module("jointdit.evaluation.i3d")
    return {"i3d": i3d.features(model, torch.from_numpy(clip.frames)[None])[0]}


def _vggish(model: Any, clip: EvalClip, fps: float, sr: int) -> dict[str, Any]:
    return {"vggish": vggish.embed(model, clip.audio, sr)}


def _imagebind(model: Any, clip: EvalClip, fps: float, sr: int) -> dict[str, Any]:
    """ASVA-style per-frame scores (frame 0, the conditioning picture itself, excluded):
    IB-AV = frame . audio, IB-IV = frame . picture, averaged over frames; IB-IA = picture .
    audio. Embeddings are unit vectors, so these are cosines."""
    ib = importlib.import_module("jointdit.evaluation.imagebind")
    frames = _array(ib.embed_vision(model, torch.from_numpy(clip.frames[1:])))
    picture = _array(ib.embed_vision(model, torch.from_numpy(clip.picture[None])))[0]
    sound = _array(ib.embed_audio(model, torch.from_numpy(clip.audio), sr))
    return {
        "ib_av": float((frames @ sound).mean()),
        "ib_iv": float((frames @ picture).mean()),
        "ib_ia": float(picture @ sound),
    }


def _clip(scorer: Any, clip: EvalClip, fps: float, sr: int) -> dict[str, Any]:
    return {"clip": text_scores.clip_score(scorer, clip.frames, clip.caption)}


def _clap(scorer: Any, clip: EvalClip, fps: float, sr: int) -> dict[str, Any]:
    return {"clap": text_scores.clap_score(scorer, clip.audio, sr, clip.caption)}


NETWORK_OUTPUTS: dict[str | None, Callable[[Any, EvalClip, float, int], dict[str, Any]]] = {
    None: _signal,
    "i3d": _i3d,
    "vggish": _vggish,
    "imagebind": _imagebind,
    "clip": _clip,
    "clap": _clap,
}


def _array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# networks available, and the cache of outputs


@dataclass
class Network:
    name: str | None
    model: Any
    file: str  # the weights' file or folder name ("" for no network)
    sha256: str


def available_networks(
    folder: Path, say: Callable[[str], None] = print, names: Sequence[str] | None = None
) -> list[Network]:
    """The signal detectors, then every network (of `names`, default all) whose weights are in
    `folder`, loaded (their sha256 memoised in the folder); one skip line (`say`) for each
    network whose weights are not."""
    found = [Network(None, None, "", "")]
    for name, wf in WEIGHTS.items():
        if names is not None and name not in names:
            continue
        path = wf.find(folder)
        if path is None:
            columns = ", ".join(m.name for m in METRICS if m.network == name)
            say(skip_line(columns, wf, folder))
            continue
        found.append(Network(name, wf.load(path), path.name, content_hash(path, folder)))
    return found


def _stamp(protocol_hash: str, net: Network, keys: Sequence[str]) -> dict[str, Any]:
    return {
        "protocol": protocol_hash,
        "network": net.name or "signal",
        "weights": net.file,
        "sha256": net.sha256,
        "clips": list(keys),
    }


def group_outputs(
    clips: Sequence[EvalClip],
    networks: Sequence[Network],
    cache_dir: Path,
    protocol_hash: str,
    fps: float,
    sample_rate: int,
) -> dict[str, np.ndarray]:
    """Every network's outputs for a group, stacked over clips (in the clips' order), read
    from `cache_dir/<network>.npz` when it was made for the same protocol, weights and clips.
    A cache of another protocol or other weights is refused (delete it to recompute)."""
    keys = [c.key for c in clips]
    out: dict[str, np.ndarray] = {}
    cache_dir.mkdir(parents=True, exist_ok=True)
    for net in networks:
        path = cache_dir / f"{net.name or 'signal'}.npz"
        stamp = _stamp(protocol_hash, net, keys)
        if path.is_file():
            with np.load(path) as cached:
                old = json.loads(str(cached["__stamp__"]))
                for field in ("protocol", "sha256"):
                    if old[field] != stamp[field]:
                        raise UserError(
                            f"{path}: computed under {field} {old[field][:16]}, now "
                            f"{stamp[field][:16]} (the protocol or the weights changed); "
                            "delete it to recompute, or set eval.out_dir to keep both"
                        )
                if old["clips"] == keys:
                    out |= {k: cached[k] for k in cached.files if k != "__stamp__"}
                    continue
        rows = [
            NETWORK_OUTPUTS[net.name](net.model, c, fps, sample_rate)
            for c in tqdm(clips, desc=f"{cache_dir.name}: {net.name or 'AV-Align, sync'}")
        ]
        stacked = {k: np.stack([_array(r[k]) for r in rows]) for k in rows[0]}
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, __stamp__=json.dumps(stamp), **stacked)
        os.replace(tmp, path)
        out |= stacked
    return out


# ---------------------------------------------------------------------------------------------
# scores, intervals, the table


def _interval(values: np.ndarray, point: float) -> dict[str, Any]:
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return {"mean": float(point), "ci95": [float(lo), float(hi)]}


def score_groups(
    groups: dict[str, dict[str, np.ndarray]],
    reference: dict[str, np.ndarray],
    contrast: tuple[str, str],
    n_boot: int,
    fd_boot: int,
    seed: int,
) -> dict[str, dict[str, dict[str, Any]]]:
    """{row: {metric: {"mean", "ci95"}}} for each group, the reference's own per-clip scores
    ("ground truth") and the paired contrast "A - B" (the same clips resampled in both).
    Per-clip scores: `n_boot` resamples; distances: `fd_boot` (each recomputes a distance)."""
    first = next(iter(groups.values()))
    n = len(next(iter(first.values())))
    rng = np.random.default_rng(seed)
    clip_idx, set_idx = rng.integers(0, n, (n_boot, n)), rng.integers(0, n, (fd_boot, n))
    a, b = contrast
    rows: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in groups}
    rows["ground truth"] = {}
    rows[f"{a} - {b}"] = {}
    for m in METRICS:
        if m.output not in first:
            continue
        if m.distance is None:
            for name, out in [*groups.items(), ("ground truth", reference)]:
                v = out[m.output]
                rows[name][m.name] = _interval(v[clip_idx].mean(axis=1), v.mean())
            diff = groups[a][m.output] - groups[b][m.output]
            rows[f"{a} - {b}"][m.name] = _interval(diff[clip_idx].mean(axis=1), diff.mean())
            continue
        ref = reference[m.output]
        boot = {}
        for name, out in groups.items():
            feats = out[m.output]
            boot[name] = np.array([m.distance(feats[i], ref) for i in set_idx])
            rows[name][m.name] = _interval(boot[name], m.distance(feats, ref))
        point = m.distance(groups[a][m.output], ref) - m.distance(groups[b][m.output], ref)
        rows[f"{a} - {b}"][m.name] = _interval(boot[a] - boot[b], point)
    return rows


def format_scores(rows: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One Markdown table: a row per group (and the contrast), a column per metric scored."""
    shown = [m for m in METRICS if any(m.name in r for r in rows.values())]
    head = ["", *(f"{m.name} {'↑' if m.higher_is_better else '↓'}" for m in shown)]

    def cell(stats: dict[str, Any] | None, digits: int) -> str:
        if stats is None:
            return "-"
        lo, hi = stats["ci95"]
        return f"{stats['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    body = [[name, *(cell(r.get(m.name), m.digits) for m in shown)] for name, r in rows.items()]
    return "\n".join(metrics.markdown_table(head, body))


# ---------------------------------------------------------------------------------------------
# make eval DIR=...: the per-clip metrics of a folder of clips (no reference set)

PER_CLIP = [n for n in WEIGHTS if all(m.distance is None for m in METRICS if m.network == n)]
# make eval's own table already holds the repo's AV-Align and the sync score
FOLDER_METRICS = [
    m for m in METRICS if m.distance is None and m.output not in ("av_align_own", "sync")
]


def score_folder(
    root: Path, cfg: Any, say: Callable[[str], None] = print
) -> tuple[dict[str, Any], str]:
    """Per group of `root`'s clips (as `metrics.find_clips` lists them), the per-clip metrics
    that need no reference set: AV-Align in its published form, and the ImageBind, CLIP and
    CLAP scores where their weights are placed (a skip line each where not). The picture of
    IB-IV / IB-IA is the clip's reference picture where its meta.json names a readable one,
    else its own first frame; the caption is meta.json's. Returns ({"weights", "n": {group:
    clips}, "groups": {group: {metric: {"mean", "ci95"}}}}, the table)."""
    from jointdit.evaluation.weights import weights_dir

    folder = weights_dir(cfg)
    networks = available_networks(folder, say, names=PER_CLIP)
    say("FVD, KVD, FAD: these compare with a reference set; make eval-avsync15 computes them")
    columns: dict[str, dict[str, list[float]]] = {}
    for group, mp4, meta in tqdm(metrics.find_clips(root), desc="published metrics", unit="clip"):
        fps = float(meta.get("fps") or metrics.stream_fps(mp4))
        sr = int(meta.get("sample_rate", 16000))
        clip = media.read_clip(mp4, fps, None, sr)
        frames = ((clip.frames.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
        picture = metrics.reference_picture(meta, tuple(clip.frames.shape[-2:]))
        first = clip.frames[0] if picture is None else picture
        first = ((first.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        caption = meta.get("caption") or (meta.get("request") or {}).get("prompt") or ""
        one = EvalClip(meta["clip_id"], frames.numpy(), clip.audio.numpy(), first, caption)
        row = columns.setdefault(group, {})
        for net in networks:
            for k, v in NETWORK_OUTPUTS[net.name](net.model, one, fps, sr).items():
                row.setdefault(k, []).append(float(v))
    rng = np.random.default_rng(cfg.eval.seed)
    rows = {}
    for group, cols in columns.items():
        stats = metrics.bootstrap_ci(
            {k: np.array(v) for k, v in cols.items()}, cfg.eval.bootstrap, rng
        )
        rows[group] = {m.name: stats[m.output] for m in FOLDER_METRICS if m.output in stats}
    weights = {n.name: {"file": n.file, "sha256": n.sha256} for n in networks if n.name}
    counts = {group: len(next(iter(cols.values()))) for group, cols in columns.items()}
    return {"weights": weights, "n": counts, "groups": rows}, format_scores(rows)
