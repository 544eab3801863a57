"""Named JointDiT sizes: which experts, how they are cut, how wide the Joint Blocks are.

`cfg.model.size` picks one entry. `tiny` builds small instances of the real diffusers classes
from scratch (tests, the embedded default on CPU); `svd+audioldm2` loads the pretrained
experts from `cfg.model.video_unet` / `cfg.model.audio_unet`. With `model.random_init` and no
downloaded `config.json` there, it builds the published architectures from the configs shipped
in `jointdit/assets/real_configs/` (SOURCES.md there says where each came from), so planning,
tests and `make gpu-check` need no download. A size's segments and widths can be overridden
per run through the `model` config keys of the same names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jointdit.errors import UserError

# The published config files of the pretrained parts, as `<hub repo with / -> __>/<subfolder>/`.
REAL_CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "real_configs"
SVD_REPO = REAL_CONFIGS / "stabilityai__stable-video-diffusion-img2vid-xt"
AUDIOLDM2_REPO = REAL_CONFIGS / "cvssp__audioldm2"
CLIP_REPO = REAL_CONFIGS / "laion__CLIP-ViT-H-14-laion2B-s32B-b79K"


@dataclass(frozen=True)
class ModelSize:
    video_segments: tuple[int, ...]  # middle stages per segment (see experts.py)
    audio_segments: tuple[int, ...]
    joint_dim: int  # shared width of joint attention
    joint_heads: int
    ff_mult: int = 4
    emb_dim: int = 256  # AdaLN timestep-embedding width
    audio_context: str = "audioldm2"  # what the audio expert reads (see JointDiT)
    # From-scratch UNet configs; None = load the pretrained expert from its cfg.model path.
    # The video config gets `cross_attention_dim` = cfg.model.image_emb_dim at build time.
    video_unet: dict | None = field(default=None)
    audio_unet: dict | None = field(default=None)
    # Shipped published configs (folders with config.json) used when none was downloaded.
    video_shipped: Path | None = None
    audio_shipped: Path | None = None


# Two resolution levels each; cross-attention only where maps are small, so a training step
# of batch 4 on CPU stays well under a second. The audio UNet keeps AudioLDM2's layout of
# [self, GPT-2-width, T5-width] attentions per layer, so both context inputs are exercised.
TINY_VIDEO_UNET = {
    "sample_size": 8,
    "in_channels": 8,  # 4 noisy latent + 4 first-frame latent channels, as in SVD
    "out_channels": 4,
    "down_block_types": ["DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"],
    "up_block_types": ["CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "num_attention_heads": [2, 4],
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24,  # 3 added time ids x 8
    "transformer_layers_per_block": 1,
}

TINY_AUDIO_UNET = {
    "sample_size": 16,
    "in_channels": 8,
    "out_channels": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": [2, 4],  # AudioLDM2's name for the head count
    "cross_attention_dim": [[None, 32, 48], [None, 32, 48]],
    "norm_num_groups": 32,
}

SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(
        video_segments=(2, 1),  # [down1 + mid] [up0]
        audio_segments=(2, 1),
        joint_dim=64,
        joint_heads=4,
        ff_mult=2,
        emb_dim=64,
        audio_context="joint",  # trained from scratch: no AudioLDM2 text stack to read
        video_unet=TINY_VIDEO_UNET,
        audio_unet=TINY_AUDIO_UNET,
    ),
    # SVD and AudioLDM2 both have 4 down and 4 up blocks: 7 middle stages each, cut into 4
    # segments [down1 down2] [down3] [mid up0] [up1 up2].
    "svd+audioldm2": ModelSize(
        video_segments=(2, 1, 2, 2),
        audio_segments=(2, 1, 2, 2),
        joint_dim=1024,
        joint_heads=16,
        ff_mult=4,
        emb_dim=1024,
        video_shipped=SVD_REPO / "unet",
        audio_shipped=AUDIOLDM2_REPO / "unet",
    ),
}


def get_size(name: str) -> ModelSize:
    if name not in SIZES:
        raise UserError(f"model.size={name!r} is not a known size; accepted: {', '.join(SIZES)}")
    return SIZES[name]
