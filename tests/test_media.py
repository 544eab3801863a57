"""Media I/O: write/read round trip, audio-video timing, fps resampling, resizing, bad files."""

import math
import warnings

import av
import numpy as np
import pytest
import soundfile
import torch

from jointdit.errors import UserError
from jointdit.media import frame_count, read_audio, read_clip, read_video, write_mp4

SR = 16000


def _gray_frames(levels, h=64, w=64):
    """Frames whose uniform gray level (in [-1, 1]) encodes their index."""
    return torch.tensor(levels, dtype=torch.float32)[:, None, None, None].expand(-1, 3, h, w)


def _flash_and_beep(fps, n_frames, event_frames, h=64, w=64):
    """Dark frames, white on event frames; faint noise with a tone burst at each event instant."""
    frames = torch.full((n_frames, 3, h, w), -0.9)
    n = round(n_frames / fps * SR)
    audio = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.003
    t = torch.arange(int(0.03 * SR)) / SR
    for k in event_frames:
        frames[k] = 0.9
        start = round(k / fps * SR)
        audio[start : start + len(t)] += 0.5 * torch.sin(2 * math.pi * 1000 * t)
    return frames, audio


def _onsets(audio, threshold=0.1, gap=0.05):
    """Sample indices where the signal first exceeds `threshold` after `gap` seconds of quiet."""
    loud = np.flatnonzero(np.abs(audio.numpy()) > threshold)
    starts = [int(loud[0])] if len(loud) else []
    starts += [int(b) for a, b in zip(loud, loud[1:]) if b - a > gap * SR]
    return starts


def test_round_trip_keeps_count_rate_size_and_duration(tmp_path):
    levels = np.linspace(-0.8, 0.8, 14)
    frames = _gray_frames(levels)
    audio = 0.3 * torch.sin(2 * math.pi * 440 * torch.arange(2 * SR) / SR)
    path = write_mp4(tmp_path / "clip.mp4", frames, fps=7, audio=audio, sample_rate=SR)
    assert path == tmp_path / "clip.mp4"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temp file left behind

    clip = read_clip(path, fps=7, size=64)
    assert clip.frames.shape == (14, 3, 64, 64)
    assert clip.frames.dtype == torch.float32
    assert clip.fps == 7 and clip.sample_rate == SR and clip.path == str(path)
    assert clip.audio.shape == (2 * SR,)
    assert clip.frames.min() >= -1 and clip.frames.max() <= 1
    got = clip.frames.mean(dim=(1, 2, 3)).numpy()
    assert np.abs(got - levels).max() < 0.05
    # the tone comes back at its level and pitch
    assert abs(clip.audio[SR // 2 : -SR // 2].abs().max().item() - 0.3) < 0.05
    spectrum = np.abs(np.fft.rfft(clip.audio.numpy()))
    assert abs(np.argmax(spectrum) * SR / len(clip.audio) - 440) < 2


def test_uint8_and_float_frames_write_the_same_video(tmp_path):
    # small noisy frames: the case where x264 was not deterministic with mb-tree on
    frames = torch.rand(4, 3, 32, 48) * 2 - 1
    as_uint8 = ((frames + 1) * 127.5).round().to(torch.uint8)
    a = read_video(write_mp4(tmp_path / "a.mp4", frames, fps=7), fps=7, size=None)
    b = read_video(write_mp4(tmp_path / "b.mp4", as_uint8, fps=7), fps=7, size=None)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fps", [7, 25])
def test_sound_and_frame_of_an_event_stay_within_one_frame(tmp_path, fps):
    # at 25 fps one frame is 40 ms, less than an uncompensated AAC priming delay (64 ms)
    n_frames = 2 * fps
    events = [3, n_frames // 2, n_frames - 4]
    frames, audio = _flash_and_beep(fps, n_frames, events)
    path = write_mp4(tmp_path / "sync.mp4", frames, fps=fps, audio=audio)

    clip = read_clip(path, fps=fps, size=64)
    flashes = torch.nonzero(clip.frames.mean(dim=(1, 2, 3)) > 0).flatten().tolist()
    assert flashes == events
    onsets = _onsets(clip.audio)
    assert len(onsets) == len(events)
    for k, onset in zip(flashes, onsets):
        assert abs(onset / SR - k / fps) < 1 / fps
        assert abs(onset / SR - k / fps) < 0.01  # measured: within a few samples


def test_a_window_keeps_timing(tmp_path):
    fps, events = 10, [5, 13]
    frames, audio = _flash_and_beep(fps, 20, events)
    path = write_mp4(tmp_path / "w.mp4", frames, fps=fps, audio=audio)
    clip = read_clip(path, fps=fps, size=None, start=0.8, duration=1.0)
    assert clip.frames.shape[0] == 10 and clip.audio.shape == (SR,)
    flashes = torch.nonzero(clip.frames.mean(dim=(1, 2, 3)) > 0).flatten().tolist()
    assert flashes == [13 - 8]
    (onset,) = _onsets(clip.audio)
    assert abs(onset / SR - 0.5) < 0.01


def test_fps_resampling_picks_the_frame_shown_at_each_instant(tmp_path):
    levels = np.linspace(-0.9, 0.9, 14)
    path = write_mp4(tmp_path / "ramp.mp4", _gray_frames(levels), fps=7)

    def index_of(frames):
        means = frames.mean(dim=(1, 2, 3)).numpy()
        return [int(np.argmin(np.abs(levels - m))) for m in means]

    assert index_of(read_video(path, fps=14, size=16)) == [k // 2 for k in range(28)]
    assert index_of(read_video(path, fps=3.5, size=16)) == list(range(0, 14, 2))
    # 3 fps: instants k/3 s show source frame floor(7k/3)
    assert index_of(read_video(path, fps=3, size=16)) == [7 * k // 3 for k in range(6)]
    # a window past the end of the stream holds the last frame, and says so
    with pytest.warns(UserWarning, match="ramp.mp4: video ends at 2.00s.*last frame is held"):
        held = read_video(path, fps=7, size=16, duration=2.5)
    assert index_of(held) == [*range(14), 13, 13, 13, 13]
    assert frame_count(2.5, 7) == 18
    with pytest.raises(UserError, match="ramp.mp4: start=2.5s is past the end"):
        read_video(path, fps=7, size=16, start=2.5, duration=1.0)


def test_resize_keeps_the_centre(tmp_path):
    frames = torch.full((2, 3, 48, 80), -1.0)
    frames[:, 0, :, :10] = 1.0  # red left band: outside a centred square crop (cols 15..65)
    frames[:, 2, :, 10:] = 1.0  # blue elsewhere
    path = write_mp4(tmp_path / "wide.mp4", frames, fps=7)
    square = read_video(path, fps=7, size=32)
    assert square.shape == (2, 3, 32, 32)
    assert square[:, 0].max() < -0.5 and square[:, 2].mean() > 0.8
    tall = read_video(path, fps=7, size=(24, 16))
    assert tall.shape == (2, 3, 24, 16)
    assert tall[:, 0].max() < -0.5


def test_odd_sizes_are_padded_to_even(tmp_path):
    frames = torch.zeros(3, 3, 31, 45)
    video = read_video(write_mp4(tmp_path / "odd.mp4", frames, fps=7), fps=7, size=None)
    assert video.shape == (3, 3, 32, 46)


def test_video_without_audio_reads_as_silence_with_a_warning(tmp_path):
    path = write_mp4(tmp_path / "mute.mp4", torch.zeros(14, 3, 32, 32), fps=7)
    with pytest.warns(UserWarning, match="mute.mp4.*no audio"):
        clip = read_clip(path, fps=7, size=32)
    assert clip.audio.shape == (2 * SR,) and clip.audio.abs().max() == 0
    with pytest.warns(UserWarning, match="mute.mp4"):
        assert read_audio(path, duration=0.5).shape == (SR // 2,)


def test_audio_is_zero_padded_past_its_end(tmp_path):
    audio = torch.full((SR,), 0.25)
    path = write_mp4(tmp_path / "short.mp4", torch.zeros(7, 3, 16, 16), fps=7, audio=audio)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clip with audio warns about nothing
        out = read_audio(path, duration=2.0)
    assert out.shape == (2 * SR,)
    assert abs(out[SR // 4 : SR // 2].mean().item() - 0.25) < 0.02
    assert out[int(1.1 * SR) :].abs().max() == 0


@pytest.mark.parametrize("content", [b"", b"this is not a video" * 50, b"\x00\x00\x00\x18ftypmp42"])
def test_a_file_that_is_not_a_video_raises_an_error_naming_it(tmp_path, content):
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(content)
    with pytest.raises(UserError, match="corrupt.mp4"):
        read_clip(path, fps=7, size=64)


def test_an_audio_only_file_or_a_missing_file_is_refused(tmp_path):
    wav = tmp_path / "sound.wav"
    soundfile.write(wav, np.zeros(SR, dtype=np.float32), SR)
    with pytest.raises(UserError, match="sound.wav.*no video stream"):
        read_video(wav, fps=7, size=64)
    with pytest.raises(UserError, match="not found.*missing.mp4"):
        read_clip(tmp_path / "missing.mp4", fps=7, size=64)


def test_stereo_48k_audio_is_mixed_to_mono_16k_in_place(tmp_path):
    path = tmp_path / "stereo.mp4"
    rate, fps = 48000, 10
    wave = np.zeros((2, 2 * rate), dtype=np.float32)
    t = np.arange(int(0.05 * rate)) / rate
    wave[0, rate : rate + len(t)] = 0.6 * np.sin(2 * np.pi * 700 * t)  # left only, at 1.0 s
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        sound = out.add_stream("aac", rate=rate, layout="stereo")
        for k in range(2 * fps):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            frame.pts = k
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = rate, 0
        out.mux(sound.encode(frame))
        out.mux(sound.encode(None))

    clip = read_clip(path, fps=fps, size=32)
    assert clip.audio.shape == (2 * SR,) and clip.sample_rate == SR
    (onset,) = _onsets(clip.audio, threshold=0.05)
    assert abs(onset / SR - 1.0) < 0.01
