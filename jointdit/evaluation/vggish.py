"""VGGish (Hershey et al., 2017) for FAD: the network and its log-mel front end, written here.

The network's module names follow torchvggish's port (`features.<i>` convolutions,
`embeddings.<i>` linear layers), so the published state dict `vggish-10086976.pth` loads as it
is. As audioldm_eval and MMAudio's av-benchmark use it for FAD: 16 kHz input, the 128-d raw
embedding, no PCA/quantisation post-processing, and no ReLU after the last layer.

Front end (AudioSet's VGGish recipe): 25 ms periodic-Hann windows every 10 ms, |rfft| over
512 points, 64 HTK-mel bands between 125 and 7500 Hz, log(mel + 0.01), then non-overlapping
examples of 96 frames (0.96 s; an incomplete last example is dropped, so 2 s give 2 examples).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from jointdit.errors import UserError

SAMPLE_RATE = 16000
WINDOW_S, HOP_S = 0.025, 0.010
MEL_BANDS, MEL_LOW_HZ, MEL_HIGH_HZ = 64, 125.0, 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96  # 0.96 s per example, examples do not overlap
# (conv channels, "M" = 2x2 max-pool), then the embedding MLP, as published
CONV_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")
HIDDEN, EMBED = 4096, 128


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log1p(hz / 700.0)  # HTK


def mel_matrix(n_fft: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(n_fft // 2 + 1, 64) triangular HTK-mel weights; the DC bin weighs nothing."""
    bins = _hz_to_mel(np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1))
    edges = np.linspace(_hz_to_mel(MEL_LOW_HZ), _hz_to_mel(MEL_HIGH_HZ), MEL_BANDS + 2)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins[:, None] - lower) / (centre - lower)
    falling = (upper - bins[:, None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0] = 0.0
    return weights


def log_mel(wave: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """(N,) mono waveform at 16 kHz -> (frames, 64) log-mel, float64."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"VGGish takes {SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
    x = torch.as_tensor(np.asarray(wave, dtype=np.float64)).reshape(-1)
    win, hop = round(SAMPLE_RATE * WINDOW_S), round(SAMPLE_RATE * HOP_S)
    if len(x) < win:
        raise ValueError(f"VGGish needs at least {win} samples, got {len(x)}")
    n_fft = 1 << math.ceil(math.log2(win))
    periodic_hann = 0.5 - 0.5 * torch.cos(2 * math.pi * torch.arange(win, dtype=x.dtype) / win)
    frames = x.unfold(0, win, hop) * periodic_hann  # no padding: whole windows only
    magnitude = torch.fft.rfft(frames, n=n_fft).abs()
    return torch.log(magnitude @ torch.from_numpy(mel_matrix(n_fft)) + LOG_OFFSET)


def examples(wave: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """(N,) waveform -> (examples, 1, 96, 64) float32, VGGish's input."""
    mel = log_mel(wave, sample_rate)
    count = len(mel) // EXAMPLE_FRAMES
    if count == 0:
        raise ValueError(
            f"VGGish needs {EXAMPLE_FRAMES * HOP_S:.2f} s of audio per example, got "
            f"{len(mel) * HOP_S:.2f} s"
        )
    return mel[: count * EXAMPLE_FRAMES].reshape(count, 1, EXAMPLE_FRAMES, MEL_BANDS).float()


class VGGish(nn.Module):
    """VGG-11-style convolutions on a 96x64 log-mel patch, then a 3-layer MLP (no final ReLU).

    `widths` (conv channels, in CONV_LAYOUT's order) and `hidden` default to the published
    sizes; smaller ones give the same architecture for tests.
    """

    def __init__(self, widths: tuple[int, ...] | None = None, hidden: int = HIDDEN):
        super().__init__()
        widths = widths or tuple(c for c in CONV_LAYOUT if c != "M")
        layers: list[nn.Module] = []
        channels, it = 1, iter(widths)
        for item in CONV_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out = next(it)
                layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        # a 96x64 patch leaves 6x4 after four poolings
        self.embeddings = nn.Sequential(
            nn.Linear(channels * 6 * 4, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, EMBED),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, C, 6, 4)
        # the TF original flattens channels last (B, 6, 4, C)
        return self.embeddings(x.permute(0, 2, 3, 1).flatten(1))


def _widths(state: dict[str, torch.Tensor]) -> tuple[tuple[int, ...], int]:
    convs = sorted(
        (int(k.split(".")[1]), v.shape[0])
        for k, v in state.items()
        if k.startswith("features.") and k.endswith(".weight")
    )
    return tuple(c for _, c in convs), state["embeddings.0.weight"].shape[0]


def load(path: str | Path) -> VGGish:
    """VGGish from a state dict file (the published `vggish-10086976.pth`, or a smaller one
    with the same keys); every key and shape must match."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{path}: not a readable VGGish state dict ({e})") from None
    if not isinstance(state, dict) or "embeddings.0.weight" not in state:
        raise UserError(f"{path}: not a VGGish state dict (no embeddings.0.weight)")
    model = VGGish(*_widths(state))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise UserError(f"{path}: does not fit VGGish ({first[0].strip()})") from None
    return model.eval()


def random_weights(path: str | Path, small: bool = True, seed: int = 0) -> Path:
    """Write a random-weight VGGish state dict with the published keys (reduced widths when
    `small`) to `path`, for tests and dry runs."""
    torch.manual_seed(seed)
    model = VGGish((4, 4, 8, 8, 8, 8), hidden=16) if small else VGGish()
    torch.save(model.state_dict(), path)
    return Path(path)


@torch.no_grad()
def embed(model: VGGish, wave: np.ndarray | torch.Tensor, sample_rate: int) -> np.ndarray:
    """(examples, 128) embeddings of a 16 kHz clip (one per 0.96 s)."""
    return model(examples(wave, sample_rate)).double().numpy()
