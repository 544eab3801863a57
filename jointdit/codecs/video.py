"""Video codec: SVD's temporal VAE (`AutoencoderKLTemporalDecoder`): encode per frame, decode whole clips
(or in chunks, a memory lever)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLTemporalDecoder

from jointdit.codecs.loading import require_folder


class VideoCodec:
    """Frames (T,3,H,W) in [-1,1] <-> latents (T,4,H/f,W/f) scaled by the VAE's scaling_factor."""

    def __init__(
        self,
        vae: AutoencoderKLTemporalDecoder,
        decode_chunk: int = 0,
        encode_batch: int = 16,
        name: str = "",
    ):
        self.vae = vae.eval().requires_grad_(False)
        self.decode_chunk = decode_chunk
        self.encode_batch = encode_batch
        self.name = name
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.spatial_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        decode_chunk: int = 0,
        encode_batch: int = 16,
    ) -> VideoCodec:
        folder = require_folder(path, "video VAE", "config.json")
        vae = AutoencoderKLTemporalDecoder.from_pretrained(folder, torch_dtype=dtype).to(device)
        return cls(vae, decode_chunk, encode_batch, name=str(path))

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @torch.no_grad()
    def _posterior(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The encoder has no temporal layers, so batching frames is exact and bounds memory.
        means, stds = [], []
        for chunk in frames.split(self.encode_batch):
            dist = self.vae.encode(chunk.to(self.device, self.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)

    def encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, std) of each frame, both scaled: (T,4,h,w) float32 on the codec device."""
        mean, std = self._posterior(frames)
        return mean * self.scaling_factor, std * self.scaling_factor

    def encode_first_frame(
        self, frame: torch.Tensor, noise_aug: float = 0.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The conditioning latent of one frame (3,H,W) in [-1,1], as SVD's pipeline makes it:
        the posterior mode (= mean) of `frame + noise_aug * N(0, 1)` (pixel-space noise from
        `generator`, on the generator's device as the pipeline draws it), NOT scaled: SVD
        conditions its UNet on it unscaled."""
        device = frame.device if generator is None else generator.device
        noise = torch.randn(frame.shape, generator=generator, device=device)
        mean, _ = self._posterior((frame.to(device).float() + noise_aug * noise)[None])
        return mean[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Scaled latents (T,4,h,w) -> frames (T,3,H,W) in [-1,1]: the whole clip in one pass, as
        SVD's pipeline decodes it, or `chunk` frames at a time (0 / None: `decode_chunk`).

        SVD's decoder has temporal layers and needs `num_frames`; each chunk is decoded as its own
        short clip, so peak memory follows the chunk, not the clip, but frames near a chunk's
        edge differ from the one-pass decode (a memory lever, not exact).
        """
        chunk = chunk or self.decode_chunk or latents.shape[0]
        z = latents.to(self.device, self.dtype) / self.scaling_factor
        out = [
            self.vae.decode(part, num_frames=part.shape[0]).sample.float().clamp(-1, 1).cpu()
            for part in z.split(chunk)
        ]
        return torch.cat(out)
