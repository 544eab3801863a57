"""I3D (Inception-v1 inflated to 3-D, trained on Kinetics-400): the network behind FVD.

Two published weight files are in use. Both hold DeepMind's TF-Hub I3D, but each paper family
pairs its file with its own preprocessing, and an FVD is only comparable with numbers computed
the same way, so `features` applies the convention of the file it was given:

- ``i3d_torchscript.pt`` (StyleGAN-V's TorchScript port; ASVA's AVSync15 FVD). As ASVA: frames
  resized to 224x224 (bicubic, antialiased, aspect ratio not kept), [0, 1] mapped to [-1, 1],
  then ``net(x, rescale=False, resize=False, return_features=True)``: the 400 logits before the
  softmax.
- ``i3d_pretrained_400.pt`` (VideoGPT's conversion to piergiaj's ``InceptionI3d``; used by
  VideoGPT, TATS, MM-Diffusion, BridgeDiT). As VideoGPT: the short side scaled to 224 (bilinear,
  long side rounded up), a centre crop, [-1, 1]; the feature is the 400 logits averaged over
  time. (TATS resizes straight to 224x224; on square frames, as in the AVSync15 protocol, the
  two agree.)

`load` tells the two apart by content (a TorchScript archive holds ``constants.pkl``), not by
name. The state-dict form is built here in plain torch under the published key names.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jointdit.errors import UserError
from jointdit.evaluation.state_dicts import check_state_dict, read_state_dict

SIZE = 224
NUM_CLASSES = 400
# Three stride-2 stages leave ceil(T / 8) time steps, and the final 2x7x7 average pool needs two.
MIN_FRAMES = 9
SMALL_WIDTH_DIVISOR = 8  # random_weights(small=True): every width / 8 (all published widths divide)

# Inception modules in order: name -> widths of (1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | pool -> 1x1).
_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


def _same_padding(x: torch.Tensor, kernel: list[int], stride: list[int]) -> torch.Tensor:
    """Zero-pad (T, H, W) as TensorFlow's "SAME" does (the odd pixel goes after), as the TF-Hub
    network was trained with."""
    pads: list[int] = []
    for i in [2, 1, 0]:  # F.pad lists the last dimension first
        n, k, s = x.shape[2 + i], kernel[i], stride[i]
        total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pads.append(total // 2)
        pads.append(total - total // 2)
    return F.pad(x, pads)


class _Unit3d(nn.Module):
    """Conv3d with "SAME" padding, then BatchNorm and ReLU (the logits layer: a biased conv only)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, logits: bool = False):
        super().__init__()
        self.kernel = [kernel] * 3
        self.stride = [stride] * 3
        self.logits = logits
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, bias=logits)
        # eps 1e-5 as VideoGPT / TATS run the converted file (the TF original used 1e-3).
        self.bn = nn.Identity() if logits else nn.BatchNorm3d(cout, eps=1e-5, momentum=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv3d(_same_padding(x, self.kernel, self.stride)))
        return x if self.logits else F.relu(x)


class _MaxPool3dSame(nn.Module):
    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel = list(kernel)
        self.stride = list(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_same_padding(x, self.kernel, self.stride), self.kernel, self.stride)


class _Mixed(nn.Module):
    """An Inception module: four branches concatenated on channels."""

    def __init__(self, cin: int, widths: tuple[int, ...]):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.b0 = _Unit3d(cin, w0)
        self.b1a = _Unit3d(cin, w1a)
        self.b1b = _Unit3d(w1a, w1b, kernel=3)
        self.b2a = _Unit3d(cin, w2a)
        self.b2b = _Unit3d(w2a, w2b, kernel=3)
        self.b3a = _MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = _Unit3d(cin, w3b)
        self.width = w0 + w1b + w2b + w3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))]
        return torch.cat(branches, dim=1)


class InceptionI3d(nn.Sequential):
    """The I3D classifier on (B, 3, T, 224, 224) in [-1, 1] -> (B, 400) logits averaged over time.

    Stages carry the TF graph's names, so the state-dict keys are those of
    ``i3d_pretrained_400.pt``; `width_divisor` shrinks every width for tests.
    """

    def __init__(self, width_divisor: int = 1):
        d = width_divisor
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        stages["Conv3d_1a_7x7"] = _Unit3d(3, 64 // d, kernel=7, stride=2)
        stages["MaxPool3d_2a_3x3"] = _MaxPool3dSame((1, 3, 3), (1, 2, 2))
        stages["Conv3d_2b_1x1"] = _Unit3d(64 // d, 64 // d)
        stages["Conv3d_2c_3x3"] = _Unit3d(64 // d, 192 // d, kernel=3)
        width = 192 // d
        pools = {
            "Mixed_3b": ("MaxPool3d_3a_3x3", (1, 3, 3), (1, 2, 2)),
            "Mixed_4b": ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
            "Mixed_5b": ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
        }
        for name, widths in _MIXED.items():
            if name in pools:
                pool, kernel, stride = pools[name]
                stages[pool] = _MaxPool3dSame(kernel, stride)
            stages[name] = _Mixed(width, tuple(w // d for w in widths))
            width = stages[name].width
        stages["avg_pool"] = nn.AvgPool3d((2, 7, 7), stride=1)
        stages["logits"] = _Unit3d(width, NUM_CLASSES, logits=True)
        super().__init__(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self:
            x = stage(x)
        return x.mean(dim=(2, 3, 4))  # 1x1 in space at 224 px; the time steps are averaged


class I3D(nn.Module):
    """A loaded I3D and the convention of its file (see the module docstring)."""

    def __init__(self, net: nn.Module, torchscript: bool, path: Path):
        super().__init__()
        self.net = net
        self.torchscript = torchscript
        self.path = path


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[-1] == "constants.pkl" for name in archive.namelist())


def load(path: str | Path) -> I3D:
    """Load ``i3d_torchscript.pt`` (TorchScript) or ``i3d_pretrained_400.pt`` (state dict, or a
    `random_weights` file), in eval mode on the CPU; a UserError names a missing or foreign file
    and the first key that differs."""
    path = Path(path)
    if path.is_file() and _is_torchscript(path):
        try:
            with warnings.catch_warnings():  # the published file is TorchScript; no other way in
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                net = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:  # a damaged archive
            raise UserError(f"{path}: not a loadable TorchScript I3D ({err})") from None
        return I3D(net.eval(), torchscript=True, path=path)
    state = read_state_dict(path, "I3D")
    first = state.get("Conv3d_1a_7x7.conv3d.weight")
    width = first.shape[0] if first is not None and first.ndim == 5 else 64
    net = InceptionI3d(width_divisor=64 // width if width and 64 % width == 0 else 1)
    # The published file was converted from TF variables and has no num_batches_tracked.
    check_state_dict(state, net, path, "I3D", optional=("num_batches_tracked",))
    net.load_state_dict(state, strict=False)
    return I3D(net.eval(), torchscript=False, path=path)


def random_weights(path: str | Path, small: bool = True, seed: int = 0) -> Path:
    """Write an ``i3d_pretrained_400.pt``-style file of random weights (the published keys;
    every width / 8 when `small`, the published shapes otherwise) for tests and demos."""
    path = Path(path)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = InceptionI3d(width_divisor=SMALL_WIDTH_DIVISOR if small else 1)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def preprocess(videos: torch.Tensor, torchscript: bool) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float (B, 3, T, 224, 224) in [-1, 1], as the file's reference
    code prepares it (ASVA for the TorchScript file, VideoGPT for the state dict)."""
    b, t, h, w, _ = videos.shape
    frames = videos.reshape(b * t, h, w, 3).permute(0, 3, 1, 2).float() / 255
    if torchscript:
        frames = F.interpolate(
            frames, size=(SIZE, SIZE), mode="bicubic", align_corners=False, antialias=True
        )
    else:
        scale = SIZE / min(h, w)
        size = (SIZE, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), SIZE)
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
        top, left = (frames.shape[2] - SIZE) // 2, (frames.shape[3] - SIZE) // 2
        frames = frames[:, :, top : top + SIZE, left : left + SIZE]
    return (frames * 2 - 1).reshape(b, t, 3, SIZE, SIZE).transpose(1, 2)


def _as_videos(videos) -> torch.Tensor:
    if isinstance(videos, np.ndarray):
        videos = torch.from_numpy(videos)
    if not torch.is_tensor(videos) or videos.dtype != torch.uint8:
        raise UserError(f"I3D features take uint8 videos, got {getattr(videos, 'dtype', videos)}")
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise UserError(
            f"I3D features take videos shaped (B, T, H, W, 3), got {tuple(videos.shape)}"
        )
    return videos


@torch.no_grad()
def features(model: I3D, videos, batch_size: int = 8) -> torch.Tensor:
    """FVD features (B, 400) float32 of uint8 videos (B, T, H, W, 3), by the file's convention."""
    videos = _as_videos(videos)
    if not model.torchscript and videos.shape[1] < MIN_FRAMES:
        raise UserError(
            f"I3D ({model.path.name}) needs at least {MIN_FRAMES} frames per video, "
            f"got {videos.shape[1]}"
        )
    device = next(model.net.parameters()).device
    out = []
    for chunk in videos.split(batch_size):
        x = preprocess(chunk, model.torchscript).to(device)
        if model.torchscript:
            out.append(model.net(x, rescale=False, resize=False, return_features=True))
        else:
            out.append(model.net(x))
    return torch.cat(out).float().cpu()
