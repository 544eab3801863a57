"""ImageBind-huge's vision, audio and text encoders, loading ``imagebind_huge.pth`` as published.

ImageBind embeds images, sounds and text in one 1024-d space; the AVSync15 papers score
generated clips by the cosine of a frame's and the audio's embeddings (image-audio, video-audio,
image-text, ...). Built here in plain torch under the published key names (the file's depth,
thermal and IMU parts are skipped). The weights are CC BY-NC-SA 4.0 (non-commercial).

Inputs are prepared as ImageBind's own ``data.py`` does:
- frames: the short side resized to 224 (bicubic, antialiased), a centre crop, CLIP's mean/std;
  a still image enters the video stem as a clip of two equal frames;
- audio: 16 kHz; three 2 s clips placed evenly over the sound (pytorchvideo's
  ConstantClipsPerVideoSampler); per clip the mean removed, Kaldi's 128-bin log mel filterbank
  (25 ms Hann windows every 10 ms, as ``torchaudio.compliance.kaldi.fbank``), cut or zero-padded
  to 204 frames, then (x + 4.268) / 9.138;
- text: CLIP's BPE (the repo's copy of the vocabulary), start and end tokens, 77 ids zero-padded.
Embeddings are L2-normalised as ImageBind's postprocessors do; the logit scales ImageBind then
multiplies in (audio 20, text learned) are left out, as ASVA divides them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jointdit.errors import UserError
from jointdit.evaluation.state_dicts import check_state_dict, read_state_dict

SAMPLE_RATE = 16000
IMAGE_SIZE = 224
PATCH = 14
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NUM_MEL_BINS = 128
TARGET_FRAMES = 204
AUDIO_PATCH, AUDIO_STRIDE = 16, 10
FBANK_MEAN, FBANK_STD = -4.268, 9.138
CLIP_SECONDS, CLIPS_PER_SOUND = 2, 3
CONTEXT_LENGTH, VOCAB_SIZE = 77, 49408
# Head widths of the published model (1280 / 16 heads, 768 / 12, 1024 / 16); a file's widths
# give the head counts, so reduced test sizes keep them.
HEAD_WIDTHS = {"vision": 80, "audio": 64, "text": 64}
MODALITIES = tuple(HEAD_WIDTHS)
SKIPPED_MODALITIES = ("depth", "thermal", "imu")


@dataclass(frozen=True)
class Size:
    widths: dict[str, int]  # modality -> trunk width
    depths: dict[str, int]  # modality -> trunk blocks
    embed_dim: int = 1024


HUGE = Size(
    widths={"vision": 1280, "audio": 768, "text": 1024},
    depths={"vision": 32, "audio": 12, "text": 24},
)
SMALL = Size(
    widths={"vision": 160, "audio": 128, "text": 128}, depths={"vision": 2, "audio": 2, "text": 2}
)


class _Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    """Pre-norm transformer block. The audio trunk's attention appends a learned key/value pair
    (``add_bias_kv``), which nn.MultiheadAttention implements as the original does."""

    def __init__(self, width: int, heads: int, bias_kv: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, add_bias_kv=bias_kv, batch_first=True)
        self.norm_1 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = _Mlp(width)
        self.norm_2 = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.norm_2(x))


class _Trunk(nn.Module):
    def __init__(
        self, width: int, depth: int, heads: int, pre_norm: bool = False, bias_kv: bool = False
    ):
        super().__init__()
        self.pre_transformer_layer = (
            nn.Sequential(nn.LayerNorm(width, eps=1e-6)) if pre_norm else nn.Identity()
        )
        self.blocks = nn.Sequential(*[_Block(width, heads, bias_kv) for _ in range(depth)])

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.pre_transformer_layer(tokens)
        for block in self.blocks:
            tokens = block(tokens, mask)
        return tokens


class _ImageAsClip(nn.Module):
    """(N, 3, H, W) -> (N, 3, 2, H, W): the video stem sees a still image as two equal frames."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(2).repeat(1, 1, 2, 1, 1)


class _Stem(nn.Module):
    """Patchify to tokens (N, L, width), then an optional LayerNorm."""

    def __init__(self, proj: nn.Module, norm_layer: nn.Module | None = None):
        super().__init__()
        self.proj = proj
        self.norm_layer = norm_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return tokens if self.norm_layer is None else self.norm_layer(tokens)


class _PosEmbedding(nn.Module):
    def __init__(self, num_tokens: int, width: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, width))


class _Tokens(nn.Module):
    """Stem tokens behind a class token, plus learned positions (inputs have the trained size,
    so no interpolation is ever needed)."""

    def __init__(self, stem: _Stem, num_patches: int, width: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.rgbt_stem = stem
        self.pos_embedding_helper = _PosEmbedding(1 + num_patches, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.rgbt_stem(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        return tokens + self.pos_embedding_helper.pos_embed


class _TextTokens(nn.Module):
    """Token and position embeddings; the causal mask is a buffer of the published file."""

    def __init__(self, width: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, CONTEXT_LENGTH, width))
        causal = torch.full((CONTEXT_LENGTH, CONTEXT_LENGTH), float("-inf")).triu(1)
        self.register_buffer("mask", causal)
        self.token_embedding = nn.Embedding(VOCAB_SIZE, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.pos_embed


class _ClassToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class _EndTokenHead(nn.Module):
    """The text embedding is read at the end token (the highest id in each row), as CLIP's."""

    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(width, eps=1e-6), nn.Linear(width, embed_dim, bias=False)
        )

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden[torch.arange(len(hidden)), ids.argmax(dim=-1)])


class _LogitScale(nn.Module):
    """Holds a logit scale of the published file so it loads as it is (see the module doc)."""

    def __init__(self, scale: float):
        super().__init__()
        self.register_buffer("log_logit_scale", torch.tensor(math.log(scale)))


def _head(width: int, embed_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(width, eps=1e-6), _ClassToken(), nn.Linear(width, embed_dim, bias=False)
    )


def _audio_grid() -> int:
    """Patches of the (128 mel x 204 frame) spectrogram: 12 x 19."""
    rows = (NUM_MEL_BINS - AUDIO_PATCH) // AUDIO_STRIDE + 1
    cols = (TARGET_FRAMES - AUDIO_PATCH) // AUDIO_STRIDE + 1
    return rows * cols


class ImageBind(nn.Module):
    """ImageBind's vision, audio and text encoders; `encode(modality, x)` gives unit vectors."""

    def __init__(self, size: Size = HUGE):
        super().__init__()
        self.size = size
        v, a, t = (size.widths[m] for m in MODALITIES)
        heads = {m: size.widths[m] // HEAD_WIDTHS[m] for m in MODALITIES}
        vision_stem = _Stem(
            nn.Sequential(
                _ImageAsClip(), nn.Conv3d(3, v, (2, PATCH, PATCH), (2, PATCH, PATCH), bias=False)
            )
        )
        audio_stem = _Stem(nn.Conv2d(1, a, AUDIO_PATCH, AUDIO_STRIDE, bias=False), nn.LayerNorm(a))
        self.modality_preprocessors = nn.ModuleDict(
            {
                "vision": _Tokens(vision_stem, (IMAGE_SIZE // PATCH) ** 2, v),
                "audio": _Tokens(audio_stem, _audio_grid(), a),
                "text": _TextTokens(t),
            }
        )
        self.modality_trunks = nn.ModuleDict(
            {
                "vision": _Trunk(v, size.depths["vision"], heads["vision"], pre_norm=True),
                "audio": _Trunk(a, size.depths["audio"], heads["audio"], bias_kv=True),
                "text": _Trunk(t, size.depths["text"], heads["text"]),
            }
        )
        self.modality_heads = nn.ModuleDict(
            {
                "vision": _head(v, size.embed_dim),
                "audio": _head(a, size.embed_dim),
                "text": _EndTokenHead(t, size.embed_dim),
            }
        )
        self.modality_postprocessors = nn.ModuleDict(
            {
                "audio": nn.Sequential(nn.Identity(), _LogitScale(20.0)),
                "text": nn.Sequential(nn.Identity(), _LogitScale(1 / 0.07)),
            }
        )

    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        tokens = self.modality_preprocessors[modality](x)
        if modality == "text":  # causal attention, read at the end token
            hidden = self.modality_trunks["text"](tokens, self.modality_preprocessors["text"].mask)
            return F.normalize(self.modality_heads["text"](hidden, x), dim=-1)
        embedding = self.modality_heads[modality](self.modality_trunks[modality](tokens))
        return F.normalize(embedding, dim=-1)


def _size_of(state: dict[str, torch.Tensor], path: Path) -> Size:
    """The widths and depths a state dict was saved at (published head widths assumed)."""

    def width(modality: str) -> int:
        norm = state.get(f"modality_trunks.{modality}.blocks.0.norm_1.weight")
        return norm.shape[0] if norm is not None and norm.ndim == 1 else HUGE.widths[modality]

    def depth(modality: str) -> int:
        prefix = f"modality_trunks.{modality}.blocks."
        found = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
        return max(found) + 1 if found else HUGE.depths[modality]

    head = state.get("modality_heads.vision.2.weight")
    size = Size(
        widths={m: width(m) for m in MODALITIES},
        depths={m: depth(m) for m in MODALITIES},
        embed_dim=head.shape[0] if head is not None and head.ndim == 2 else HUGE.embed_dim,
    )
    for modality, w in size.widths.items():
        if w % HEAD_WIDTHS[modality]:
            raise UserError(
                f"{path}: {modality} width {w} is not a multiple of ImageBind's head width "
                f"{HEAD_WIDTHS[modality]}"
            )
    return size


def _modality(key: str) -> str:
    """'modality_trunks.audio.blocks.0...' -> 'audio'."""
    parts = key.split(".")
    return parts[1] if len(parts) > 1 else ""


def load(path: str | Path) -> ImageBind:
    """Load ``imagebind_huge.pth`` (or a `random_weights` file) in eval mode on the CPU; a
    UserError names a missing or foreign file and the first key that differs."""
    path = Path(path)
    state = read_state_dict(path, "ImageBind")
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in state.items()
        if _modality(k) not in SKIPPED_MODALITIES
    }
    with torch.device("meta"):  # the file supplies every tensor; skip a 700 M-parameter init
        model = ImageBind(_size_of(state, path))
    check_state_dict(state, model, path, "ImageBind")
    model.load_state_dict(state, assign=True)
    return model.eval()


def random_weights(path: str | Path, small: bool = True, seed: int = 0) -> Path:
    """Write an ``imagebind_huge.pth``-style file of random weights (the published vision, audio
    and text keys; reduced widths and depths when `small`, the published shapes otherwise)."""
    path = Path(path)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ImageBind(SMALL if small else HUGE)
        for name, param in model.named_parameters():
            if name.endswith(("cls_token", "pos_embed", "token_embedding.weight")):
                nn.init.normal_(param, std=0.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def preprocess_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, 224, 224): short side to 224 (bicubic, antialiased;
    the long side truncated as torchvision's Resize), centre crop, CLIP normalisation."""
    h, w = frames.shape[1:3]
    x = frames.permute(0, 3, 1, 2).float() / 255
    short, long = min(h, w), max(h, w)
    new_long = int(IMAGE_SIZE * long / short)
    size = (IMAGE_SIZE, new_long) if h <= w else (new_long, IMAGE_SIZE)
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    top = int(round((x.shape[2] - IMAGE_SIZE) / 2.0))
    left = int(round((x.shape[3] - IMAGE_SIZE) / 2.0))
    x = x[:, :, top : top + IMAGE_SIZE, left : left + IMAGE_SIZE]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def embed_vision(model: ImageBind, frames, batch_size: int = 16) -> torch.Tensor:
    """Unit embeddings (N, 1024) float32 of uint8 frames (N, H, W, 3), each frame an image."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if not torch.is_tensor(frames) or frames.dtype != torch.uint8:
        raise UserError(f"ImageBind frames must be uint8, got {getattr(frames, 'dtype', frames)}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise UserError(f"ImageBind frames must be shaped (N, H, W, 3), got {tuple(frames.shape)}")
    device = _device(model)
    out = [
        model.encode("vision", preprocess_frames(chunk).to(device))
        for chunk in frames.split(batch_size)
    ]
    return torch.cat(out).float().cpu()


def _kaldi_mel_banks(num_bins: int, n_fft: int, sample_rate: int) -> torch.Tensor:
    """Kaldi's triangular filters (num_bins, n_fft // 2 + 1), 20 Hz to Nyquist, evenly spaced on
    the mel scale 1127 ln(1 + f / 700); the Nyquist bin gets weight 0, as in Kaldi."""

    def mel(f):
        return 1127.0 * torch.log1p(f / 700.0)

    low = mel(torch.tensor(20.0, dtype=torch.float64))
    high = mel(torch.tensor(sample_rate / 2, dtype=torch.float64))
    delta = (high - low) / (num_bins + 1)
    left = low + delta * torch.arange(num_bins, dtype=torch.float64)[:, None]
    center, right = left + delta, left + 2 * delta
    bins = mel(sample_rate / n_fft * torch.arange(n_fft // 2, dtype=torch.float64))[None]
    up, down = (bins - left) / (center - left), (right - bins) / (right - center)
    return F.pad(torch.clamp(torch.minimum(up, down), min=0.0), (0, 1))


def kaldi_fbank(
    wave: torch.Tensor,
    sample_rate: int = SAMPLE_RATE,
    num_mel_bins: int = NUM_MEL_BINS,
    frame_length_ms: int = 25,
    frame_shift_ms: int = 10,
) -> torch.Tensor:
    """Kaldi's log mel filterbank (frames, num_mel_bins) of a mono wave, with the options
    ImageBind gives torchaudio.compliance.kaldi.fbank: 25 ms "hanning" windows every 10 ms
    (snip_edges), the frame's DC removed, pre-emphasis 0.97, a power spectrum zero-padded to a
    power of two (512 points), no dither, no energy, log floored at float32's eps. Computed in
    float64, returned as float32. (Kaldi itself refuses 128 bins on 512 points because the lowest
    filters catch no FFT bin; torchaudio, and so ImageBind, let those rows sit at the floor.)"""
    win = sample_rate * frame_length_ms // 1000
    hop = sample_rate * frame_shift_ms // 1000
    if wave.numel() < win:
        raise UserError(
            f"ImageBind audio: {wave.numel()} samples is shorter than one "
            f"{frame_length_ms} ms window"
        )
    frames = wave.double().unfold(0, win, hop)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # Kaldi repeats the first sample
    window = torch.hann_window(win, periodic=False, dtype=torch.float64)  # Kaldi's "hanning"
    frames = (frames - 0.97 * previous) * window
    n_fft = 1 << (win - 1).bit_length()
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2)
    mel = power @ _kaldi_mel_banks(num_mel_bins, n_fft, sample_rate).T
    return mel.clamp_min(torch.finfo(torch.float32).eps).log().float()


def audio_clips(num_samples: int, sample_rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """Sample ranges of ImageBind's three 2 s clips: starts evenly spaced from 0 to the last
    whole clip (all at 0 for sounds of 2 s or less), in exact fractions as pytorchvideo's
    ConstantClipsPerVideoSampler; a range may run past the end (the clip is then shorter)."""
    duration = Fraction(num_samples / sample_rate)  # the float duration, exactly, as the original
    step = max(duration - CLIP_SECONDS, 0) / max(CLIPS_PER_SOUND - 1, 1)
    starts = [step * i for i in range(CLIPS_PER_SOUND)]
    return [(int(s * sample_rate), int((s + CLIP_SECONDS) * sample_rate)) for s in starts]


def melspec(clip: torch.Tensor) -> torch.Tensor:
    """One clip (samples at 16 kHz) -> the normalised (1, 128, 204) input of the audio stem."""
    fbank = kaldi_fbank(clip - clip.mean()).T
    pad = TARGET_FRAMES - fbank.shape[1]
    fbank = F.pad(fbank, (0, pad)) if pad > 0 else fbank[:, :TARGET_FRAMES]
    return ((fbank - FBANK_MEAN) / FBANK_STD).unsqueeze(0)


def resample(wave: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Band-limited resampling as torchaudio.functional.resample's defaults (what ImageBind
    calls): a Hann-windowed sinc, 6 zero crossings, cut-off at 0.99 of the lower Nyquist."""
    if orig == new:
        return wave
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    zeros, rolloff = 6, 0.99
    base = min(orig, new) * rolloff
    width = math.ceil(zeros * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None] / orig
    t = (-torch.arange(new, dtype=torch.float64)[:, None] / new + idx) * base
    t = t.clamp(-zeros, zeros)
    window = torch.cos(t * math.pi / zeros / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, 1.0, t))
    kernel = (sinc * window * base / orig).to(wave.dtype)
    length = wave.numel()
    x = F.pad(wave[None, None], (width, width + orig))
    out = F.conv1d(x, kernel[:, None], stride=orig)  # (1, new, steps)
    out = out[0].T.reshape(-1)
    return out[: math.ceil(new * length / orig)]


@torch.no_grad()
def embed_audio(model: ImageBind, wave, sr: int) -> torch.Tensor:
    """The embedding (1024,) float32 of a mono float wave at `sr` Hz (resampled to 16 kHz):
    ImageBind's output, the mean of its three clips' unit embeddings, with the logit scale left
    out. It has unit length when the clips coincide (sounds of 2 s or less, the AVSync15
    protocol); compare longer sounds by cosine."""
    if isinstance(wave, np.ndarray):
        wave = torch.from_numpy(wave)
    if not torch.is_tensor(wave) or not wave.is_floating_point() or wave.ndim != 1:
        raise UserError(
            f"ImageBind audio must be a 1-D float wave, got {getattr(wave, 'shape', wave)}"
        )
    if not torch.isfinite(wave).all():
        raise UserError("ImageBind audio holds NaN or inf samples")
    if int(sr) != sr or sr <= 0:
        raise UserError(f"ImageBind audio: sample rate must be a positive integer, got {sr}")
    wave = resample(wave.float(), int(sr), SAMPLE_RATE)
    specs = torch.stack([melspec(wave[a:b]) for a, b in audio_clips(wave.numel())])
    return model.encode("audio", specs.to(_device(model))).mean(dim=0).float().cpu()


@lru_cache(maxsize=1)
def _tokenizer():
    from jointdit.codecs.clip_tokenizer import build_clip_tokenizer  # imports transformers

    return build_clip_tokenizer(CONTEXT_LENGTH)


def tokenize(texts: list[str]) -> torch.Tensor:
    """ImageBind's text ids (N, 77): start token, CLIP BPE ids (truncated to fit), end token,
    zeros after it (the same ids as ImageBind's SimpleTokenizer)."""
    tokenizer = _tokenizer()
    ids = torch.zeros(len(texts), CONTEXT_LENGTH, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = tokenizer(text, truncation=True, max_length=CONTEXT_LENGTH)["input_ids"]
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids


@torch.no_grad()
def embed_text(model: ImageBind, texts: list[str]) -> torch.Tensor:
    """Unit embeddings (N, 1024) float32 of captions (AVSync15's are class names)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise UserError(f"ImageBind text takes a list of strings, got {texts!r}")
    return model.encode("text", tokenize(list(texts)).to(_device(model))).float().cpu()
