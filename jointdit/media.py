"""Media I/O with PyAV: read a clip's frames and audio on one timeline, write H.264 + AAC mp4.

Time origin: t = 0 is the presentation time of the video stream's first frame; audio samples
are placed by their decoded timestamps on the same axis, so an audio event and the frame shown
at the same instant stay together (players sync the same way).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from jointdit.config import frame_hw
from jointdit.errors import UserError

# A source frame whose timestamp is at most this far after an output instant counts as shown
# at that instant: containers that store times in milliseconds round 1/30 s to 0.033/0.067.
_PTS_SLACK = 1e-3


@dataclass
class Clip:
    """Frames (T, 3, H, W) float32 in [-1, 1] and mono audio (N,) float32 in [-1, 1]."""

    frames: torch.Tensor
    audio: torch.Tensor
    fps: float
    sample_rate: int
    path: str


def _open(path: str | os.PathLike, video: bool = True) -> av.container.InputContainer:
    """Open a media file; with `video`, it must have a video stream (audio files need not)."""
    path = Path(path)
    what = "video" if video else "media file"
    if not path.is_file():
        raise UserError(f"media file not found: {path}")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise UserError(f"{path}: not a readable {what} ({reason})") from None
    if video and not container.streams.video:
        container.close()
        raise UserError(f"{path}: not a readable video (no video stream)")
    if not (container.streams.video or container.streams.audio):
        container.close()
        raise UserError(f"{path}: not a readable {what} (no video or audio stream)")
    return container


def check_readable(path: str | os.PathLike, video: bool = True) -> None:
    """Decode the first video frame of `path` (with video=False: the first audio frame, an
    audio stream being required); a UserError naming the file if that fails. Cheap: a damaged
    clip is found before a model is loaded."""
    container = _open(path, video=video)
    try:
        streams = container.streams.video if video else container.streams.audio
        if not streams:
            raise UserError(f"{path}: no audio stream")
        if next(container.decode(streams[0]), None) is None:
            raise UserError(f"{path}: not a readable media file (no frames decoded)")
    except av.FFmpegError as e:
        raise UserError(f"{path}: not a readable media file ({e.strerror or e})") from None
    finally:
        container.close()


def has_audio_stream(path: str | os.PathLike) -> bool:
    """Whether a media file has an audio stream (read_audio reads a file without one as silence)."""
    container = _open(path)
    try:
        return bool(container.streams.audio)
    finally:
        container.close()


def _origin(container: av.container.InputContainer) -> float:
    """Seconds of the first video frame on the container's timeline."""
    if not container.streams.video:  # an audio file: its own timeline
        return 0.0
    stream = container.streams.video[0]
    if stream.start_time is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def frame_count(duration: float, fps: float) -> int:
    """How many frames a clip of `duration` seconds has at `fps`: the instants k/fps < duration."""
    return max(0, math.ceil(duration * fps - 1e-6))


def resize_crop(frame: torch.Tensor, size: int | tuple[int, int] | None) -> torch.Tensor:
    """(3, h, w) -> resized to cover the target (shorter side to `size`), then center-cropped."""
    if size is None:
        return frame
    out_h, out_w = frame_hw(size)
    h, w = frame.shape[-2:]
    scale = max(out_h / h, out_w / w)
    new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    if (new_h, new_w) != (h, w):
        frame = F.interpolate(
            frame[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
        )[0]
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    return frame[:, top : top + out_h, left : left + out_w]


def read_video(
    path: str | os.PathLike,
    fps: float,
    size: int | tuple[int, int] | None,
    start: float = 0.0,
    duration: float | None = None,
) -> torch.Tensor:
    """Frames (T, 3, H, W) float32 in [-1, 1], resampled to `fps` from `start` seconds on.

    Output frame k is the source frame shown at start + k/fps (the last one whose timestamp is
    not after that instant); past the end of the stream the last frame stays shown.
    With `duration=None` the clip runs to the end of the video.
    """
    container = _open(path)
    try:
        stream = container.streams.video[0]
        origin = _origin(container)
        t0 = origin + start
        if start > 0:
            # seeking lands on the keyframe before t0; decoding forward reaches t0
            container.seek(int(t0 / stream.time_base), stream=stream, backward=True)
        wanted = None if duration is None else frame_count(duration, fps)
        picked: list[torch.Tensor] = []
        prev, prev_tensor = None, None

        def take(frame: av.VideoFrame, until: float) -> None:
            """Assign `frame` to every output instant before `until` (seconds)."""
            nonlocal prev_tensor
            while wanted is None or len(picked) < wanted:
                if t0 + len(picked) / fps >= until - _PTS_SLACK:
                    break
                if prev_tensor is None:
                    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                    x = rgb.permute(2, 0, 1).float().div(127.5).sub(1.0)
                    prev_tensor = resize_crop(x, size)
                picked.append(prev_tensor)

        for frame in container.decode(stream):
            time = frame.time if frame.time is not None else 0.0
            if prev is None:
                prev = frame  # instants before the first frame show the first frame
            take(prev, time)
            if frame is not prev:
                prev, prev_tensor = frame, None
            if wanted is not None and len(picked) >= wanted:
                break
        if prev is None:
            raise UserError(f"{path}: not a readable video (no frames decoded)")
        frame_dur = float(1 / stream.average_rate) if stream.average_rate else 1 / fps
        end = (prev.time or 0.0) + frame_dur  # when the last frame stops being shown
        if t0 >= end:
            raise UserError(f"{path}: start={start}s is past the end of the video")
        if wanted is None:
            take(prev, end)
        else:
            if t0 + duration > end + 1 / fps:
                warnings.warn(
                    f"{path}: video ends at {end - origin:.2f}s, before the window"
                    f" [{start}, {start + duration}]s; its last frame is held",
                    stacklevel=2,
                )
            take(prev, math.inf)
    except av.FFmpegError as e:
        raise UserError(f"{path}: not a readable video ({e.strerror or e})") from None
    finally:
        container.close()
    if not picked:
        raise UserError(f"{path}: no frames at or after start={start}s")
    return torch.stack(picked)


def read_audio(
    path: str | os.PathLike,
    sample_rate: int = 16000,
    start: float = 0.0,
    duration: float | None = None,
) -> torch.Tensor:
    """Mono audio (N,) float32 at `sample_rate`, from `start` seconds on the video's timeline.

    Trimmed or zero-padded to `duration` seconds. A file without an audio stream reads as
    silence (with a warning) as long as the requested duration, or as the container. The file
    may be audio only (a wav).
    """
    container = _open(path, video=False)
    try:
        origin = _origin(container)
        if duration is None:
            total = (container.duration or 0) / av.time_base - start
            length = max(0, round(total * sample_rate))
        else:
            length = round(duration * sample_rate)
        if not container.streams.audio:
            warnings.warn(f"{path}: no audio stream; reading it as silence", stacklevel=2)
            return torch.zeros(length)
        stream = container.streams.audio[0]
        t0 = origin + start
        if start > 0:
            container.seek(int(t0 / stream.time_base), stream=stream, backward=True)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks: list[np.ndarray] = []
        first_time, got = None, 0
        for frame in container.decode(stream):
            if first_time is None:
                # decoders drop the AAC priming samples; the first frame's time says where
                # its first sample belongs, which is what keeps onsets in place
                first_time = frame.time if frame.time is not None else origin
            for piece in resampler.resample(frame):
                chunks.append(piece.to_ndarray()[0])
                got += piece.samples
            if duration is not None and first_time + got / sample_rate > t0 + duration + 0.1:
                break
        chunks.extend(f.to_ndarray()[0] for f in resampler.resample(None))
    except av.FFmpegError as e:
        raise UserError(f"{path}: not a readable video ({e.strerror or e})") from None
    finally:
        container.close()
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    # index in the output where samples[0] lands
    offset = 0 if first_time is None else round((first_time - t0) * sample_rate)
    if duration is None:
        length = max(0, offset + len(samples))
    out = np.zeros(length, np.float32)
    src_lo = max(0, -offset)
    dst_lo = max(0, offset)
    n = max(0, min(len(samples) - src_lo, length - dst_lo))
    out[dst_lo : dst_lo + n] = samples[src_lo : src_lo + n]
    return torch.from_numpy(np.clip(out, -1.0, 1.0))


def read_clip(
    path: str | os.PathLike,
    fps: float,
    size: int | tuple[int, int] | None,
    sample_rate: int = 16000,
    start: float = 0.0,
    duration: float | None = None,
) -> Clip:
    """Frames and audio of one clip on a shared timeline (see read_video / read_audio).

    Without `duration`, the audio spans exactly the returned frames (T / fps seconds).
    """
    frames = read_video(path, fps, size, start=start, duration=duration)
    audio_duration = duration if duration is not None else frames.shape[0] / fps
    audio = read_audio(path, sample_rate, start=start, duration=audio_duration)
    return Clip(frames=frames, audio=audio, fps=float(fps), sample_rate=sample_rate, path=str(path))


def _to_uint8_hwc(frames: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) float in [-1, 1] or uint8 -> (T, H', W', 3) uint8 with even H', W'."""
    frames = torch.as_tensor(frames).detach().cpu()
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be (T, 3, H, W), got {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        frames = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    h, w = frames.shape[-2:]
    if h % 2 or w % 2:  # yuv420p needs even sizes: repeat the last row/column
        frames = F.pad(frames.float(), (0, w % 2, 0, h % 2), mode="replicate").to(torch.uint8)
    return frames.permute(0, 2, 3, 1).contiguous().numpy()


def write_mp4(
    path: str | os.PathLike,
    frames: torch.Tensor,
    fps: float,
    audio: torch.Tensor | None = None,
    sample_rate: int = 16000,
) -> Path:
    """Write H.264 (yuv420p) video with optional mono AAC audio; atomic (temp name + rename).

    `frames` (T, 3, H, W) float in [-1, 1] or uint8; odd sizes are padded to even ones.
    `audio` (N,) float in [-1, 1] starts at the first frame's instant.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = _to_uint8_hwc(frames)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mp4")
    try:
        # faststart puts the index first so browsers (the UI) can play while loading
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "faststart"}) as out:
            rate = Fraction(fps).limit_denominator(1001)
            video = out.add_stream("libx264", rate=rate)
            video.width, video.height = images.shape[2], images.shape[1]
            video.pix_fmt = "yuv420p"
            # crf 17: one-frame flashes and small objects survive. Same input, same bytes: one
            # thread, and no mb-tree (on small frames it made x264's output vary run to run,
            # measured at 32x48)
            video.codec_context.options = {"crf": "17", "x264-params": "no-mbtree=1"}
            video.codec_context.thread_count = 1
            sound = None
            if audio is not None:
                sound = out.add_stream("aac", rate=sample_rate, layout="mono")
            for k, image in enumerate(images):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = k
                out.mux(video.encode(frame))
            out.mux(video.encode(None))
            if sound is not None:
                wave = torch.as_tensor(audio).detach().cpu().float().reshape(-1).clamp(-1, 1)
                frame = av.AudioFrame.from_ndarray(
                    wave.numpy()[None, :], format="flt", layout="mono"
                )
                frame.sample_rate = sample_rate
                frame.pts = 0
                out.mux(sound.encode(frame))
                out.mux(sound.encode(None))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
