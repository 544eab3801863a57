"""The evaluation protocol as data: which windows of a test video are scored, and their shape.

ASVA's protocol on AVSync15 (configs/asva_eval.yaml): 2 s windows, 12 frames at 6 fps,
256x256 (aspect-preserving centre crop, then resize), 16 kHz mono, three windows per test video
starting at evenly spaced times `linspace(0, duration - 2, 3)`. The shape is the config's data
section (fps, size, duration, sample_rate); `eval.clips_per_video` and `eval.split` say which
windows. A generated clip (JointDiT's own: 14 frames at 7 fps, 576x320) is brought to that
shape by `Protocol.resample`, frame k being the generated frame shown at time k / fps, as a
decoder sampling the stream at 1/fps steps picks it (`jointdit.media.read_video`'s rule).

Fréchet distances depend on N, frames and resolution: `Protocol.hash` (of everything above)
goes into every result and every cached feature file.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from scipy.signal import resample_poly

from jointdit import media
from jointdit.config import frame_hw
from jointdit.errors import UserError


@dataclass(frozen=True)
class Protocol:
    fps: float
    frames: int
    height: int
    width: int
    duration: float
    sample_rate: int
    clips_per_video: int
    split: str

    @classmethod
    def from_config(cls, cfg: Any) -> Protocol:
        d, e = cfg.data, cfg.eval
        height, width = frame_hw(d.size)
        return cls(
            fps=float(d.fps),
            frames=media.frame_count(d.duration, d.fps),
            height=height,
            width=width,
            duration=float(d.duration),
            sample_rate=int(d.sample_rate),
            clips_per_video=int(e.clips_per_video),
            split=str(e.split),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def hash(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def starts(self, video_duration: float) -> list[float]:
        """Window starts in a video of `video_duration` seconds: evenly spaced from 0 to the
        last start that leaves a whole window (all 0 if the video is one window long)."""
        last = max(0.0, video_duration - self.duration)
        return [float(s) for s in np.linspace(0.0, last, self.clips_per_video)]

    def resample(
        self, frames: torch.Tensor, fps: float, audio: torch.Tensor, sample_rate: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """A clip (frames (T, 3, H, W) in [-1, 1] at `fps`, mono audio at `sample_rate`) in the
        protocol's shape: uint8 frames (frames, height, width, 3) and float32 audio of
        duration * sample_rate samples (zero-padded if the clip is shorter)."""
        picks = [
            min(len(frames) - 1, math.floor(k * fps / self.fps + 1e-6)) for k in range(self.frames)
        ]
        size = (self.height, self.width)
        picked = torch.stack([media.resize_crop(frames[i], size) for i in picks])
        pixels = ((picked.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        ratio = Fraction(self.sample_rate, int(sample_rate))
        wave = np.asarray(audio, dtype=np.float64).reshape(-1)
        if ratio != 1:
            wave = resample_poly(wave, ratio.numerator, ratio.denominator)
        n = round(self.duration * self.sample_rate)
        wave = np.pad(wave[:n], (0, max(0, n - len(wave))))
        return pixels.permute(0, 2, 3, 1).numpy(), wave.astype(np.float32)

    def read_window(self, path: str | Path, start: float) -> tuple[np.ndarray, np.ndarray]:
        """A window of a source video in the protocol's shape (uint8 frames, float32 audio)."""
        clip = media.read_clip(
            path, self.fps, (self.height, self.width), self.sample_rate, start, self.duration
        )
        return self.resample(clip.frames, clip.fps, clip.audio, clip.sample_rate)


def video_duration(path: str | Path) -> float:
    """Seconds of a video's picture stream (its container's duration when the stream has none)."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is None:
                raise UserError(f"{path}: the video states no duration")
            return container.duration / av.time_base
    except (av.FFmpegError, IndexError) as e:
        raise UserError(f"{path}: not a readable video ({e})") from None
