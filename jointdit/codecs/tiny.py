"""Tiny configs of the real codec classes: the embedded default's codecs and the tests' fixtures.

`build_tiny_codecs` returns freshly initialised (seeded) models; `save_codecs` writes them with
`save_pretrained` in the `checkpoints/pretrained/` layout, so every loader is the real one.
The tiny CLIP towers stay random-but-fixed (seeded): they give consistent conditioning vectors,
not semantic ones. The VAEs and the vocoder are trained by `jointdit.codecs.tiny_train`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
)

from jointdit.codecs.clip_tokenizer import VOCAB_SIZE, build_clip_tokenizer

# Video VAE: 4 levels -> spatial factor 8, 64x64 frames -> (4, 8, 8) latents. 64 channels at the
# 8x8 level (its GroupNorms have 32 groups whatever the width: two channels per group there)
# measured better colour than 32 at codec seed 0, at little cost. It still carries no hue of its
# own: the colour it gives back is recalled from an object's shape and motion, so the blue and the
# pink ball come out alike (docs/benchmarks.md, "The tiny video codec carries no hue";
# `video_recolour_err`), and how well it recalls is mostly its seed's luck (seeds 1 and 2 score
# colour 36 and 33 where seed 0 scores 21). 64 channels at full resolution as well did better at
# every seed, at 2.1-2.4x the training time ("The shipped codec's colour is a lucky seed").
VIDEO_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    block_out_channels=(32, 32, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    sample_size=64,
)
# Audio mel VAE: 3 levels -> factor 4, (1, 200, 64) mel -> (8, 50, 16) latents, like AudioLDM2's.
AUDIO_VAE = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 32, 32),
    layers_per_block=1,
    latent_channels=8,
    norm_num_groups=32,
    sample_size=64,
)
# HiFi-GAN: upsampling rates multiply to the hop (160), so one mel frame -> 160 samples.
VOCODER = dict(
    model_in_dim=64,
    sampling_rate=16000,
    # 128 channels halve per stage to 8 at the last one (64 left 4: too few to shape a waveform)
    upsample_initial_channel=128,
    upsample_rates=[5, 4, 4, 2],
    upsample_kernel_sizes=[10, 8, 8, 4],
    resblock_kernel_sizes=[3, 7],
    resblock_dilation_sizes=[[1, 3], [1, 3]],
    normalize_before=True,  # its mean/scale buffers are set from the training mels
)
EMBED_DIM = 32  # CLIP projection (image embedding) width
CLIP_VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=EMBED_DIM,
)
CLIP_TEXT = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=16,
    projection_dim=EMBED_DIM,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
# CLIP's published preprocessing (what SVD's feature_extractor holds), at the tiny crop size.
FEATURE_EXTRACTOR = {
    "image_processor_type": "CLIPImageProcessor",
    "crop_size": {"height": 32, "width": 32},
    "size": {"shortest_edge": 32},
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


@dataclass
class TinyCodecs:
    video_vae: AutoencoderKLTemporalDecoder
    audio_vae: AutoencoderKL
    vocoder: SpeechT5HifiGan
    image_encoder: CLIPVisionModelWithProjection
    text_encoder: CLIPTextModelWithProjection


def build_tiny_codecs(seed: int = 0) -> TinyCodecs:
    """Freshly initialised tiny models, identical for the same seed. Each model draws from its
    own seed, so resizing one leaves the others' starting weights as they were."""

    def seeded(k: int, build):
        torch.manual_seed(seed * 1000 + k)
        return build()

    return TinyCodecs(
        video_vae=seeded(0, lambda: AutoencoderKLTemporalDecoder(**VIDEO_VAE)),
        audio_vae=seeded(1, lambda: AutoencoderKL(**AUDIO_VAE)),
        vocoder=seeded(2, lambda: SpeechT5HifiGan(SpeechT5HifiGanConfig(**VOCODER))),
        image_encoder=seeded(
            3, lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION))
        ),
        text_encoder=seeded(4, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT))),
    )


def save_codecs(models: TinyCodecs, root: str | Path) -> Path:
    """Write the models in the pretrained layout: svd/, audioldm2/, clip_text/ under `root`."""
    root = Path(root)
    models.video_vae.save_pretrained(root / "svd" / "vae")
    models.image_encoder.save_pretrained(root / "svd" / "image_encoder")
    fe = root / "svd" / "feature_extractor"
    fe.mkdir(parents=True, exist_ok=True)
    (fe / "preprocessor_config.json").write_text(json.dumps(FEATURE_EXTRACTOR, indent=2))
    models.audio_vae.save_pretrained(root / "audioldm2" / "vae")
    models.vocoder.save_pretrained(root / "audioldm2" / "vocoder")
    models.text_encoder.save_pretrained(root / "clip_text" / "text_encoder")
    build_clip_tokenizer(CLIP_TEXT["max_position_embeddings"]).save_pretrained(
        root / "clip_text" / "tokenizer"
    )
    return root


def recipe(tiny_cfg) -> dict:
    """What a set of trained tiny codecs depends on: the model shapes above and the training
    settings `codecs.tiny.*` (not where they are saved, not the report's bars). `make tiny-models`
    records it in quality.json; `make demo` re-uses saved codecs only when theirs matches."""
    from omegaconf import OmegaConf

    settings = {
        k: v
        for k, v in OmegaConf.to_container(tiny_cfg, resolve=True).items()
        if k not in ("out_dir", "val_clips") and not k.endswith("_bar")
    }
    shapes = {
        "video_vae": VIDEO_VAE,
        "audio_vae": AUDIO_VAE,
        "vocoder": VOCODER,
        "clip_vision": CLIP_VISION,
        "clip_text": CLIP_TEXT,
    }
    return json.loads(json.dumps({"settings": settings, "shapes": shapes}))  # tuples -> lists


def codecs_overrides(root: str | Path) -> list[str]:
    """`codecs.*=...` overrides pointing a config at codecs saved under `root` (tests use them)."""
    root = Path(root)
    return [
        f"codecs.video_vae={root / 'svd' / 'vae'}",
        f"codecs.image_encoder={root / 'svd' / 'image_encoder'}",
        f"codecs.feature_extractor={root / 'svd' / 'feature_extractor'}",
        f"codecs.audio_vae={root / 'audioldm2' / 'vae'}",
        f"codecs.vocoder={root / 'audioldm2' / 'vocoder'}",
        f"codecs.text_encoder={root / 'clip_text' / 'text_encoder'}",
        f"codecs.tokenizer={root / 'clip_text' / 'tokenizer'}",
    ]
