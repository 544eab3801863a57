"""Text scores with transformers' own classes: CLIP text-frame and CLAP text-audio similarity.

The weights are folders the user places under the weights folder (`clip/`, `clap/`: a model
repo saved as it is published, config + weights + tokenizer + processor files), read with
`from_pretrained(..., local_files_only=True)`: never fetched.

- CLIP score: cosine of the caption's embedding with each frame's, averaged over the frames
  (CLIP's own preprocessing: shorter side to 224 bicubic, centre crop, CLIP mean/std).
- CLAP score: cosine of the caption's embedding with the clip's audio embedding, the audio
  resampled to the extractor's rate (48 kHz) and repeat-padded to its 10 s, as LAION-CLAP does.
Both are reported as plain cosines in [-1, 1] (some papers print them x100).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.signal import resample_poly

from jointdit.errors import UserError


@dataclass
class TextScorer:
    """A text-image or text-audio model with its tokenizer and input processor."""

    model: Any
    tokenizer: Any
    processor: Any


def _from_folder(path: Path, model_cls: Any, processor_cls: Any) -> TextScorer:
    from transformers import AutoTokenizer

    try:
        return TextScorer(
            model_cls.from_pretrained(path, local_files_only=True).eval(),
            AutoTokenizer.from_pretrained(path, local_files_only=True),
            processor_cls.from_pretrained(path, local_files_only=True),
        )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: not a complete {model_cls.__name__} folder ({first})") from None


def load_clip(path: str | Path) -> TextScorer:
    from transformers import CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return _from_folder(Path(path), CLIPModel, CLIPImageProcessorPil)


def load_clap(path: str | Path) -> TextScorer:
    from transformers import ClapFeatureExtractor, ClapModel

    return _from_folder(Path(path), ClapModel, ClapFeatureExtractor)


def _unit(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):  # transformers 5 returns a model output here
        x = x.pooler_output
    return torch.nn.functional.normalize(x.double(), dim=-1)


def _text(scorer: TextScorer, text: str, get: str) -> torch.Tensor:
    tokens = scorer.tokenizer([text], padding=True, truncation=True, return_tensors="pt")
    return _unit(getattr(scorer.model, get)(**tokens))[0]


@torch.no_grad()
def clip_score(scorer: TextScorer, frames: np.ndarray, text: str) -> float:
    """Mean over frames (uint8 (T, H, W, 3)) of cos(CLIP(text), CLIP(frame))."""
    pixels = scorer.processor(images=list(frames), return_tensors="pt")["pixel_values"]
    images = _unit(scorer.model.get_image_features(pixel_values=pixels))
    return float((images @ _text(scorer, text, "get_text_features")).mean())


@torch.no_grad()
def clap_score(scorer: TextScorer, wave: np.ndarray, sample_rate: int, text: str) -> float:
    """cos(CLAP(text), CLAP(audio)) for a mono waveform at `sample_rate`."""
    extractor = scorer.processor
    ratio = Fraction(extractor.sampling_rate, sample_rate)
    audio = resample_poly(np.asarray(wave, np.float64), ratio.numerator, ratio.denominator)
    # an unfused model takes one 10 s window; "fusion" would hand it 4 stacked views
    fused = scorer.model.config.audio_config.enable_fusion
    inputs = extractor(
        audio.astype(np.float32),
        sampling_rate=extractor.sampling_rate,
        truncation="fusion" if fused else "rand_trunc",
        padding="repeatpad",
        return_tensors="pt",
    )
    sound = _unit(scorer.model.get_audio_features(**inputs))[0]
    return float(sound @ _text(scorer, text, "get_text_features"))


def random_clip(path: str | Path, small: bool = True) -> Path:
    """A `clip/` folder as the user would place it, with random weights (tiny when `small`)."""
    return _random_folder(Path(path), "clip", small)


def random_clap(path: str | Path, small: bool = True) -> Path:
    """A `clap/` folder as the user would place it, with random weights (tiny when `small`)."""
    return _random_folder(Path(path), "clap", small)


def _random_folder(path: Path, kind: str, small: bool) -> Path:
    """A random-weight model (tiny widths when `small`) with its tokenizer and processor,
    saved with save_pretrained into `path`."""
    from transformers import (
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        CLIPConfig,
        CLIPModel,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from jointdit.codecs.clip_tokenizer import build_clip_tokenizer, tiny_clip_tokenizer
    from jointdit.random_experts import CLAP_AUDIO, CLAP_TEXT, tiny_roberta_tokenizer

    torch.manual_seed(0)
    if kind == "clip":
        tokenizer = tiny_clip_tokenizer() if small else build_clip_tokenizer()
        tiny = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)
        cfg = CLIPConfig(
            text_config={
                **tiny,
                "num_hidden_layers": 2,
                "vocab_size": len(tokenizer),
                # CLIP pools the text at its end token: the tiny vocabulary's ids
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
            }
            if small
            else {},
            vision_config={**tiny, "num_hidden_layers": 2, "patch_size": 32} if small else {},
            projection_dim=16 if small else 512,
        )
        model, processor = CLIPModel(cfg), CLIPImageProcessorPil()
    elif kind == "clap":
        tokenizer = tiny_roberta_tokenizer()
        cfg = ClapConfig(
            text_config={**CLAP_TEXT, "vocab_size": len(tokenizer)} if small else {},
            audio_config=CLAP_AUDIO if small else {},
            projection_dim=16 if small else 512,
        )
        model, processor = ClapModel(cfg), ClapFeatureExtractor()
    else:
        raise ValueError(f"kind must be clip or clap, got {kind!r}")
    for part in (model, tokenizer, processor):
        part.save_pretrained(path)
    return path
