"""AV-Align in its published form (Yariv et al., 2024, the TempoTokens `av_align.py`).

Beside the repo's own variant (`jointdit.metrics.av_align`: its own onset and motion detectors,
one-to-one matching) this is the score as the published code computes it, so that figures can
be put next to other papers':

- video peaks: mean Farneback optical-flow magnitude between consecutive frames (OpenCV,
  pyramid 0.5, 3 levels, window 15, 3 iterations, poly_n 5, sigma 1.2), the first pair counted
  twice; every strict local maximum of that curve is a peak, at time i / fps;
- audio peaks: librosa's default onsets (`onset_strength` + `onset_detect` at 22050 Hz, n_fft
  2048, hop 512, 128 mel bands), written out here in numpy because librosa would pull in numba
  and llvmlite; the audio is resampled to 22050 Hz with a polyphase filter (librosa uses soxr,
  which differs by a fraction of a dB);
- IoU: an audio peak counts once if some video peak lies strictly within one frame of it, over
  |audio| + |video| - count. The count is not one-to-one, so the score can exceed 1: two onsets
  of one click matched to one motion peak count twice.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from scipy.signal import get_window, resample_poly

LIBROSA_SR = 22050
N_FFT, HOP, N_MELS = 2048, 512, 128
TOP_DB, AMIN = 80.0, 1e-10
# onset_detect's peak picking defaults, in seconds (librosa turns them into frames)
PRE_MAX_S, POST_MAX_S, PRE_AVG_S, POST_AVG_S, WAIT_S, DELTA = 0.03, 0.0, 0.10, 0.10, 0.03, 0.07
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    linear = mel * (200.0 / 3)
    log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, log, linear)


def mel_filters(sr: int = LIBROSA_SR, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """(n_mels, 1 + n_fft // 2) Slaney-normalised triangles from 0 Hz to Nyquist (librosa's)."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    freqs = np.linspace(0.0, sr / 2, 1 + n_fft // 2)
    ramps = edges[:, None] - freqs[None, :]
    widths = np.diff(edges)
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]


def onset_strength(y: np.ndarray, sr: int = LIBROSA_SR) -> np.ndarray:
    """librosa.onset.onset_strength with its defaults: the mean over mel bands of the rise
    (lag 1, floored at 0) of the dB mel power spectrogram, shifted to frame centres."""
    padded = np.pad(np.asarray(y, np.float64), N_FFT // 2)  # centred frames, zero padding
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * get_window("hann", N_FFT), axis=1)) ** 2
    db = 10.0 * np.log10(np.maximum(AMIN, mel_filters(sr) @ power.T))
    db = np.maximum(db, db.max() - TOP_DB)
    rise = np.maximum(0.0, db[:, 1:] - db[:, :-1]).mean(axis=0)
    shift = 1 + N_FFT // (2 * HOP)  # the lag, plus centring
    return np.concatenate([np.zeros(shift), rise])[: db.shape[1]]


def peak_pick(x: np.ndarray, pre_max, post_max, pre_avg, post_avg, delta, wait) -> np.ndarray:
    """librosa.util.peak_pick: x[n] is a peak if it is the maximum of x[n - pre_max : n +
    post_max], at least delta above the mean of x[n - pre_avg : n + post_avg], and more than
    `wait` samples after the previous peak."""
    pre_max, post_max, pre_avg, post_avg, wait = (
        int(np.ceil(v)) for v in (pre_max, post_max, pre_avg, post_avg, wait)
    )
    peaks, n = [], 0
    while n < len(x):
        if x[n] == x[max(0, n - pre_max) : n + post_max].max() and x[n] >= (
            x[max(0, n - pre_avg) : n + post_avg].mean() + delta
        ):
            peaks.append(n)
            n += wait + 1
        else:
            n += 1
    return np.asarray(peaks, dtype=int)


def audio_peaks(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Onset times (seconds) as `librosa.onset.onset_detect(y, sr=22050)` finds them."""
    ratio = Fraction(LIBROSA_SR, sample_rate)
    y = resample_poly(np.asarray(wave, np.float64), ratio.numerator, ratio.denominator)
    env = onset_strength(y)
    env = env - env.min()
    if not env.any():
        return np.zeros(0)
    env /= env.max() + np.finfo(env.dtype).tiny
    frames = peak_pick(
        env,
        PRE_MAX_S * LIBROSA_SR // HOP,
        POST_MAX_S * LIBROSA_SR // HOP + 1,
        PRE_AVG_S * LIBROSA_SR // HOP,
        POST_AVG_S * LIBROSA_SR // HOP + 1,
        DELTA,
        WAIT_S * LIBROSA_SR // HOP,
    )
    return frames * HOP / LIBROSA_SR


def flow_curve(frames: np.ndarray) -> np.ndarray:
    """Mean Farneback flow magnitude per frame: [flow(0, 1), flow(0, 1), flow(1, 2), ...]."""
    import cv2

    gray = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]

    def flow(a: np.ndarray, b: np.ndarray) -> float:
        f = cv2.calcOpticalFlowFarneback(a, b, None, flags=0, **FARNEBACK)
        return float(np.hypot(f[..., 0], f[..., 1]).mean())

    return np.array(
        [flow(gray[0], gray[1])] + [flow(gray[i - 1], gray[i]) for i in range(1, len(gray))]
    )


def video_peaks(frames: np.ndarray, fps: float) -> np.ndarray:
    """Times (i / fps) of the strict local maxima of `flow_curve` (uint8 (T, H, W, 3))."""
    if len(frames) < 2:
        return np.zeros(0)
    c = flow_curve(frames)
    inner = np.flatnonzero((c[1:-1] > c[:-2]) & (c[1:-1] > c[2:])) + 1
    return inner / fps


def iou(audio: np.ndarray, video: np.ndarray, fps: float) -> float:
    """The published IoU: audio peaks with a video peak strictly within 1/fps, counted once
    each (not one-to-one), over |audio| + |video| - count; 0 when neither has a peak."""
    count = sum(any(abs(a - v) < 1.0 / fps for v in video) for a in audio)
    union = len(audio) + len(video) - count
    return count / union if union else 0.0


def av_align(frames: np.ndarray, wave: np.ndarray, fps: float, sample_rate: int) -> float:
    """AV-Align as published, for uint8 frames (T, H, W, 3) and a mono waveform."""
    return iou(audio_peaks(wave, sample_rate), video_peaks(frames, fps), fps)
