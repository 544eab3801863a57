"""Conditions: CLIP image embedding of the first frame (SVD's image encoder) and CLIP text token states."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from jointdit.codecs.loading import require_folder


def svd_resize(pictures: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pictures (B,3,H,W) -> (B,3,*size) as SVD's pipeline resizes them for CLIP: along each
    axis (width first) a Gaussian blur with sigma = (in/out - 1)/2 (at least 0.001) over an odd
    window of 4 sigma (at least 3 taps, reflected borders), then bicubic with aligned corners."""
    x = pictures
    for axis, out in ((3, size[1]), (2, size[0])):
        sigma = max((x.shape[axis] / out - 1) / 2, 0.001)
        taps = int(max(4 * sigma, 3)) | 1
        offsets = torch.arange(taps, dtype=x.dtype, device=x.device) - taps // 2
        kernel = torch.exp(-offsets.pow(2) / (2 * sigma**2))
        kernel = (kernel / kernel.sum()).view(1, 1, *((1, taps) if axis == 3 else (taps, 1)))
        pad = (taps // 2,) * 2
        padded = F.pad(x, (*pad, 0, 0) if axis == 3 else (0, 0, *pad), mode="reflect")
        x = F.conv2d(padded.flatten(0, 1)[:, None], kernel).view(x.shape)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=True)


def _read_preprocessing(folder: Path) -> tuple[tuple[int, int], list[float], list[float]]:
    """(crop size, mean, std) from a CLIP image processor's preprocessor_config.json."""
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    crop = cfg.get("crop_size", 224)
    size = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
    return size, list(cfg["image_mean"]), list(cfg["image_std"])


class ConditionEncoder:
    """CLIP image embeddings (image_dim,) and text token states (L, text_dim) with their mask.

    The image is preprocessed the way SVD's pipeline does, with its own resize (a Gaussian blur,
    then bicubic with aligned corners, of the whole picture to the crop size: no crop, the
    aspect is squashed), then the processor's mean/std; no torchvision needed.
    """

    def __init__(
        self,
        image_encoder: CLIPVisionModelWithProjection,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        crop_size: tuple[int, int],
        mean: list[float],
        std: list[float],
        name: str = "",
    ):
        self.image_encoder = image_encoder.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.crop_size = crop_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.name = name
        self.image_dim = int(image_encoder.config.projection_dim)
        self.text_dim = int(text_encoder.config.hidden_size)
        self.max_text_len = min(
            int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings)
        )

    @classmethod
    def from_pretrained(
        cls,
        image_encoder: str | Path,
        feature_extractor: str | Path,
        text_encoder: str | Path,
        tokenizer: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ConditionEncoder:
        img_dir = require_folder(image_encoder, "CLIP image encoder", "config.json")
        fe_dir = require_folder(
            feature_extractor, "CLIP feature extractor", "preprocessor_config.json"
        )
        txt_dir = require_folder(text_encoder, "CLIP text encoder", "config.json")
        tok_dir = require_folder(tokenizer, "CLIP tokenizer", "tokenizer_config.json")
        vision = CLIPVisionModelWithProjection.from_pretrained(img_dir, dtype=dtype).to(device)
        text = CLIPTextModelWithProjection.from_pretrained(txt_dir, dtype=dtype).to(device)
        tok = CLIPTokenizer.from_pretrained(tok_dir)
        size, mean, std = _read_preprocessing(fe_dir)
        return cls(vision, text, tok, size, mean, std, name=f"{image_encoder}+{text_encoder}")

    @property
    def device(self) -> torch.device:
        return self.image_encoder.device

    @torch.no_grad()
    def images(self, frames: torch.Tensor) -> torch.Tensor:
        """Pictures (B,3,H,W) in [-1,1], any size -> CLIP image embeddings (B, image_dim) float32."""
        x = svd_resize(frames.float(), self.crop_size)
        x = ((x + 1) / 2 - self.mean) / self.std
        x = x.to(self.device, self.image_encoder.dtype)
        return self.image_encoder(pixel_values=x).image_embeds.float()

    def image(self, frame: torch.Tensor) -> torch.Tensor:
        """One picture (3,H,W) in [-1,1] -> (image_dim,)."""
        return self.images(frame[None])[0]

    @torch.no_grad()
    def text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (token states (B, L, text_dim) float32, mask (B, L) int64), L = max_text_len."""
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_text_len,
            truncation=True,
            return_tensors="pt",
        )
        out = self.text_encoder(
            input_ids=tok.input_ids.to(self.device),
            attention_mask=tok.attention_mask.to(self.device),
        )
        return out.last_hidden_state.float(), tok.attention_mask.long()
