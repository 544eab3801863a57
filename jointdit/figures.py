"""Pictures of an evaluation, so sync can be seen at a glance.

- `sync_plot`: per event family, each group's sync score beside its shuffled-pair chance,
  with their 95 % intervals.
- `event_strip`: clips as frame strips over their spectrograms, with the visual events and the
  sound onsets that `make eval` detected marked on one time axis.

Both read what `evaluate_dir` saved (`metrics.json`), so they show exactly what was scored.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.signal import stft  # noqa: E402

from jointdit.media import read_clip  # noqa: E402

VIDEO_COLOUR = "#ff8c00"  # visual events
AUDIO_COLOUR = "#00bcd4"  # sound onsets


GROUP_ORDER = ("joint", "iso", "v2a", "a2v")  # the demo's groups first, in this order; others after


def _ordered(groups: list[str]) -> list[str]:
    return sorted(groups, key=lambda g: (GROUP_ORDER.index(g) if g in GROUP_ORDER else 99, g))


def _split(name: str) -> tuple[str, str]:
    """'joint [flash]' -> ('joint', 'flash'); 'joint' -> ('joint', 'all')."""
    group, _, family = name.partition(" [")
    return group, family.rstrip("]") or "all"


def sync_plot(metrics: dict[str, Any], path: str | os.PathLike) -> Path:
    """One panel per event family ("all" first): each group's sync score (filled) and its
    shuffled chance (hollow), means with 95 % bootstrap intervals."""
    panels: dict[str, dict[str, dict[str, Any]]] = {}
    for name, stats in metrics["groups"].items():
        if "sync" in stats:
            group, family = _split(name)
            panels.setdefault(family, {})[group] = stats
    if not panels:
        raise ValueError("sync_plot: no group has a sync score")
    families = sorted(panels, key=lambda f: (f != "all", f))
    fig, axes = plt.subplots(1, len(families), figsize=(2.6 * len(families) + 0.6, 2.8))
    axes = np.atleast_1d(axes)
    for ax, family in zip(axes, families):
        groups = _ordered(list(panels[family]))
        x = np.arange(len(groups))
        for offset, key, style in (
            (-0.12, "sync", dict(color="black", fmt="o", label="sync")),
            (0.12, "sync_chance", dict(color="grey", fmt="o", mfc="white", label="chance")),
        ):
            have = [
                i for i, g in enumerate(groups) if key in panels[family][g]
            ]  # 1 clip: no chance
            mean = np.array([panels[family][groups[i]][key]["mean"] for i in have])
            ci = np.array([panels[family][groups[i]][key]["ci95"] for i in have]).reshape(-1, 2).T
            ax.errorbar(x[have] + offset, mean, yerr=np.abs(ci - mean), capsize=3, **style)
        ax.set_xticks(x, groups)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{family} (N={panels[family][groups[0]]['n']})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("sync score (F1 within one frame)")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _spectrogram(audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, float]:
    """Log-magnitude spectrogram (bins, frames) in dB and its top frequency in Hz."""
    _, _, z = stft(audio, fs=sample_rate, nperseg=512, noverlap=512 - 128)
    db = 20 * np.log10(np.abs(z) + 1e-6)
    return np.clip(db, db.max() - 80, None), sample_rate / 2


def _first_clip_per_family(clips: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    chosen: dict[str, dict[str, Any]] = {}
    for clip in sorted(clips, key=lambda c: c["clip_id"]):
        chosen.setdefault(str(clip.get("family")), clip)
    return chosen


def strip_rows(
    metrics: dict[str, Any], groups: list[str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """(group, clip) rows to draw: for each event family, its first clip (by id) in every group,
    so the rows of one reference sit together (the same picture and seed in joint and iso)."""
    names = _ordered([g for g in metrics["groups"] if " [" not in g])
    names = [g for g in names if groups is None or g in groups]
    per_group = {g: _first_clip_per_family(metrics["groups"][g].get("clips", [])) for g in names}
    families = sorted({f for chosen in per_group.values() for f in chosen})
    return [(g, per_group[g][f]) for f in families for g in names if f in per_group[g]]


def event_strip(
    rows: list[tuple[str, dict[str, Any]]], path: str | os.PathLike, sample_rate: int = 16000
) -> Path:
    """Each row: the clip's frames side by side over its spectrogram on one time axis, the
    detected visual events (orange, over the frames) and sound onsets (cyan, over the
    spectrogram) drawn as lines through both."""
    if not rows:
        raise ValueError("event_strip: no clips to draw")
    fig, cells = plt.subplots(  # per row: frames, spectrogram, a gap for the next row's title
        3 * len(rows),
        1,
        figsize=(9, 2.0 * len(rows)),
        gridspec_kw={"height_ratios": [1, 0.7, 0.3] * len(rows), "hspace": 0.05},
        squeeze=False,
    )
    for gap in cells[2::3, 0]:
        gap.axis("off")
    axes = np.delete(cells, np.s_[2::3], axis=0)
    for i, (group, clip) in enumerate(rows):
        fps = float(clip["fps"])
        c = read_clip(clip["path"], fps, size=None, sample_rate=sample_rate)
        frames = ((c.frames.permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        duration = len(frames) / fps
        top, bottom = axes[2 * i, 0], axes[2 * i + 1, 0]
        top.imshow(np.concatenate(list(frames), axis=1), extent=(0, duration, 0, 1), aspect="auto")
        spec, fmax = _spectrogram(c.audio.numpy(), sample_rate)
        bottom.imshow(spec, origin="lower", extent=(0, duration, 0, fmax / 1000), aspect="auto")
        for ax in (top, bottom):
            for t in clip["video_events"]:
                ax.axvline(t, color=VIDEO_COLOUR, lw=1.6)
            for t in clip["audio_onsets"]:
                ax.axvline(t, color=AUDIO_COLOUR, lw=1.2, ls="--")
            ax.set_xlim(0, duration)
            ax.set_yticks([])
        top.set_xticks([])
        bottom.set_ylabel("kHz", fontsize=7)
        sync = clip.get("sync")
        score = f"   sync {sync:.2f}" if sync is not None else ""
        top.set_title(f"{group}: {clip['clip_id']}{score}", fontsize=9, loc="left")
        if i < len(rows) - 1:
            bottom.set_xticks([])
    axes[-1, 0].set_xlabel(
        "seconds   (orange: visual events detected in the frames; "
        "cyan dashed: sound onsets detected in the audio)",
        fontsize=8,
    )
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    # a 256-colour palette: a third of the bytes, no visible change for plots and strips
    picture = Image.open(buffer).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
    tmp = path.with_name(f".{path.name}.tmp")
    picture.save(tmp, format="png", optimize=True)
    os.replace(tmp, path)  # a crash never leaves half a picture under the final name
    return path


def write_eval_figures(root: str | os.PathLike, metrics: dict[str, Any]) -> list[Path]:
    """`<root>/sync.png` and `<root>/events.png` for what `evaluate_dir` saved in `root`."""
    root = Path(root)
    return [
        sync_plot(metrics, root / "sync.png"),
        event_strip(strip_rows(metrics), root / "events.png"),
    ]
