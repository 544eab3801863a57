"""JointDiT: two pretrained diffusion experts joined by Joint Blocks (DESIGN section 4)."""

from __future__ import annotations

from pathlib import Path

from diffusers import UNetSpatioTemporalConditionModel
from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel
from torch import nn

from jointdit.config import repo_path
from jointdit.errors import UserError
from jointdit.model.experts import context_widths
from jointdit.model.joint_block import RotaryTime
from jointdit.model.jointdit import JointDiT
from jointdit.model.sizes import SIZES, ModelSize, get_size

__all__ = ["JointDiT", "ModelSize", "SIZES", "audio_context", "audio_prompt_widths", "build_model"]


def _load_unet(
    cls: type, path: str, key: str, random_init: bool, shipped: Path | None = None
) -> nn.Module:
    folder = repo_path(path)
    if random_init and shipped is not None and not (folder / "config.json").is_file():
        folder = shipped  # the published architecture, shipped with the package
    if not (Path(folder) / "config.json").is_file():
        raise UserError(
            f"model.{key}: no {cls.__name__} at {folder} (config.json missing); "
            "`make fetch-models` downloads the pretrained experts"
        )
    if random_init:  # memory benchmarks: the real architecture, random weights
        return cls.from_config(cls.load_config(folder))
    return cls.from_pretrained(folder)


def audio_context(cfg) -> str:
    """What the audio expert reads: cfg.model.audio_context, or the model size's default."""
    return cfg.model.audio_context or get_size(cfg.model.size).audio_context


def audio_prompt_widths(cfg) -> tuple[int, int] | None:
    """Widths of AudioLDM2's prompt encoding (GPT-2 tokens, FLAN-T5 states) as the audio
    UNet's cross-attention takes them; None when the audio expert reads the joint context."""
    if audio_context(cfg) != "audioldm2":
        return None
    size, m = get_size(cfg.model.size), cfg.model
    if size.audio_unet is not None:
        config = size.audio_unet
    else:
        folder = repo_path(m.audio_unet)
        if not (folder / "config.json").is_file() and size.audio_shipped is not None:
            folder = size.audio_shipped
        config = AudioLDM2UNet2DConditionModel.load_config(folder)
    return context_widths(config)


def build_model(cfg) -> JointDiT:
    """Build JointDiT from `cfg.model` (size, paths, dims) and apply `cfg.memory` levers."""
    m = cfg.model
    size = get_size(m.size)
    if size.video_unet is not None:
        video_unet = UNetSpatioTemporalConditionModel(
            **size.video_unet, cross_attention_dim=m.image_emb_dim
        )
    else:
        video_unet = _load_unet(
            UNetSpatioTemporalConditionModel,
            m.video_unet,
            "video_unet",
            m.random_init,
            size.video_shipped,
        )
    if size.audio_unet is not None:
        audio_unet = AudioLDM2UNet2DConditionModel(**size.audio_unet)
    else:
        audio_unet = _load_unet(
            AudioLDM2UNet2DConditionModel,
            m.audio_unet,
            "audio_unet",
            m.random_init,
            size.audio_shipped,
        )
    width = video_unet.config.cross_attention_dim
    if width != m.image_emb_dim:
        raise UserError(
            f"model.image_emb_dim={m.image_emb_dim} but the video UNet's cross-attention "
            f"takes {width}; set model.image_emb_dim: {width}"
        )
    try:
        model = JointDiT(
            video_unet,
            audio_unet,
            video_segments=list(m.video_segments) or list(size.video_segments),
            audio_segments=list(m.audio_segments) or list(size.audio_segments),
            image_emb_dim=m.image_emb_dim,
            text_emb_dim=m.text_emb_dim,
            joint_dim=m.joint_dim or size.joint_dim,
            joint_heads=m.joint_heads or size.joint_heads,
            ff_mult=size.ff_mult,
            emb_dim=size.emb_dim,
            video_fps=m.video_fps,
            audio_latent_rate=m.audio_latent_rate,
            motion_bucket_id=m.motion_bucket_id,
            rotary=RotaryTime(
                kind=m.rope_time,
                time_fraction=m.rope_time_fraction,
                fps=m.video_fps,
                max_seconds=m.rope_max_seconds,
            ),
            frame_fusion=m.frame_fusion,
            fusion_adaln=m.fusion_adaln,
            fusion_video=m.fusion_video,
            audio_context=audio_context(cfg),
        )
    except ValueError as e:  # bad segments / widths from the config
        raise UserError(f"model config: {e}") from None
    mem = cfg.memory
    model.set_memory(
        max_t=mem.max_t,
        q_chunk_v=mem.q_chunk_v,
        q_chunk_a=mem.q_chunk_a,
        kv_downsample=mem.kv_downsample,
        grad_ckpt=mem.grad_ckpt,
    )
    return model
