"""The synthetic sounding-video set: objects whose visible events make sounds at the same instants.

Written in the AVSync15 layout (so `avsync15.load_split` reads it) plus one sidecar per clip,
`<root>/events/<class>/<clip>.json`, holding the ground truth:
{"family", "events" (seconds), "event_frames", "fps", "duration", "size", "sample_rate",
"class", "caption"}.

Two event families (DESIGN section 7), the one a clip belongs to is fixed by its class:
- flash: a static dim shape on a dark background is drawn at full brightness for exactly one
  frame at each event; a short tone burst (class pitch/timbre) starts at that frame's instant.
  With `data.synth.flash_area: frame` the whole frame lights up in the object's colour too
  (a flash-and-beep stimulus large enough to weigh in the video loss).
- bounce: a ball under gravity; each floor contact happens at a frame instant, where the ball is
  at its lowest, and makes a percussive sound (fast attack, exponential decay).
Events are 1-2 per clip at random frames, never the first or the last one; frame 0 shows nothing
of their timing. Background audio is faint noise so that onsets are unambiguous.

Every clip draws from its own generator seeded by (seed, split, index), so a clip does not depend
on the order of generation or on how many clips the set has.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from jointdit.config import frame_hw
from jointdit.data.avsync15 import SPLIT_FILES, ClipRecord, read_sidecar, sidecar_path
from jointdit.errors import UserError
from jointdit.media import frame_count, write_mp4

SPLITS = ("train", "test")


@dataclass(frozen=True)
class SynthClass:
    """One class: what is seen (family, shape, colour) and what is heard (sound)."""

    name: str
    family: str  # flash | bounce
    shape: str  # disc | square | triangle
    colour: tuple[float, float, float]  # RGB in [0, 1] at full brightness
    sound: str  # key of _SOUNDS
    caption: str


CLASSES: tuple[SynthClass, ...] = (
    SynthClass("red_lamp_beep", "flash", "disc", (1.0, 0.15, 0.1), "beep",
               "a red lamp flashing with a beep"),
    SynthClass("green_box_chime", "flash", "square", (0.2, 1.0, 0.3), "chime",
               "a green box flashing with a chime"),
    SynthClass("yellow_sign_buzz", "flash", "triangle", (1.0, 0.9, 0.1), "buzz",
               "a yellow sign flashing with a buzz"),
    SynthClass("blue_ball_click", "bounce", "disc", (0.3, 0.55, 1.0), "click",
               "a blue ball bouncing with a click"),
    SynthClass("white_ball_knock", "bounce", "disc", (1.0, 1.0, 1.0), "knock",
               "a white ball bouncing with a knock"),
    SynthClass("pink_ball_tick", "bounce", "disc", (1.0, 0.4, 0.8), "tick",
               "a pink ball bouncing with a tick"),
)  # fmt: skip

# Flash: the object's brightness outside / at an event; the background stays near black.
DIM, FULL = 0.3, 1.0
BACKGROUND = 0.06
FRAME_FLASH = 0.5  # flash_area "frame": the background's level (in the object's colour) at an event
# Bounce: heights are fractions of the free space above the floor.
FLOOR_FRACTION = 0.1  # bottom part of the frame drawn as floor
MIN_CLEARANCE = 0.1  # the ball is this far above the floor in every frame without a contact
MIN_HOP = 0.35  # each contact's hop is at least this fraction of the clip's highest point
TONE_SECONDS = 0.08  # flash tone length


def class_table(names: list[str] | tuple[str, ...] = ()) -> tuple[SynthClass, ...]:
    """The classes named (all when empty), in table order."""
    known = {c.name: c for c in CLASSES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(
            f"data.synth.classes: unknown class {unknown[0]!r}; accepted: {', '.join(known)}"
        )
    return tuple(c for c in CLASSES if not names or c.name in names)


# ---------------------------------------------------------------------------------------------
# sound


def _envelope(n: int, sr: int, attack: float, decay: float | None, hold: float = 0.0) -> np.ndarray:
    """Linear attack, then either an exponential decay (time constant) or a hold + 10 ms fade."""
    t = np.arange(n) / sr
    env = np.minimum(t / attack, 1.0)
    if decay is not None:
        env *= np.exp(-np.maximum(t - attack, 0.0) / decay)
    else:
        env *= np.clip((hold - t) / 0.01, 0.0, 1.0)
    return env


def _sound(kind: str, sr: int, rng: np.random.Generator, strength: float) -> np.ndarray:
    """One event's sound, starting (after a ~1-3 ms attack) at sample 0."""
    t = np.arange(int(0.25 * sr)) / sr
    if kind == "beep":  # pure tone burst
        wave = np.sin(2 * np.pi * 880 * t) * _envelope(len(t), sr, 0.003, None, TONE_SECONDS)
    elif kind == "chime":  # bright partials, ringing down
        partials = sum(
            a * np.sin(2 * np.pi * f * t) for f, a in ((1320, 1), (2640, 0.5), (3960, 0.3))
        )
        wave = partials / 1.8 * _envelope(len(t), sr, 0.002, 0.05)
        wave *= _envelope(len(t), sr, 1e-9, None, TONE_SECONDS)
    elif kind == "buzz":  # odd harmonics of a low note (square-like)
        square = sum(np.sin(2 * np.pi * 330 * k * t) / k for k in (1, 3, 5, 7, 9))
        wave = square * _envelope(len(t), sr, 0.003, None, TONE_SECONDS)
    elif kind == "click":  # differentiated noise burst: a sharp, high click
        noise = np.diff(rng.standard_normal(len(t) + 1)) / 2
        wave = noise * _envelope(len(t), sr, 0.001, 0.015)
    elif kind == "knock":  # low damped tone: a dull thud
        wave = np.sin(2 * np.pi * 180 * t) + 0.4 * np.sin(2 * np.pi * 470 * t)
        wave = wave / 1.4 * _envelope(len(t), sr, 0.001, 0.04)
    elif kind == "tick":  # short high damped tone
        wave = np.sin(2 * np.pi * 3000 * t) * _envelope(len(t), sr, 0.001, 0.012)
    else:
        raise ValueError(kind)
    return 0.6 * strength * wave / max(1e-9, float(np.abs(wave).max()))


def _soundtrack(
    cls: SynthClass,
    events: list[float],
    strengths: list[float],
    n: int,
    sr: int,
    noise_db: float,
    rng: np.random.Generator,
) -> np.ndarray:
    audio = rng.standard_normal(n) * 10 ** (noise_db / 20)
    for when, strength in zip(events, strengths):
        start = round(when * sr)
        burst = _sound(cls.sound, sr, rng, strength)[: n - start]
        audio[start : start + len(burst)] += burst
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# pictures


def _mask(shape: str, hw: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    """Anti-aliased coverage (H, W) in [0, 1] of a shape of 'radius' r centred at (cy, cx)."""
    y, x = np.mgrid[0 : hw[0], 0 : hw[1]].astype(np.float64) + 0.5
    dy, dx = y - cy, x - cx
    if shape == "disc":
        inside = r - np.hypot(dy, dx)
    elif shape == "square":
        inside = r * 0.85 - np.maximum(np.abs(dx), np.abs(dy))
    elif shape == "triangle":  # pointing up; inside = distance to the nearest of three edges
        s, r_in = math.sqrt(3) / 2, 0.6 * r
        inside = np.minimum.reduce([r_in - dy, r_in + 0.5 * dy + s * dx, r_in + 0.5 * dy - s * dx])
    else:
        raise ValueError(shape)
    return np.clip(inside + 0.5, 0.0, 1.0)


def _event_frames(rng: np.random.Generator, n_frames: int, count: int, min_gap: int) -> list[int]:
    """`count` distinct frames in [1, n_frames - 2], at least `min_gap` apart."""
    while True:
        picks = sorted(rng.choice(np.arange(1, n_frames - 1), size=count, replace=False).tolist())
        if all(b - a >= min_gap for a, b in zip(picks, picks[1:])):
            return picks


def _flash_frames(
    cls: SynthClass,
    rng: np.random.Generator,
    hw: tuple[int, int],
    event_frames: list[int],
    n_frames: int,
    area: str = "object",
) -> np.ndarray:
    """(T, H, W, 3) float in [0, 1]: a dim static shape, at full brightness on event frames
    (with area "frame", the background lights up in the object's colour as well)."""
    h, w = hw
    r = min(h, w) * rng.uniform(0.16, 0.24)
    cy, cx = rng.uniform([r + 2, r + 2], [h - r - 2, w - r - 2])
    coverage = _mask(cls.shape, hw, cy, cx, r)[..., None]
    background = BACKGROUND * rng.uniform(0.8, 1.2, size=3)
    colour = np.asarray(cls.colour)
    frames = np.empty((n_frames, h, w, 3))
    lit = colour * FRAME_FLASH if area == "frame" else background
    for k in range(n_frames):
        event = k in event_frames
        back = lit if event else background
        frames[k] = back * (1 - coverage) + colour * (FULL if event else DIM) * coverage
    return frames


def _bounce_heights(
    rng: np.random.Generator, contacts: list[float], duration: float
) -> tuple[Callable[[float], float], list[float]]:
    """A gravity trajectory h(t) in [0, 1] touching the floor (h = 0) exactly at `contacts`.

    Every flight between floor contacts is a parabola h = g/2 (t - t0)(t0 + w - t) with one g
    per clip; the flight before the first contact started before t = 0 and the one after the
    last contact ends after the clip. Returns h and the impact speed (relative) of each contact.
    """
    gaps = [b - a for a, b in zip(contacts, contacts[1:])]
    longest = max([contacts[0], duration - contacts[-1], *gaps])
    g = 8 * rng.uniform(0.75, 1.0) / longest**2  # the longest flight peaks near the top
    w_max = math.sqrt(8 / g)  # the longest flight that stays in the frame
    w_first = rng.uniform(contacts[0], w_max)
    w_last = rng.uniform(duration - contacts[-1], w_max)
    starts = [contacts[0] - w_first, *contacts]
    widths = [w_first, *gaps, w_last]

    def height(t: float) -> float:
        i = max(0, int(np.searchsorted(contacts, t, side="right")))
        t0, w = starts[i], widths[i]
        return 0.5 * g * (t - t0) * (t0 + w - t)

    speeds = [w / w_max for w in widths[:-1]]  # landing speed grows with the flight's length
    return height, speeds


def _bounce_plan(
    rng: np.random.Generator, event_frames: list[int], fps: float, n_frames: int, duration: float
) -> tuple[np.ndarray, list[float]] | None:
    """Per-frame heights and contact strengths, or None if this draw is not clearly visible."""
    height, speeds = _bounce_heights(rng, [k / fps for k in event_frames], duration)
    h = np.array([height(k / fps) for k in range(n_frames)])
    h[event_frames] = 0.0  # exactly on the floor (rounding)
    others = np.setdiff1d(np.arange(n_frames), event_frames)
    if h.max() > 1.0 or h[others].min() < MIN_CLEARANCE:
        return None
    # each contact must stand out as the lowest point of its own dip (what metrics detect)
    bounds = [0, *event_frames, n_frames - 1]
    for i, k in enumerate(event_frames):
        before = h[bounds[i] : k + 1].max()
        after = h[k : bounds[i + 2] + 1].max()
        if min(before, after) < MIN_HOP * h.max():
            return None
    strengths = [0.5 + 0.5 * s / max(speeds) for s in speeds]
    return h, strengths


def _bounce_frames(
    cls: SynthClass, rng: np.random.Generator, hw: tuple[int, int], heights: np.ndarray
) -> np.ndarray:
    """(T, H, W, 3) float in [0, 1]: a ball over a floor, drifting sideways a little."""
    h, w = hw
    r = min(h, w) * rng.uniform(0.09, 0.12)
    floor = h * (1 - FLOOR_FRACTION)
    low, high = floor - r, r + 1  # ball centre rows at heights 0 and 1
    x0, x1 = rng.uniform(r + 2, w - r - 2, size=2)
    drift = np.linspace(x0, x0 + 0.25 * (x1 - x0), len(heights))
    background = BACKGROUND * rng.uniform(0.8, 1.2, size=3)
    rows = np.arange(h)[:, None, None] + 0.5
    floor_cover = np.clip(rows - floor + 0.5, 0.0, 1.0)
    scene = background * (1 - floor_cover) + 0.18 * floor_cover
    colour = np.asarray(cls.colour)
    frames = np.empty((len(heights), h, w, 3))
    for k, y in enumerate(heights):
        coverage = _mask(cls.shape, hw, low - y * (low - high), drift[k], r)[..., None]
        frames[k] = scene * (1 - coverage) + colour * coverage
    return frames


# ---------------------------------------------------------------------------------------------
# the set


@dataclass(frozen=True)
class Settings:
    """What a clip depends on (all of it goes into its sidecar, so a change regenerates it)."""

    fps: float
    size: int | tuple[int, int]  # square side, or (height, width)
    duration: float
    sample_rate: int
    seed: int
    noise_db: float
    min_events: int
    max_events: int
    min_gap: int
    flash_area: str = "object"

    @property
    def hw(self) -> tuple[int, int]:
        return frame_hw(self.size)

    @property
    def n_frames(self) -> int:
        return frame_count(self.duration, self.fps)


_EVEN = "even sides >= 16 (H.264): an integer or [height, width]"


def _size_value(size: Any) -> int | tuple[int, int]:
    """data.size with square frames as an int (the sidecars square sets always had)."""
    h, w = frame_hw(size)
    return h if h == w else (h, w)


def _settings(data_cfg: Mapping[str, Any], seed: int) -> Settings:
    synth = data_cfg["synth"]
    s = Settings(
        fps=float(data_cfg["fps"]),
        size=_size_value(data_cfg["size"]),
        duration=float(data_cfg["duration"]),
        sample_rate=int(data_cfg["sample_rate"]),
        seed=int(seed),
        noise_db=float(synth["noise_db"]),
        min_events=int(synth["min_events"]),
        max_events=int(synth["max_events"]),
        min_gap=int(synth["min_gap"]),
        flash_area=str(synth["flash_area"]),
    )
    checks = [
        ("data.fps", s.fps, s.fps > 0, "a positive number"),
        ("data.size", s.size, min(s.hw) >= 16 and s.hw[0] % 2 == s.hw[1] % 2 == 0, _EVEN),
        ("data.duration", s.duration, s.duration > 0, "a positive number of seconds"),
        ("data.sample_rate", s.sample_rate, s.sample_rate >= 8000, "an integer >= 8000"),
        ("data.synth.num_train", synth["num_train"], synth["num_train"] >= 0, "an integer >= 0"),
        ("data.synth.num_test", synth["num_test"], synth["num_test"] >= 0, "an integer >= 0"),
        ("data.synth.min_events", s.min_events, s.min_events >= 1, "an integer >= 1"),
        ("data.synth.max_events", s.max_events, s.max_events >= s.min_events, ">= min_events"),
        ("data.synth.min_gap", s.min_gap, s.min_gap >= 2, "an integer >= 2 (frames)"),
    ]  # data.synth.flash_area: its choices are checked when the config loads (config.LIMITS)
    for key, value, ok, accepted in checks:
        if not ok:
            raise UserError(f"{key}={value!r} is not accepted; use {accepted}")
    # events live in frames 1 .. T-2, at least min_gap apart
    if s.n_frames - 2 < 1 + (s.max_events - 1) * s.min_gap:
        raise UserError(
            f"data.duration={s.duration} at data.fps={s.fps} gives {s.n_frames} frames, too few"
            f" for {s.max_events} events {s.min_gap} frames apart away from the first and last"
        )
    return s


def make_clip(
    cls: SynthClass, rng: np.random.Generator, s: Settings
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """One clip: its sidecar, frames (T, 3, H, W) uint8 and audio (N,) float32."""
    count = int(rng.integers(s.min_events, s.max_events + 1))
    if cls.family == "flash":
        event_frames = _event_frames(rng, s.n_frames, count, s.min_gap)
        pictures = _flash_frames(cls, rng, s.hw, event_frames, s.n_frames, s.flash_area)
        strengths = rng.uniform(0.7, 1.0, size=count).tolist()
    else:
        for _ in range(1000):  # redraw until every contact is clearly visible
            event_frames = _event_frames(rng, s.n_frames, count, s.min_gap)
            plan = _bounce_plan(rng, event_frames, s.fps, s.n_frames, s.duration)
            if plan is not None:
                break
        else:
            raise UserError(
                f"data.duration={s.duration}, data.fps={s.fps}: too few frames to show"
                f" {count} bounces clearly; use a longer duration or data.synth.max_events=1"
            )
        heights, strengths = plan
        pictures = _bounce_frames(cls, rng, s.hw, heights)
    events = [round(k / s.fps, 6) for k in event_frames]
    n_samples = round(s.n_frames / s.fps * s.sample_rate)
    audio = _soundtrack(cls, events, strengths, n_samples, s.sample_rate, s.noise_db, rng)
    sidecar = {
        "family": cls.family,
        "events": events,
        "event_frames": event_frames,
        "fps": s.fps,
        "duration": s.n_frames / s.fps,
        "size": list(s.size) if isinstance(s.size, tuple) else s.size,
        "sample_rate": s.sample_rate,
        "class": cls.name,
        "caption": cls.caption,
        "seed": s.seed,
        "noise_db": s.noise_db,
    }
    if cls.family == "flash" and s.flash_area != "object":  # default sidecars stay as they were
        sidecar["flash_area"] = s.flash_area
    frames = torch.from_numpy(np.round(pictures * 255).astype(np.uint8)).permute(0, 3, 1, 2)
    return sidecar, frames, torch.from_numpy(audio)


def _write_text(path: Path, text: str) -> None:
    """Atomic: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def generate(
    root: str | Path, data_cfg: Mapping[str, Any], seed: int, progress: bool = True
) -> dict[str, Any]:
    """Write the synthetic set under `root` in the AVSync15 layout; return a summary.

    `data_cfg` is the `data` config section (fps, size, duration, sample_rate, synth.*).
    Clips already written with the same settings are skipped; the split lists are rewritten.
    """
    root = Path(root)
    s = _settings(data_cfg, seed)
    classes = class_table(tuple(data_cfg["synth"]["classes"]))
    counts = {
        "train": int(data_cfg["synth"]["num_train"]),
        "test": int(data_cfg["synth"]["num_test"]),
    }
    jobs = [(split, i) for split in SPLITS for i in range(counts[split])]
    began = time.perf_counter()
    written = skipped = 0
    lists: dict[str, list[str]] = {split: [] for split in SPLITS}
    for split, i in tqdm(jobs, desc="synth", disable=not progress, unit="clip"):
        cls = classes[i % len(classes)]
        rel = f"{cls.name}/{split}_{i:04d}.mp4"
        lists[split].append(rel)
        rng = np.random.default_rng([s.seed, SPLITS.index(split), i])
        sidecar, frames, audio = make_clip(cls, rng, s)
        text = json.dumps(sidecar, sort_keys=True, indent=1) + "\n"
        video = root / "videos" / rel
        side = sidecar_path(root, cls.name, Path(rel).stem)
        if video.is_file() and side.is_file() and side.read_text() == text:
            skipped += 1
            continue
        write_mp4(video, frames, s.fps, audio, s.sample_rate)
        _write_text(side, text)  # after the video: a sidecar means the clip is complete
        written += 1
    for split in SPLITS:
        _write_text(root / SPLIT_FILES[split], "".join(f"{rel}\n" for rel in lists[split]))
    return {
        "root": str(root),
        "written": written,
        "skipped": skipped,
        "splits": counts,
        "classes": [c.name for c in classes],
        "seconds": round(time.perf_counter() - began, 2),
    }


def read_events(root: str | Path, record_or_path: ClipRecord | str | Path) -> dict[str, Any]:
    """The sidecar of a synthetic clip (a ClipRecord, or the path of its video)."""
    path = Path(record_or_path.path if isinstance(record_or_path, ClipRecord) else record_or_path)
    side = sidecar_path(root, path.parent.name, path.stem)
    if not side.is_file():
        raise UserError(
            f"{side}: no event sidecar for {path} (synthetic clips have one; `make synth` writes them)"
        )
    return read_sidecar(side)
