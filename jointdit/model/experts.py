"""The two pretrained experts, run block by block: Input, N Expert segments, Output.

A diffusers UNet is a fixed sequence: conv_in, down blocks, mid block, up blocks, norm/act/
conv_out, with the down blocks' residuals popped by the up blocks. We cut it as JointDiT does:

    Input   = conv_in + down_blocks[0]
    Expert  = down_blocks[1:], mid_block, up_blocks[:-1], grouped in order into segments
    Output  = up_blocks[-1] + conv_norm_out/conv_act + conv_out

`segments` lists how many of those middle stages each segment holds (e.g. [2, 1] puts
down_blocks[1] + mid into segment 0 and up_blocks[0] into segment 1). Running Input, all
segments and Output back to back is exactly the UNet's own `forward` (tests check it); the
Joint Blocks sit between segments. Residuals travel in an `ExpertState`.

Gradient checkpointing works per layer (each resnet and each transformer of every block,
Input and Output included), not per segment: a whole segment's recomputation in backward, or
the Input's activations kept because trainable context projections feed its cross-attention,
would sit on top of the gradients at the end of backward and raise the step's peak.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field, replace

import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class ExpertState:
    """Everything a UNet carries between its blocks."""

    hidden: torch.Tensor  # (B·T, C, h, w) video / (B, C, t, f) audio
    emb: torch.Tensor  # time embedding, one row per hidden-state row
    cross_kwargs: dict  # what blocks with cross-attention take besides hidden/temb
    plain_kwargs: dict  # what blocks without cross-attention take besides hidden/temb
    residuals: tuple = ()
    forward_upsample_size: bool = False
    extras: dict = field(default_factory=dict)


class Expert(nn.Module):
    """A UNet split into Input / segments / Output; subclasses say how to embed and reshape."""

    def __init__(self, unet: nn.Module, segments: list[int]):
        super().__init__()
        self.unet = unet
        stages = [("down", i) for i in range(1, len(unet.down_blocks))]
        stages += [("mid", 0)] + [("up", i) for i in range(len(unet.up_blocks) - 1)]
        if sum(segments) != len(stages) or min(segments, default=0) < 1:
            raise ValueError(
                f"{type(unet).__name__}: segments {list(segments)} must be positive and sum to "
                f"{len(stages)} (its middle stages: {', '.join(f'{k}{i}' for k, i in stages)})"
            )
        bounds = torch.tensor([0, *segments]).cumsum(0).tolist()
        self.segments = [stages[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def set_layer_checkpointing(self, on: bool) -> None:
        """Recompute each resnet / transformer layer of the UNet in backward (exact)."""
        for block in [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]:
            for layer in [*(block.resnets or []), *(getattr(block, "attentions", None) or [])]:
                if on:
                    # Bound to the layer, so deepcopy/EMA copies checkpoint their own layer.
                    layer.forward = types.MethodType(_checkpointed_forward, layer)
                else:
                    layer.__dict__.pop("forward", None)

    @property
    def layer_checkpointing(self) -> bool:
        return "forward" in self.unet.down_blocks[0].resnets[0].__dict__

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def up_factor(self) -> int:
        return 2**self.unet.num_upsamplers

    def _down(self, block: nn.Module, s: ExpertState) -> None:
        kwargs = s.cross_kwargs if getattr(block, "has_cross_attention", False) else s.plain_kwargs
        s.hidden, res = block(hidden_states=s.hidden, temb=s.emb, **kwargs)
        s.residuals += res

    def _up(self, index: int, s: ExpertState) -> None:
        block = self.unet.up_blocks[index]
        n = len(block.resnets)
        res, s.residuals = s.residuals[-n:], s.residuals[:-n]
        is_final = index == len(self.unet.up_blocks) - 1
        # Same rule as the UNet's forward: force the upsampled size when the input is odd-sized.
        size = s.residuals[-1].shape[2:] if (s.forward_upsample_size and not is_final) else None
        kwargs = s.cross_kwargs if getattr(block, "has_cross_attention", False) else s.plain_kwargs
        s.hidden = block(
            hidden_states=s.hidden,
            temb=s.emb,
            res_hidden_states_tuple=res,
            upsample_size=size,
            **kwargs,
        )

    def run_input(self, s: ExpertState) -> ExpertState:
        s.hidden = self.unet.conv_in(s.hidden)
        s.residuals = (s.hidden,)
        self._down(self.unet.down_blocks[0], s)
        return s

    def run_segment(self, index: int, s: ExpertState) -> ExpertState:
        """Run segment `index` on a copy of the state (the input state stays as it was)."""
        t = replace(s)
        for kind, i in self.segments[index]:
            if kind == "down":
                self._down(self.unet.down_blocks[i], t)
            elif kind == "mid":
                t.hidden = self.unet.mid_block(hidden_states=t.hidden, temb=t.emb, **t.cross_kwargs)
            else:
                self._up(i, t)
        return t

    def run_output(self, s: ExpertState) -> torch.Tensor:
        self._up(len(self.unet.up_blocks) - 1, s)
        h = s.hidden
        if self.unet.conv_norm_out is not None:
            h = self.unet.conv_act(self.unet.conv_norm_out(h))
        return self.unet.conv_out(h)

    def _needs_forced_upsample(self, spatial: tuple[int, ...]) -> bool:
        return any(n % self.up_factor != 0 for n in spatial)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    forward = type(self).forward
    if torch.is_grad_enabled() and self.training:
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


class VideoExpert(Expert):
    """SVD's `UNetSpatioTemporalConditionModel`; frames ride in the batch (B·T)."""

    unet: UNetSpatioTemporalConditionModel

    def begin(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_time_ids: torch.Tensor,
    ) -> ExpertState:
        """sample (B,T,C,H,W), timestep (B,) = c_noise, encoder_hidden_states (B,1,D), ids (B,3)."""
        u = self.unet
        b, t = sample.shape[:2]
        emb = u.time_embedding(u.time_proj(timestep.expand(b)).to(sample.dtype))
        added = u.add_time_proj(added_time_ids.flatten()).reshape(b, -1).to(emb.dtype)
        emb = (emb + u.add_embedding(added)).repeat_interleave(t, dim=0)
        indicator = torch.zeros(b, t, dtype=sample.dtype, device=sample.device)
        state = ExpertState(
            hidden=sample.flatten(0, 1),
            emb=emb,
            cross_kwargs={
                "encoder_hidden_states": encoder_hidden_states.repeat_interleave(t, dim=0),
                "image_only_indicator": indicator,
            },
            plain_kwargs={"image_only_indicator": indicator},
            forward_upsample_size=self._needs_forced_upsample(sample.shape[-2:]),
            extras={"batch": b, "frames": t},
        )
        return self.run_input(state)

    def end(self, s: ExpertState) -> torch.Tensor:
        out = self.run_output(s)
        return out.reshape(s.extras["batch"], s.extras["frames"], *out.shape[1:])


def context_widths(config) -> tuple[int, int | None]:
    """Cross-attention widths of an AudioLDM2 UNet config's `encoder_hidden_states` and
    `encoder_hidden_states_1`.

    AudioLDM2 lists per block e.g. [None, 768, 1024]: slot 0 self-attention, slots 0-1 read
    `encoder_hidden_states` (GPT-2 width), slot 2+ read `encoder_hidden_states_1` (T5).
    """
    dims = config["cross_attention_dim"]
    dims = dims[0] if isinstance(dims, (list, tuple)) else dims
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    first = next(d for d in dims[:2] if d is not None)
    second = next((d for d in dims[2:] if d is not None), None)
    return first, second


def _mask_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # AudioLDM2's forward turns a keep-mask (B, L) into an additive bias (B, 1, L).
    return None if mask is None else ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


class AudioExpert(Expert):
    """AudioLDM2's `AudioLDM2UNet2DConditionModel` on (B, 8, t, 16) latents."""

    unet: AudioLDM2UNet2DConditionModel

    @property
    def context_widths(self) -> tuple[int, int | None]:
        """Cross-attention widths of `encoder_hidden_states` and `encoder_hidden_states_1`."""
        return context_widths(self.unet.config)

    def begin(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        encoder_hidden_states_1: torch.Tensor | None = None,
        encoder_attention_mask_1: torch.Tensor | None = None,
    ) -> ExpertState:
        """sample (B,C,t,f), timestep (B,) DDPM index, contexts (B,L,W) with keep-masks (B,L)."""
        u = self.unet
        emb = u.time_embedding(u.time_proj(timestep.expand(sample.shape[0])).to(sample.dtype))
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        state = ExpertState(
            hidden=sample,
            emb=emb,
            cross_kwargs={
                "encoder_hidden_states": encoder_hidden_states,
                "encoder_attention_mask": _mask_bias(encoder_attention_mask, sample.dtype),
                "encoder_hidden_states_1": encoder_hidden_states_1,
                "encoder_attention_mask_1": _mask_bias(encoder_attention_mask_1, sample.dtype),
            },
            plain_kwargs={},
            forward_upsample_size=self._needs_forced_upsample(sample.shape[-2:]),
        )
        return self.run_input(state)

    def end(self, s: ExpertState) -> torch.Tensor:
        return self.run_output(s)
