"""Audio codec: AudioLDM2's mel front end, its mel VAE (`AutoencoderKL`) and the HiFi-GAN vocoder."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from transformers import SpeechT5HifiGan
from transformers.audio_utils import mel_filter_bank

from jointdit.codecs.loading import require_folder

# AudioLDM2's front end (its TacotronSTFT settings); a 2 s clip gives 200 frames.
SAMPLE_RATE = 16000
N_FFT = 1024
HOP = 160
WIN = 1024
N_MELS = 64
F_MIN, F_MAX = 0.0, 8000.0
LOG_FLOOR = 1e-5


def mel_filters() -> torch.Tensor:
    """Slaney-normalised slaney-scale mel filters, (513, 64)."""
    fb = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=N_MELS,
        min_frequency=F_MIN,
        max_frequency=F_MAX,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(fb).float()


def magnitude(wave: torch.Tensor) -> torch.Tensor:
    """|STFT| (B, 513, frames) of waveforms (B, N) with AudioLDM2's framing, frames = N // 160.

    Reflect padding of (n_fft - hop) / 2 and center=False reproduce AudioLDM2's TacotronSTFT.
    """
    pad = (N_FFT - HOP) // 2
    x = F.pad(wave.float()[:, None], (pad, pad), mode="reflect")[:, 0]
    window = torch.hann_window(WIN, device=x.device)
    return torch.stft(x, N_FFT, HOP, WIN, window, center=False, return_complex=True).abs()


def log_mel(
    wave: torch.Tensor, filters: torch.Tensor | None = None, soft_floor: bool = False
) -> torch.Tensor:
    """Waveform (N,) or (B,N) at 16 kHz -> log-mel (frames, 64) or (B, frames, 64), frames = N // 160.

    `soft_floor` uses log(mel + 1e-5), which has gradients below the floor (vocoder training).
    """
    filters = mel_filters() if filters is None else filters
    batched = wave.dim() == 2
    spec = magnitude(wave if batched else wave[None])
    mel = filters.to(spec.device).T @ spec
    mel = torch.log(mel + LOG_FLOOR if soft_floor else mel.clamp(min=LOG_FLOOR)).transpose(1, 2)
    return mel if batched else mel[0]


class AudioCodec:
    """Waveform (N,) <-> latents (8, t, 16) scaled by the VAE's scaling_factor, via a log-mel."""

    def __init__(self, vae: AutoencoderKL, vocoder: SpeechT5HifiGan, name: str = ""):
        self.vae = vae.eval().requires_grad_(False)
        self.vocoder = vocoder.eval().requires_grad_(False)
        self.name = name
        self.scaling_factor = float(vae.config.scaling_factor)
        self.time_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)
        self.sample_rate = SAMPLE_RATE
        self.hop = HOP
        self.filters = mel_filters()

    @classmethod
    def from_pretrained(
        cls,
        vae_path: str | Path,
        vocoder_path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> AudioCodec:
        vae_dir = require_folder(vae_path, "audio VAE", "config.json")
        voc_dir = require_folder(vocoder_path, "vocoder", "config.json")
        vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=dtype).to(device)
        vocoder = SpeechT5HifiGan.from_pretrained(voc_dir, dtype=dtype).to(device)
        return cls(vae, vocoder, name=f"{vae_path}+{vocoder_path}")

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Log-mel (frames, 64) of a 16 kHz waveform (N,), frames = N // 160."""
        return log_mel(wave, self.filters)

    def _pad_frames(self, mel: torch.Tensor) -> torch.Tensor:
        # The VAE halves time per level: pad with silence (the log floor) to its multiple.
        extra = -mel.shape[-2] % self.time_factor
        return F.pad(mel, (0, 0, 0, extra), value=float(torch.log(torch.tensor(LOG_FLOOR))))

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, std) of the log-mel, both scaled: (8, t, 16) float32, t = ceil(frames/4)."""
        mel = self._pad_frames(self.mel(wave.cpu()))
        dist = self.vae.encode(mel[None, None].to(self.device, self.dtype)).latent_dist
        return dist.mean[0].float() * self.scaling_factor, dist.std[0].float() * self.scaling_factor

    @torch.no_grad()
    def decode_mel(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (8, t, 16) -> log-mel (t * 4, 64)."""
        z = latents.to(self.device, self.dtype)[None] / self.scaling_factor
        return self.vae.decode(z).sample[0, 0].float()

    @torch.no_grad()
    def vocode(self, mel: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Log-mel (frames, 64) -> waveform (num_samples,), cropped (HiFi-GAN overshoots a little)."""
        wave = self.vocoder(mel.to(self.device, self.vocoder.dtype)[None])[0].float().cpu()
        if wave.shape[0] < num_samples:
            raise ValueError(
                f"vocoder gave {wave.shape[0]} samples for {mel.shape[0]} mel frames; "
                f"{num_samples} requested (latents too short for the clip)"
            )
        return wave[:num_samples]

    def decode(self, latents: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Scaled latents (8, t, 16) -> waveform (num_samples,): VAE -> log-mel -> vocoder -> crop.

        A wave of N samples has N // 160 mel frames, so up to 159 trailing samples have no frame
        of their own: the last frame is repeated for them (encode(w) then decode(.., len(w))
        works for any length).
        """
        mel = self.decode_mel(latents)
        short = math.ceil(num_samples / self.hop) - mel.shape[0]
        if short == 1:
            mel = torch.cat([mel, mel[-1:]])
        return self.vocode(mel, num_samples)
