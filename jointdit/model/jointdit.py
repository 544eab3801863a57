"""JointDiT: the video expert (SVD UNet) and the audio expert (AudioLDM2 UNet) run side by
side, cut into Input / N Expert segments / Output, with a Joint Block after each segment.

The model knows tensors only: raw network inputs in, raw network outputs out. The diffusion
parameterisations (EDM for video, DDPM for audio) live in `jointdit/diffusion.py`.

Each expert keeps its own conditioning, so a fresh model (Joint Blocks at identity) is the two
experts: the video UNet reads SVD's CLIP image embedding, first-frame latent and micro-conditions;
the audio UNet reads AudioLDM2's prompt encoding (`audio_context="audioldm2"`: GPT-2 tokens and
FLAN-T5 states), or, for an audio expert trained from scratch (`"joint"`), a projection of the
joint context. Image and text reach the other modality through the Joint Blocks' context.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from jointdit.config import AUDIO_CONTEXTS
from jointdit.errors import UserError
from jointdit.model.experts import AudioExpert, VideoExpert
from jointdit.model.joint_block import JointBlock, RotaryTime, TimeEmbedding


class JointDiT(nn.Module):
    """Video expert + audio expert + one Joint Block per segment; conditions and AdaLN time."""

    def __init__(
        self,
        video_unet: nn.Module,
        audio_unet: nn.Module,
        video_segments: list[int],
        audio_segments: list[int],
        image_emb_dim: int,
        text_emb_dim: int,
        joint_dim: int,
        joint_heads: int,
        ff_mult: int = 4,
        emb_dim: int = 256,
        video_fps: float = 7.0,
        audio_latent_rate: float = 25.0,
        motion_bucket_id: int = 127,
        rotary: RotaryTime | None = None,
        frame_fusion: bool = False,
        fusion_adaln: str = "partner",
        fusion_video: str = "change",
        audio_context: str = "audioldm2",
    ):
        super().__init__()
        if audio_context not in AUDIO_CONTEXTS:
            raise ValueError(
                f"audio_context {audio_context!r}; accepted: {', '.join(AUDIO_CONTEXTS)}"
            )
        self.audio_context = audio_context
        self.video_expert = VideoExpert(video_unet, video_segments)
        self.audio_expert = AudioExpert(audio_unet, audio_segments)
        if self.video_expert.num_segments != self.audio_expert.num_segments:
            raise ValueError(
                f"video and audio need the same number of segments (one Joint Block after "
                f"each): got {list(video_segments)} and {list(audio_segments)}"
            )
        self.video_fps = video_fps
        self.audio_latent_rate = audio_latent_rate
        self.motion_bucket_id = motion_bucket_id

        # Conditions. Null embeddings replace a dropped condition; the image one starts at
        # zero, SVD's own unconditional convention.
        self.null_image_emb = nn.Parameter(torch.zeros(image_emb_dim))
        self.null_text_emb = nn.Parameter(torch.zeros(text_emb_dim))
        self.image_proj = nn.Linear(image_emb_dim, joint_dim)
        self.text_proj = nn.Linear(text_emb_dim, joint_dim)
        if audio_context == "joint":
            width, width_1 = self.audio_expert.context_widths
            self.audio_context_proj = nn.Linear(joint_dim, width)
            self.audio_context_proj_1 = nn.Linear(joint_dim, width_1) if width_1 else None

        self.video_time_embed = TimeEmbedding(emb_dim)
        self.audio_time_embed = TimeEmbedding(emb_dim)
        video_widths = [
            self._segment_width(self.video_expert, i) for i in range(len(video_segments))
        ]
        audio_widths = [
            self._segment_width(self.audio_expert, i) for i in range(len(audio_segments))
        ]
        self.joint_blocks = nn.ModuleList(
            JointBlock(
                cv,
                ca,
                joint_dim,
                joint_heads,
                emb_dim,
                ff_mult,
                rotary,
                frame_fusion,
                fusion_adaln,
                fusion_video,
            )
            for cv, ca in zip(video_widths, audio_widths)
        )
        self.max_t = 0
        self.q_chunk_v = 0
        self.q_chunk_a = 0
        self.kv_downsample = 1
        self.grad_ckpt = False

    @staticmethod
    def _segment_width(expert: VideoExpert | AudioExpert, index: int) -> int:
        """Channels of the hidden state that leaves segment `index`."""
        kind, i = expert.segments[index][-1]
        unet = expert.unet
        if kind == "down":
            return unet.config.block_out_channels[i]
        if kind == "mid":
            return unet.config.block_out_channels[-1]
        return list(reversed(unet.config.block_out_channels))[i]

    # ------------------------------------------------------------------------------------
    # switches

    def set_memory(
        self,
        *,
        max_t: int | None = None,
        q_chunk_v: int | None = None,
        q_chunk_a: int | None = None,
        kv_downsample: int | None = None,
        grad_ckpt: bool | None = None,
    ) -> None:
        """Memory levers (DESIGN section 4); None leaves a lever as it is."""
        for name, value in (
            ("max_t", max_t),
            ("q_chunk_v", q_chunk_v),
            ("q_chunk_a", q_chunk_a),
            ("kv_downsample", kv_downsample),
            ("grad_ckpt", grad_ckpt),
        ):
            if value is not None:
                setattr(self, name, value)
        if grad_ckpt is not None:  # the experts checkpoint per layer (see experts.py)
            self.video_expert.set_layer_checkpointing(grad_ckpt)
            self.audio_expert.set_layer_checkpointing(grad_ckpt)

    def freeze_experts(self, keep_trainable: list[str] | tuple[str, ...] = ()) -> None:
        """Stage A: freeze both expert UNets except parameters whose name starts with a prefix
        in `keep_trainable` (names as in `named_parameters()`, e.g. "video_expert.unet.mid_block").
        Joint Blocks, projectors, time embeddings and null embeddings stay trainable."""
        for name, param in self.named_parameters():
            in_expert = name.startswith(("video_expert.", "audio_expert."))
            param.requires_grad_(not in_expert or name.startswith(tuple(keep_trainable)))

    # ------------------------------------------------------------------------------------
    # conditions

    def context(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        text_mask: torch.Tensor,
        drop_image: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply condition dropping; return (image_emb for SVD (B,1,Di), context tokens
        (B, 1+L, D) = [image, text...], their keep-mask (B, 1+L))."""
        b, n_text = text_emb.shape[:2]
        text_mask = text_mask.bool()
        if drop_image is not None:
            image_emb = torch.where(drop_image[:, None], self.null_image_emb, image_emb)
        if drop_text is not None:
            # A dropped text is one null token; the rest of its slots are masked out.
            null = self.null_text_emb.expand(b, n_text, -1)
            text_emb = torch.where(drop_text[:, None, None], null, text_emb)
            first_only = torch.zeros_like(text_mask)
            first_only[:, 0] = True
            text_mask = torch.where(drop_text[:, None], first_only, text_mask)
        tokens = torch.cat([self.image_proj(image_emb)[:, None], self.text_proj(text_emb)], 1)
        mask = torch.cat([torch.ones_like(text_mask[:, :1]), text_mask], 1)
        return image_emb[:, None], tokens, mask

    def added_time_ids(self, cond_aug: torch.Tensor) -> torch.Tensor:
        """SVD's micro-conditioning (fps - 1, motion bucket, noise-augmentation strength)."""
        b = cond_aug.shape[0]
        fps = torch.full((b,), self.video_fps - 1, device=cond_aug.device)
        bucket = torch.full((b,), float(self.motion_bucket_id), device=cond_aug.device)
        return torch.stack([fps, bucket, cond_aug.float()], dim=1)

    # ------------------------------------------------------------------------------------
    # forward

    def forward(
        self,
        video: torch.Tensor,
        audio: torch.Tensor,
        video_timestep: torch.Tensor,
        audio_timestep: torch.Tensor,
        video_t: torch.Tensor,
        audio_t: torch.Tensor,
        first_frame: torch.Tensor,
        cond_aug: torch.Tensor,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        text_mask: torch.Tensor,
        drop_image: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
        iso: bool | torch.Tensor = False,
        audio_cond: torch.Tensor | None = None,
        audio_cond_1: torch.Tensor | None = None,
        audio_cond_1_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw network inputs -> raw network outputs (video (B,T,4,h,w), audio (B,8,t,16)).

        video: the preconditioned noisy video latents (B,T,4,h,w); first_frame (B,4,h,w):
        the noise-augmented conditioning latent (concatenated per frame as in SVD);
        audio (B,8,t,16) noisy audio latents (any t: the UNet handles sizes that are not a
        multiple of its downsampling, as in AudioLDM2's pipeline);
        video_timestep (B,): SVD's c_noise; audio_timestep (B,): AudioLDM2's DDPM index;
        video_t / audio_t (B,): each modality's unified time in [0,1] (drives its AdaLN);
        cond_aug (B,): first-frame noise-augmentation strength (SVD micro-condition);
        drop_image / drop_text (B,) bool: replace that condition by its null;
        iso: True or (B,) bool: joint attention off (no cross-modal tokens) for those rows;
        audio_cond (B,8,Dg), audio_cond_1 (B,L,Dt), audio_cond_1_mask (B,L): AudioLDM2's prompt
        encoding (GPT-2 tokens, FLAN-T5 states) for audio_context "audioldm2"; a dropped text
        is the caller's to substitute (the empty prompt's encoding), as drop_text only drops
        the joint context's text.
        """
        b, frames = video.shape[:2]
        if self.max_t and frames > self.max_t:
            raise UserError(
                f"{frames} video frames exceed memory.max_t={self.max_t} (JOINTDIT_MAX_T); "
                "crop clips with the dataset's max_t or raise the cap"
            )
        if isinstance(iso, bool):
            iso = torch.full((b,), iso, dtype=torch.bool, device=video.device)
        image_tok, context, context_mask = self.context(
            image_emb, text_emb, text_mask, drop_image, drop_text
        )
        if drop_image is not None:  # SVD's unconditional branch zeroes the image latent too
            first_frame = first_frame * (~drop_image).to(first_frame.dtype)[:, None, None, None]
        video_in = torch.cat([video, first_frame[:, None].expand_as(video)], dim=2)

        v = self.video_expert.begin(
            video_in, video_timestep, image_tok, self.added_time_ids(cond_aug)
        )
        a = self.audio_expert.begin(
            audio,
            audio_timestep,
            *self._audio_contexts(
                context, context_mask, audio_cond, audio_cond_1, audio_cond_1_mask
            ),
        )
        video_emb = self.video_time_embed(video_t)
        audio_emb = self.audio_time_embed(audio_t)
        for i, block in enumerate(self.joint_blocks):
            v = self.video_expert.run_segment(i, v)
            a = self.audio_expert.run_segment(i, a)
            v.hidden, a.hidden = self._maybe_ckpt(
                block,
                v.hidden,
                a.hidden,
                video_emb,
                audio_emb,
                context,
                context_mask,
                frames,
                self.video_fps,
                self._audio_span(audio.shape[2], a.hidden.shape[2]),
                iso,
                self.q_chunk_v,
                self.q_chunk_a,
                self.kv_downsample,
            )
        return self.video_expert.end(v), self.audio_expert.end(a)

    def _audio_contexts(self, context, context_mask, audio_cond, audio_cond_1, audio_cond_1_mask):
        """The audio UNet's (encoder_hidden_states, mask, encoder_hidden_states_1, mask)."""
        if self.audio_context == "joint":
            proj_1 = self.audio_context_proj_1
            return (
                self.audio_context_proj(context),
                context_mask,
                None if proj_1 is None else proj_1(context),
                None if proj_1 is None else context_mask,
            )
        if audio_cond is None or audio_cond_1 is None:
            raise UserError(
                "the audio expert reads AudioLDM2's prompt encoding (model.audio_context="
                "audioldm2), which this batch lacks: cache with codecs.audio_prompt set"
            )
        return audio_cond, None, audio_cond_1, audio_cond_1_mask  # AudioLDM2: no GPT-2 mask

    def _audio_span(self, latent_frames: int, tokens: int) -> float:
        """Seconds that `tokens` audio tokens span: each covers `stride` latent frames, the
        power of two that the UNet's (ceil-rounding) downsampling took from `latent_frames`
        to `tokens`; the last token may reach past the clip's end."""
        stride = 1
        while math.ceil(latent_frames / stride) > tokens:
            stride *= 2
        return tokens * stride / self.audio_latent_rate

    def _ckpt_active(self) -> bool:
        return self.grad_ckpt and torch.is_grad_enabled() and self.training

    def _maybe_ckpt(self, fn: Any, *args: Any) -> Any:
        if self._ckpt_active():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)
