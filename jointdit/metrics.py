"""Are sound and picture in sync? AV-Align and the synthetic-set sync score, with chance levels.

Everything here is signal processing (numpy/scipy): no pretrained network is used or fetched.
The field's network-based metrics (FVD, FAD, ImageBind, CLIP and CLAP scores) and AV-Align in
its published form are in `jointdit.evaluation` (`make eval-avsync15`).

- `audio_onsets`: spectral flux measured against each frequency bin's own noise floor,
  peak-picked with thresholds relative to the clip itself (generated audio is noisy; absolute
  levels mean little).
- `video_events`: the synthetic set's event definition (DESIGN section 7), per family:
  flash = a frame brighter than both neighbours, bounce = the ball's lowest point (its vertical
  motion reverses), anything else = peaks of frame-to-frame motion. The first and last frame
  never hold an event (they have no neighbour on one side).
- `av_align`: AV-Align (Yariv et al., 2024): intersection over union of audio onsets and video
  motion peaks matched within one frame. Two deliberate differences from the reference code:
  matches are one-to-one (so the score stays in [0, 1]) and the window is inclusive.
- `sync_score`: F1 of detected sound onsets against detected visual events of the same clip,
  matched one-to-one within one frame period.
- `evaluate_clips` (= `detect_clip` on each clip, then `summarize`): per-clip scores, their
  means, each beside its own chance level (audio of one clip with video of another, over
  several derangements), with paired-bootstrap 95% intervals.
- `object_colour_error`, `picture_fidelity`: does a decoded or generated clip keep the picture?
  The object is what differs from the frame's background colour (PSNR alone is ruled by the
  dark background: an object decoded grey still scores well).
- `paired_contrasts`: differences between groups over the same references and seeds
  ("joint - iso") or against the group's own chance ("v2a - chance"), per family.
- `evaluate_dir`: all of it for a folder of generated clips (`make eval DIR=...`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from omegaconf import DictConfig
from scipy.ndimage import gaussian_filter
from scipy.signal import find_peaks
from tqdm import tqdm

from jointdit.config import repo_path, save_resolved
from jointdit.errors import UserError
from jointdit.figures import write_eval_figures
from jointdit.media import read_clip, read_video

if TYPE_CHECKING:
    import torch

# Peak picking: a peak must stand out from the clip's own baseline (median) by a fraction of the
# clip's largest peak AND by several robust standard deviations (MAD) of the baseline.
REL_HEIGHT = 0.3
MAD_SIGMAS = 5.0
# Audio front end for onsets: 10 ms hop, ~32 ms window.
ONSET_HOP_S = 0.010
ONSET_WIN_S = 0.032
ONSET_FLOOR = 5.0  # a bin's noise floor, in multiples of its median magnitude over the clip
ONSET_MIN_GAP_S = 0.1  # one sound event gives one onset (clicks ring, beeps have ripple)
ONSET_MIN_FLUX = 0.05  # rise (log magnitude) of the strongest bins; below it nothing happened
# Video: the smallest brightness spike (luminance in [0, 1]) and ball bounce (fraction of the
# frame height) that count as events, whatever the relative thresholds say.
FLASH_MIN_CONTRAST = 0.02
BOUNCE_MIN_DEPTH = 0.02
BOUNCE_REL_DEPTH = 0.1  # later bounces are shallow, and 7 fps samples them shallower still
MOTION_MIN = 0.015  # a little above the motion of static frames with noise of std 0.05
# Picture: a pixel belongs to the object where some RGB channel (in [0, 1]) differs from its
# frame's background colour by this much. The synthetic set's floor (0.12 over the background)
# does not; its dimmest object (0.3 of full colour) does.
FOREGROUND_MIN = 0.15
# Pairs of groups `make eval` compares clip by clip ("chance": the group's own shuffled chance).
CONTRASTS = (("joint", "iso"), ("v2a", "chance"))


# ---------------------------------------------------------------------------------------------
# detectors


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float64)


def _pick_peaks(curve: np.ndarray, min_contrast: float, distance: int = 1) -> np.ndarray:
    """Indices of local maxima that stand out from the curve's own baseline (never the ends)."""
    if curve.size < 3:
        return np.zeros(0, dtype=int)
    base = float(np.median(curve))
    spread = 1.4826 * float(np.median(np.abs(curve - base)))
    top = float(curve.max())
    height = base + max(REL_HEIGHT * (top - base), MAD_SIGMAS * spread, min_contrast)
    peaks, _ = find_peaks(curve, height=height, distance=max(1, distance))
    return peaks


def audio_onsets(audio: Any, sample_rate: int) -> np.ndarray:
    """Times (seconds) where a sound starts: peaks of spectral flux over each bin's noise floor,
    picked with thresholds relative to the clip itself."""
    x = _numpy(audio)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise ValueError(f"audio must be mono (N,), got shape {x.shape}")
    hop = max(1, round(ONSET_HOP_S * sample_rate))
    n_fft = 1 << math.ceil(math.log2(ONSET_WIN_S * sample_rate))
    if x.size < n_fft or not np.any(x):
        return np.zeros(0)
    # Reflect padding, not zeros: a clip that starts loud has no onset at t=0.
    padded = np.pad(x, n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    mag = np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=1))
    # Each frequency bin is measured against its own noise floor (a few times its median over the
    # clip, and never below -60 dB of the clip's peak): steady background noise then barely
    # moves, while a sound rises by orders of magnitude in the bins it occupies.
    floor = np.maximum(ONSET_FLOOR * np.median(mag, axis=0), mag.max() * 1e-3)
    rise = np.maximum(np.diff(np.log(mag + floor), axis=0), 0.0)
    # Mean of the strongest tenth of the bins: a tone fills a few bins, and averaging it with
    # every other bin would drown it in the noise's fluctuations.
    k = max(1, rise.shape[1] // 10)
    flux = np.zeros(len(mag))
    flux[1:] = np.sort(rise, axis=1)[:, -k:].mean(axis=1)
    # Windows that reach into the padding compare a sound with its own mirror image: not onsets.
    edge = -(-n_fft // (2 * hop))
    flux[:edge] = 0.0
    flux[len(flux) - edge :] = 0.0
    gap = max(1, round(ONSET_MIN_GAP_S / (hop / sample_rate)))
    peaks = _pick_peaks(flux, ONSET_MIN_FLUX, distance=gap)
    # Frame n is centred on sample n * hop; the flux peaks when the window is half into the sound.
    return peaks * hop / sample_rate


def _luminance(frames: Any) -> np.ndarray:
    """(T, 3, H, W) in [-1, 1] -> (T, H, W) luminance in [0, 1]."""
    x = _numpy(frames)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"frames must be (T, 3, H, W), got shape {x.shape}")
    rgb = (np.clip(x, -1.0, 1.0) + 1.0) / 2.0
    return 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]


def _flash_frames(lum: np.ndarray) -> np.ndarray:
    """Frames brighter than the mean of their two neighbours (a one-frame flash)."""
    t = len(lum)
    if t < 3:
        return np.zeros(0, dtype=int)
    # A light blur (1/32 of the frame) averages pixel noise away but keeps a flashing object.
    smooth = gaussian_filter(lum, sigma=(0, lum.shape[1] / 32, lum.shape[2] / 32))
    spike = np.maximum(smooth[1:-1] - 0.5 * (smooth[:-2] + smooth[2:]), 0.0).reshape(t - 2, -1)
    # Mean of the brightest tenth of the spike map: a small object flashing is not averaged
    # away by the dark background.
    k = max(1, spike.shape[1] // 10)
    strength = np.sort(spike, axis=1)[:, -k:].mean(axis=1)
    curve = np.concatenate([[strength.min()], strength, [strength.min()]])
    return _pick_peaks(curve, FLASH_MIN_CONTRAST)


def _ball_height(lum: np.ndarray) -> np.ndarray:
    """Per frame, the vertical centroid (pixels, downwards) of the bright blob; NaN if none."""
    t, h, _ = lum.shape
    flat = lum.reshape(t, -1)
    base = np.median(flat, axis=1, keepdims=True)
    top = flat.max(axis=1, keepdims=True)
    weight = np.maximum(flat - (base + 0.5 * (top - base)), 0.0).reshape(lum.shape).sum(axis=2)
    total = weight.sum(axis=1)
    rows = np.arange(h, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (weight * rows).sum(axis=1) / total, np.nan)


def _bounce_times(lum: np.ndarray, fps: float) -> np.ndarray:
    """Times where the bright ball is lowest, i.e. its vertical motion turns from down to up."""
    y = _ball_height(lum)
    ok = np.isfinite(y)
    if ok.sum() < 3:
        return np.zeros(0)
    y = np.interp(np.arange(len(y)), np.flatnonzero(ok), y[ok])
    depth = max(BOUNCE_REL_DEPTH * float(y.max() - y.min()), BOUNCE_MIN_DEPTH * lum.shape[1])
    # The whole curve goes in, so frames 0 and T-1 give context but can never be peaks.
    peaks, _ = find_peaks(y, prominence=depth)
    # The contact lies between sampled frames: place it on the V through the three samples
    # around the lowest one (the ball is fastest at the floor, so the V is a good model).
    times = []
    for k in peaks:
        drop = y[k] - min(y[k - 1], y[k + 1])
        shift = 0.5 * (y[k + 1] - y[k - 1]) / drop if drop > 0 else 0.0
        times.append((k + float(np.clip(shift, -0.5, 0.5))) / fps)
    return np.asarray(times)


def _motion(lum: np.ndarray) -> np.ndarray:
    """Motion magnitude of each transition i -> i+1, a stand-in for mean optical-flow magnitude.

    AV-Align uses Farneback flow; without a flow network or OpenCV we take the mean absolute
    luminance change, summed over blur scales up to 1/8 of the frame height so that it keeps
    growing with displacement instead of saturating once an object moves by its own size.
    """
    diff = np.diff(lum, axis=0)
    height = lum.shape[1]
    motion = np.zeros(len(diff))
    for frac in (1 / 64, 1 / 32, 1 / 16, 1 / 8):
        blurred = gaussian_filter(diff, sigma=(0, frac * height, frac * height))
        motion += np.abs(blurred).reshape(len(diff), -1).mean(axis=1)
    return motion


def motion_peaks(frames: Any, fps: float) -> np.ndarray:
    """Times (seconds) of the local maxima of motion magnitude, as AV-Align picks video peaks.

    Every local maximum above a small floor counts (the floor keeps a static scene from having
    any). The motion between frames i and i+1 is timed half-way between them, so a one-frame
    change (seen in both i-1 -> i and i -> i+1) lands within half a frame of frame i either way.
    """
    lum = _luminance(frames)
    if len(lum) < 2:
        return np.zeros(0)
    # Zero padding lets the first and last transitions be peaks.
    peaks, _ = find_peaks(np.pad(_motion(lum), 1), height=MOTION_MIN)
    return (peaks - 0.5) / fps


def video_events(frames: Any, fps: float, family: str | None) -> np.ndarray:
    """Times (seconds) of visible events by the synthetic set's definition for `family`.

    flash: one-frame brightness spikes; bounce: frames where the bright ball is lowest;
    None or another family: motion-magnitude peaks that stand out from the clip's baseline.
    The first and last frame are ignored.
    """
    if family == "flash":
        return _flash_frames(_luminance(frames)) / fps
    if family == "bounce":
        return _bounce_times(_luminance(frames), fps)
    lum = _luminance(frames)
    if len(lum) < 4:
        return np.zeros(0)
    # Transitions 1 -> 2 ... T-3 -> T-2 only: a change into or out of an edge frame is that
    # frame's. Padded index p is the transition p -> p+1, timed half-way.
    inner = _motion(lum)[1:-1]
    curve = np.concatenate([[inner.min()], inner, [inner.min()]])
    return (_pick_peaks(curve, MOTION_MIN) + 0.5) / fps


# ---------------------------------------------------------------------------------------------
# picture fidelity


def _rgb(frames: Any) -> np.ndarray:
    """(T, 3, H, W) in [-1, 1] -> the same in [0, 1]."""
    x = _numpy(frames)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"frames must be (T, 3, H, W), got shape {x.shape}")
    return (np.clip(x, -1.0, 1.0) + 1.0) / 2.0


def _background(rgb: np.ndarray) -> np.ndarray:
    """(T, 3, 1, 1): each frame's background colour, the per-channel median of its pixels."""
    return np.median(rgb.reshape(*rgb.shape[:2], -1), axis=2)[:, :, None, None]


def _distinctness(rgb: np.ndarray) -> np.ndarray:
    """(T, H, W): how far each pixel's colour is from its frame's background (largest channel)."""
    return np.abs(rgb - _background(rgb)).max(axis=1)


def foreground(frames: Any) -> np.ndarray:
    """(T, H, W) bool: pixels whose colour differs from their frame's background colour (the
    per-channel median of the frame) by at least FOREGROUND_MIN in some channel."""
    return _distinctness(_rgb(frames)) >= FOREGROUND_MIN


def object_colour_error(decoded: Any, target: Any) -> float:
    """Mean absolute RGB error (0-255 units) of `decoded` over the object pixels of `target`
    (both (T, 3, H, W) in [-1, 1]): what a codec does to the object's colour. NaN if `target`
    shows no object."""
    mask = foreground(target)
    if not mask.any():
        return float("nan")
    err = np.abs(_rgb(decoded) - _rgb(target)).mean(axis=1)
    return float(255.0 * err[mask].mean())


def object_colours(frames: Any, area: int) -> np.ndarray:
    """(T, 3): per frame, the mean RGB in [0, 1] of the `area` pixels most unlike its background.

    A fixed area (the object's, in the picture it should keep) ignores faint halos and a floor
    that a blurry clip lifts over the threshold; a frame whose object is gone averages pixels
    close to its background, and that is what it shows.
    """
    rgb = _rgb(frames)
    order = np.argsort(-_distinctness(rgb).reshape(len(rgb), -1), axis=1)[:, : max(1, area)]
    flat = rgb.reshape(*rgb.shape[:2], -1)
    return np.stack([flat[k][:, order[k]].mean(axis=1) for k in range(len(rgb))])


def picture_fidelity(frames: Any, first_frame: Any) -> dict[str, float]:
    """How well a generated clip keeps its conditioning picture `first_frame` (3, H, W):

    - frame0_psnr: PSNR (dB, peak 1) of the clip's first frame against it;
    - colour_err: median over frames of the mean absolute difference (0-255 units) between the
      frame's object colour and the picture's (`object_colours` over the picture's object
      area; NaN if the picture shows no object). The median ignores the 1-2 event frames of a
      clip (a flash is meant to change the colour), so the ground truth itself scores ~0, and an
      object turned grey or gone scores high.
    """
    rgb, ref = _rgb(frames), _rgb(np.asarray(_numpy(first_frame))[None])
    if rgb.shape[1:] != ref.shape[1:]:
        raise ValueError(f"frames {rgb.shape[1:]} and first frame {ref.shape[1:]} differ in size")
    mse = float(np.mean((rgb[0] - ref[0]) ** 2))
    area = int(foreground(ref * 2 - 1).sum())
    if area:
        colours = object_colours(rgb * 2 - 1, area)
        diff = np.abs(colours - object_colours(ref * 2 - 1, area)).mean(axis=1)
        colour_err = float(255.0 * np.median(diff))
    else:
        colour_err = float("nan")
    return {"frame0_psnr": 10 * math.log10(1 / max(mse, 1e-10)), "colour_err": colour_err}


# ---------------------------------------------------------------------------------------------
# scores


def match_events(a: Sequence[float], b: Sequence[float], tol: float) -> int:
    """Largest number of one-to-one pairs (x in a, y in b) with |x - y| <= tol.

    On a line, the greedy sweep over both sorted lists is optimal.
    """
    a, b = sorted(a), sorted(b)
    i = j = matched = 0
    tol = tol + 1e-9  # events exactly one frame apart count as within one frame
    while i < len(a) and j < len(b):
        if abs(a[i] - b[j]) <= tol:
            matched, i, j = matched + 1, i + 1, j + 1
        elif a[i] < b[j]:
            i += 1
        else:
            j += 1
    return matched


def event_iou(audio_times: Sequence[float], video_times: Sequence[float], fps: float) -> float:
    """AV-Align's score on detected peaks: matched / (audio + video - matched); 0 if none."""
    m = match_events(audio_times, video_times, 1.0 / fps)
    union = len(audio_times) + len(video_times) - m
    return m / union if union else 0.0


def event_f1(audio_times: Sequence[float], video_times: Sequence[float], tol: float) -> float:
    """F1 of one-to-one matches within `tol` seconds; 0 when neither side has an event."""
    total = len(audio_times) + len(video_times)
    return 2.0 * match_events(audio_times, video_times, tol) / total if total else 0.0


def _interior(times: np.ndarray, n_frames: int, fps: float) -> np.ndarray:
    """Onsets that fall within the frames 1..T-2 (half a frame of slack either side)."""
    return times[(times >= 0.5 / fps) & (times <= (n_frames - 1.5) / fps)]


def av_align(frames: Any, audio: Any, fps: float, sample_rate: int) -> float:
    """AV-Align: IoU of audio onsets and video motion peaks matched within +-1 frame."""
    return event_iou(audio_onsets(audio, sample_rate), motion_peaks(frames, fps), fps)


def sync_score(frames: Any, audio: Any, fps: float, sample_rate: int, family: str | None) -> float:
    """F1 of detected sound onsets vs detected visual events, matched within one frame period.

    Sound onsets in the first or last frame are ignored, like visual events there. A clip with
    no event in either modality scores 0: it shows no evidence of synchrony.
    """
    n_frames = len(_numpy(frames))
    onsets = _interior(audio_onsets(audio, sample_rate), n_frames, fps)
    return event_f1(onsets, video_events(frames, fps, family), 1.0 / fps)


# ---------------------------------------------------------------------------------------------
# clip sets: chance level and bootstrap


def derangements(n: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` random permutations of range(n) with no fixed point (n >= 2)."""
    out = []
    while len(out) < count:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            out.append(p)
    return out


def bootstrap_ci(
    columns: dict[str, np.ndarray], n_boot: int, rng: np.random.Generator
) -> dict[str, dict[str, Any]]:
    """Mean and 95% percentile interval of each column, resampling the SAME clip indices for all
    columns (a paired bootstrap: a score and its chance level move together). NaN marks a
    clip a column has no value for; means are over the others."""
    n = len(next(iter(columns.values())))
    idx = rng.integers(0, n, size=(n_boot, n))
    out = {}
    for name, values in columns.items():
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample of NaNs only
            means = np.nanmean(values[idx], axis=1)
            lo, hi = np.nanpercentile(means, [2.5, 97.5])
        out[name] = {"mean": float(np.nanmean(values)), "ci95": [float(lo), float(hi)]}
    return out


def detect_clip(clip: dict[str, Any]) -> dict[str, Any]:
    """One clip's detections: what the scores are computed from (the frames are not kept).

    `clip`: {"clip_id", "frames" (T,3,H,W) in [-1,1], "audio" (N,), "fps", "sample_rate",
    "family"} and optionally "events" (ground-truth seconds; adds detector-vs-truth F1s).
    """
    fps, n_frames = float(clip["fps"]), len(clip["frames"])
    onsets = audio_onsets(clip["audio"], int(clip["sample_rate"]))
    row = {
        "clip_id": str(clip["clip_id"]),
        "family": clip.get("family"),
        "fps": fps,
        "n_frames": n_frames,
        "audio_onsets": onsets.tolist(),
        "video_events": video_events(clip["frames"], fps, clip.get("family")).tolist(),
        "motion_peaks": motion_peaks(clip["frames"], fps).tolist(),
    }
    if clip.get("events") is not None:
        # Agreement with the reference's ground truth: meaningful where the clip should follow
        # it (v2a keeps the true video, a2v the true audio, or the ground truth itself).
        truth = [float(t) for t in clip["events"]]
        row["truth_events"] = truth
        row["video_vs_truth"] = event_f1(row["video_events"], truth, 1.0 / fps)
        row["audio_vs_truth"] = event_f1(_interior(onsets, n_frames, fps), truth, 1.0 / fps)
    return row


def _sync_pair(video: dict[str, Any], audio: dict[str, Any]) -> float:
    onsets = _interior(np.asarray(audio["audio_onsets"]), video["n_frames"], video["fps"])
    return event_f1(onsets, video["video_events"], 1.0 / video["fps"])


def _align_pair(video: dict[str, Any], audio: dict[str, Any]) -> float:
    return event_iou(audio["audio_onsets"], video["motion_peaks"], video["fps"])


def summarize(
    rows: list[dict[str, Any]], n_boot: int = 1000, n_shuffles: int = 8, seed: int = 0
) -> dict[str, Any]:
    """Scores of detected clips (`detect_clip`), their means and chance levels, with 95% CIs.

    The chance level of clip i pairs its video with the audio of another clip, averaged over
    `n_shuffles` derangements. Intervals: paired bootstrap over clips, `n_boot` resamples.
    """
    if not rows:
        raise ValueError("summarize needs at least one clip")
    rng = np.random.default_rng(seed)
    per_clip = [dict(r) for r in rows]  # the same detections may be summarized in several sets
    n = len(per_clip)
    perms = derangements(n, n_shuffles, rng) if n >= 2 else []
    columns: dict[str, np.ndarray] = {}
    for name, score in (("sync", _sync_pair), ("av_align", _align_pair)):
        own = np.array([score(r, r) for r in per_clip])
        columns[name] = own
        if perms:
            chance = np.array(
                [np.mean([score(r, per_clip[p[i]]) for p in perms]) for i, r in enumerate(per_clip)]
            )
            columns[f"{name}_chance"] = chance
            columns[f"{name}_gap"] = own - chance
        for i, r in enumerate(per_clip):
            r[name] = float(own[i])
            if perms:
                r[f"{name}_chance"] = float(columns[f"{name}_chance"][i])
    for extra in ("video_vs_truth", "audio_vs_truth"):
        if all(extra in r for r in per_clip):
            columns[extra] = np.array([r[extra] for r in per_clip])
    # the picture is scored on the clips whose reference could be read (NaN: the others)
    for extra in ("frame0_psnr", "colour_err"):
        if any(extra in r for r in per_clip):
            columns[extra] = np.array([r.get(extra, np.nan) for r in per_clip])
    return {
        "n": n,
        **bootstrap_ci(columns, n_boot, rng),
        "settings": {"bootstrap": n_boot, "shuffles": len(perms), "seed": seed},
        "clips": per_clip,
    }


def evaluate_clips(
    clips: list[dict[str, Any]], n_boot: int = 1000, n_shuffles: int = 8, seed: int = 0
) -> dict[str, Any]:
    """Sync score and AV-Align of each clip, their means, and each one's shuffled-pair chance.

    Each clip as `detect_clip` takes it; the result as `summarize` gives it.
    """
    return summarize([detect_clip(c) for c in clips], n_boot, n_shuffles, seed)


def _by_family(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows per family, plus "all" when there are several (or the family is unknown)."""
    families = sorted({str(r.get("family")) for r in rows})
    out = {f: [r for r in rows if str(r.get("family")) == f] for f in families if f != "None"}
    if len(out) != 1:
        out["all"] = rows
    return out


def _pair_key(row: dict[str, Any]) -> tuple[str, Any]:
    return row["clip_id"], row.get("seed")


def paired_contrasts(
    groups: dict[str, list[dict[str, Any]]], n_boot: int = 1000, n_shuffles: int = 8, seed: int = 0
) -> dict[str, dict[str, dict[str, Any]]]:
    """`"A - B"` -> family -> {"n", "sync": {"mean", "ci95"}} for each (A, B) in CONTRASTS whose
    groups are present (detected clips as `detect_clip` gives them, by group).

    A - B pairs each clip of A with the clip of B made from the same reference and seed
    (clip_id, seed) and bootstraps the per-pair difference of the sync score: what A's setting
    buys, with the noise and reference held fixed. A - chance bootstraps each clip's score minus
    its shuffled chance (derangements within the family).
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for a, b in CONTRASTS:
        if a not in groups or (b != "chance" and b not in groups):
            continue
        per_family = {}
        for family, rows in _by_family(groups[a]).items():
            if b == "chance":
                if len(rows) >= 2:
                    gap = summarize(rows, n_boot, n_shuffles, seed)["sync_gap"]
                    per_family[family] = {"n": len(rows), "sync": gap}
                continue
            partner = {_pair_key(r): r for r in groups[b]}
            pairs = [(r, partner[_pair_key(r)]) for r in rows if _pair_key(r) in partner]
            if pairs:
                diff = np.array([_sync_pair(x, x) - _sync_pair(y, y) for x, y in pairs])
                stats = bootstrap_ci({"sync": diff}, n_boot, np.random.default_rng(seed))
                per_family[family] = {"n": len(pairs), "sync": stats["sync"]}
        if per_family:
            out[f"{a} - {b}"] = per_family
    return out


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a Markdown table, columns padded to their widest cell."""
    widths = [max(len(line[i]) for line in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return [line(head), rule, *(line(r) for r in rows)]


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table, one row per group (e.g. joint, iso, v2a): each score beside its chance,
    and the picture kept; then, where a group carries paired contrasts (`evaluate_dir` puts
    them on the group they start from), a table of those."""

    def cell(stats: dict[str, Any] | None, digits: int = 3) -> str:
        if stats is None:
            return "n/a"
        lo, hi = stats["ci95"]
        return f"{stats['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    head = [
        "group",
        "N",
        "sync [95% CI]",
        "sync chance",
        "sync - chance",
        "AV-Align [95% CI]",
        "AV-Align chance",
        "frame-0 PSNR dB",
        "colour err",
    ]
    keys = ("sync", "sync_chance", "sync_gap", "av_align", "av_align_chance")
    rows = [
        [
            group,
            str(r["n"]),
            *(cell(r.get(k)) for k in keys),
            cell(r.get("frame0_psnr"), 1),
            cell(r.get("colour_err"), 1),
        ]
        for group, r in results.items()
    ]
    lines = markdown_table(head, rows)
    contrast_rows = []
    for group, r in results.items():
        for name, per_family in r.get("contrasts", {}).items():
            # rows of several folders are prefixed by folder (evaluate_dirs): keep the prefix
            label = group[: len(group) - len(name.split(" - ")[0])] + name
            for family, c in per_family.items():
                contrast_rows.append([label, family, str(c["n"]), cell(c["sync"])])
    if contrast_rows:
        head = ["paired contrast", "family", "N", "sync difference [95% CI]"]
        lines += ["", *markdown_table(head, contrast_rows)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# folders of generated clips (make eval)


def stream_fps(path: Path) -> float:
    """The video stream's average frame rate (used when no meta.json gives the fps)."""
    try:
        with av.open(str(path)) as container:
            streams = container.streams.video
            rate = streams[0].average_rate if streams else None
    except av.FFmpegError as e:
        raise UserError(f"{path}: not a readable video ({e})") from None
    if not rate:
        raise UserError(f"{path}: no video frame rate in the file; add 'fps' to its meta.json")
    return float(rate)


def find_clips(root: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(group, mp4, meta) for every clip under `root`, sorted by path.

    `<root>/<group>/<clip_id>/out.mp4` with `meta.json` beside it (what `make infer` writes), or
    `<folder>/<clip_id>.mp4` with an optional `<clip_id>.json` beside it (group = folder).
    """
    found = []
    # write_mp4's temporary files start with a dot; a clip being written is not a clip yet
    for mp4 in sorted(p for p in root.rglob("*.mp4") if not p.name.startswith(".")):
        if mp4.name == "out.mp4":
            meta_path, group_dir, clip_id = (
                mp4.parent / "meta.json",
                mp4.parent.parent,
                mp4.parent.name,
            )
        else:
            meta_path, group_dir, clip_id = mp4.with_suffix(".json"), mp4.parent, mp4.stem
        meta: dict[str, Any] = {}
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{meta_path}: not valid JSON ({e.msg})") from None
        inside = group_dir == root or root in group_dir.parents
        group = (
            group_dir.relative_to(root).as_posix()
            if inside and group_dir != root
            else group_dir.name
        )
        meta.setdefault("clip_id", clip_id)
        found.append((group, mp4, meta))
    return found


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _joint_seed(meta: dict[str, Any]) -> int | None:
    """The seed of a clip whose audio and video were both generated (make infer's meta.json)."""
    request = meta.get("request") or {}
    return request.get("seed") if request.get("mode", "joint") == "joint" else None


def reference_picture(meta: dict[str, Any], size: tuple[int, int]) -> torch.Tensor | None:
    """The picture a generated clip was conditioned on, (3, H, W) in [-1, 1] at `size`: the first
    frame of its reference (meta.json "request.ref", a cache meta JSON naming the source clip and
    window). None when the meta names no reference or its source is not on this machine."""
    ref = (meta.get("request") or {}).get("ref")
    if not ref or not repo_path(ref).is_file():
        return None
    try:
        ref_meta = json.loads(repo_path(ref).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{ref}: not valid JSON ({e.msg})") from None
    source, fps = ref_meta.get("source"), ref_meta.get("fps") or meta.get("fps")
    if not source or not fps or not repo_path(source).is_file():
        return None
    start = float(ref_meta.get("start", 0.0))
    return read_video(repo_path(source), float(fps), size, start=start, duration=1 / float(fps))[0]


def evaluate_dir(path: str | os.PathLike, cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Evaluate every group of clips under `path`; write `<path>/metrics.json`; return by group.

    A group whose clips come from several families (meta.json "family") also gets one entry
    per family, named "<group> [<family>]". Clips whose reference can be read also get the
    picture's fidelity (`picture_fidelity`). Paired contrasts (`paired_contrasts`) go into
    metrics.json under "contrasts" and onto the group they start from (for `format_table`).
    """
    root = Path(path)
    if not root.is_dir():
        raise UserError(
            f"DIR={path}: no such folder (make infer writes <DIR>/<group>/<clip>/out.mp4)"
        )
    clips = find_clips(root)
    if not clips:
        raise UserError(
            f"DIR={path}: no .mp4 clips in it; expected <DIR>/<group>/<clip_id>/out.mp4 "
            "(what make infer writes) or a folder of .mp4 files"
        )
    groups: dict[str, list[dict[str, Any]]] = {}
    seeds: dict[str, set[int | None]] = {}
    for group, mp4, meta in tqdm(clips, desc=f"reading {root}", unit="clip"):
        fps = float(meta.get("fps") or stream_fps(mp4))
        clip = read_clip(mp4, fps, size=None, sample_rate=int(meta.get("sample_rate", 16000)))
        row = detect_clip(
            {
                "clip_id": meta["clip_id"],
                "frames": clip.frames,
                "audio": clip.audio,
                "fps": clip.fps,
                "sample_rate": clip.sample_rate,
                "family": meta.get("family"),
                "events": meta.get("events"),
            }
        )
        picture = reference_picture(meta, tuple(clip.frames.shape[-2:]))
        if picture is not None:
            row |= picture_fidelity(clip.frames, picture)
        request = meta.get("request") or {}
        groups.setdefault(group, []).append({**row, "seed": request.get("seed"), "path": str(mp4)})
        seeds.setdefault(group, set()).add(_joint_seed(meta))
    results = {}
    for group, rows in groups.items():
        if len(rows) > 1 and len(seeds[group]) == 1 and None not in seeds[group]:
            print(
                f"warning: {group}: every clip was generated with seed {next(iter(seeds[group]))};"
                " what the noise decides (event times) is then the same in every clip, and the"
                " shuffled chance equals the score (use a seed per clip)"
            )
        # A group mixing families also gets one row per family (chance drawn within it):
        # flash-and-beep and bounce are different tasks and are reported apart.
        families = sorted({str(r["family"]) for r in rows})
        subsets = {group: rows}
        if len(families) > 1:
            subsets |= {
                f"{group} [{fam}]": [r for r in rows if str(r["family"]) == fam] for fam in families
            }
        for name, subset in subsets.items():
            results[name] = summarize(
                subset, n_boot=cfg.eval.bootstrap, n_shuffles=cfg.eval.shuffles, seed=cfg.eval.seed
            )
    e = cfg.eval
    contrasts = paired_contrasts(groups, n_boot=e.bootstrap, n_shuffles=e.shuffles, seed=e.seed)
    saved = {"dir": str(root), "groups": results, "contrasts": contrasts}
    _write_json(root / "metrics.json", saved)
    write_eval_figures(root, saved)
    for name, per_family in contrasts.items():  # after saving: metrics.json holds them once
        results[name.split(" - ")[0]].setdefault("contrasts", {})[name] = per_family
    save_resolved(cfg, root, name="eval_config.yaml")
    return results


def evaluate_dirs(dirs: Sequence[str], cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """`evaluate_dir` for each folder; rows are named by group (prefixed by folder if several)."""
    if not dirs:
        raise UserError("DIR is not set: make eval DIR=<folder of generated clips> (or --dir)")
    rows = {}
    for d in dirs:
        for group, result in evaluate_dir(d, cfg).items():
            rows[group if len(dirs) == 1 else f"{Path(d).name}/{group}"] = result
    return rows
