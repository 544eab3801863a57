"""The Joint Block: video and audio hidden states attend to each other (JointDiT, Fig. 2).

After an expert segment, both modalities' feature maps become tokens, are projected into one
shared width, and run one joint ("full") attention over video + audio (+ context) tokens,
then a per-modality feed-forward; each sub-layer sits under its modality's AdaLN, driven by
that modality's timestep embedding. Per-modality output projections map back to the expert
widths and are added to the expert's hidden state. They start at zero, so a fresh block is
the identity and an untrained JointDiT equals the two experts.

Positions are rotary on four axes (time, y, x, frequency): time is measured in seconds for
both modalities, so an audio token and the frame it belongs to share a temporal position;
video uses (y, x) and audio uses frequency, the other axes left at 0. `RotaryTime` says how
each head is spent on them: the paper form (a quarter of the head on time, base 10000 in
1/25 s) or the aligned ladder (DESIGN section 4, "Time that attention can find").

Optionally (`fusion`), frame-aligned fusion follows joint attention: each video frame gets
the audio of its own time window and each audio token the video frame(s) it overlaps (by
default what changes in them), through zero-initialised projections; iso rows get none of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from jointdit.config import FUSION_ADALN, FUSION_VIDEO, ROPE_KINDS
from jointdit.model.attention import apply_rope, attention, rope_layout_angles, time_ladder

# The paper form's RoPE time unit: 1/25 s (an audio latent frame).
ROPE_TIME_UNITS_PER_SECOND = 25.0


@dataclass(frozen=True)
class RotaryTime:
    """How joint attention's rotary pairs are spent over (time, y, x, f).

    paper: each axis a quarter of the head, base 10000, time in 1/25 s (a key 1 s away scores
    almost as high as the aligned one). aligned: `time_fraction` of the pairs on time, with
    wavelengths from two frames (1/fps each) up to twice `max_seconds`, the longest clip.
    """

    kind: str = "paper"
    time_fraction: float = 0.5
    fps: float = 7.0
    max_seconds: float = 5.0
    base: float = 10000.0

    def layout(self, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(axis_of_pair (head_dim/2,) long, freqs (head_dim/2,) float): pair j turns by
        position[axis_of_pair[j]] * freqs[j]; time positions are in seconds."""
        if self.kind not in ROPE_KINDS:
            raise ValueError(
                f"rope_time {self.kind!r} is not known; accepted: {', '.join(ROPE_KINDS)}"
            )
        pairs = head_dim // 2
        if self.kind == "paper":
            if head_dim % 8:
                raise ValueError(f"head_dim {head_dim} must split into 4 even parts for RoPE")
            share = pairs // 4
            ladder = self.base ** (-torch.arange(share, dtype=torch.float64) / share)
            counts = [share] * 4
            per_axis = [ladder * ROPE_TIME_UNITS_PER_SECOND, ladder, ladder, ladder]
        else:
            if head_dim % 2 or not 0 < self.time_fraction <= 1:
                raise ValueError(
                    f"rope_time aligned needs an even head width and 0 < rope_time_fraction <= 1:"
                    f" got {head_dim}, {self.time_fraction}"
                )
            n_time = max(1, round(pairs * self.time_fraction))
            rest = pairs - n_time
            counts = [n_time, rest // 3, rest // 3, rest - 2 * (rest // 3)]
            time = time_ladder(n_time, 2.0 / self.fps, 2.0 * self.max_seconds)
            per_axis = [time] + [
                self.base ** (-torch.arange(n, dtype=torch.float64) / max(n, 1)) for n in counts[1:]
            ]
        axis = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
        return axis, torch.cat(per_axis).float()


def video_positions(frames: int, h: int, w: int, fps: float, device=None) -> torch.Tensor:
    """(T·h·w, 4) positions (time s, y, x, f) of video tokens; time = centre of each frame."""
    t = (torch.arange(frames, device=device) + 0.5) / fps
    ys, xs = (torch.arange(n, device=device, dtype=torch.float32) for n in (h, w))
    grid = torch.meshgrid(t, ys, xs, indexing="ij")
    pos = torch.stack([g.flatten() for g in grid], dim=-1)
    return F.pad(pos, (0, 1))


def audio_positions(tokens_t: int, f: int, seconds: float, device=None) -> torch.Tensor:
    """(t·f, 4) positions of audio tokens spanning `seconds`; time (s) = centre of each token."""
    t = (torch.arange(tokens_t, device=device) + 0.5) * (seconds / tokens_t)
    grid = torch.meshgrid(t, torch.arange(f, device=device, dtype=torch.float32), indexing="ij")
    time, freq = (g.flatten() for g in grid)
    zero = torch.zeros_like(time)
    return torch.stack([time, zero, zero, freq], dim=-1)


def pool_video_tokens(tokens: torch.Tensor, frames: int, h: int, w: int, k: int) -> torch.Tensor:
    """Average video tokens (B, T·h·w, C) over k×k spatial windows of each frame.

    Only video tokens of one frame are ever pooled together (audio never enters here);
    edge windows average the tokens they cover. Returns (B, T·h'·w', C).
    """
    if k <= 1:
        return tokens
    b, _, c = tokens.shape
    maps = tokens.reshape(b * frames, h, w, c).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(maps, k, ceil_mode=True)
    return pooled.permute(0, 2, 3, 1).reshape(b, -1, c)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int):
        super().__init__(nn.Linear(dim, dim * mult), nn.GELU("tanh"), nn.Linear(dim * mult, dim))


class AdaLN(nn.Module):
    """Shift/scale/gate for the two sub-layers of one modality, from its timestep embedding.

    Starts at shift 0, scale 1, gate 1 (not DiT's gate 0: our zero start is the output
    projection, and a zero gate behind it would leave the block with no gradient).
    """

    def __init__(self, emb_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(emb_dim, 6 * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, emb: torch.Tensor) -> list[torch.Tensor]:
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (
            self.linear(F.silu(emb)).unsqueeze(1).chunk(6, dim=-1)
        )
        return [shift_a, 1 + scale_a, 1 + gate_a, shift_f, 1 + scale_f, 1 + gate_f]


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:]) * scale + shift


def frame_overlap(
    frames: int, fps: float, tokens_t: int, seconds: float, device=None
) -> torch.Tensor:
    """(T, t) seconds that audio token i (of `tokens_t` spanning `seconds`) shares with frame k."""
    k = torch.arange(frames + 1, device=device, dtype=torch.float32) / fps
    i = torch.arange(tokens_t + 1, device=device, dtype=torch.float32) * (seconds / tokens_t)
    start = torch.maximum(k[:-1, None], i[None, :-1])
    end = torch.minimum(k[1:, None], i[None, 1:])
    return (end - start).clamp(min=0)


class FrameFusion(nn.Module):
    """Frame-aligned fusion: video frame k <- the audio of [k/fps, (k+1)/fps), audio token <-
    the video frame(s) it overlaps (each pooled over space / frequency, then projected).

    What audio receives (`video`): "change", each frame's pooled feature minus the clip's
    temporal mean, over the clip's RMS of those changes, or "mean", the pooled feature itself
    (layer-normed). A frame's pooled feature is mostly the clip's static content (a small
    object's flash moves it by about 2 %), and "mean" leaves the audio deaf to the picture
    (docs/benchmarks.md); "change" keeps only what happens, scaled so the event frames stand
    out. Its only cross-frame terms are the clip's mean and RMS. The audio -> video direction
    is a frame's mean: a sound's onset already dominates its time step.

    The projections start at zero (a fresh block is unchanged). Each direction's features are
    modulated from an embedding (the partner's level by default: how clean what it hears is).
    """

    def __init__(self, dim: int, emb_dim: int, video: str = "change"):
        super().__init__()
        if video not in FUSION_VIDEO:
            raise ValueError(f"fusion_video {video!r} is not known; accepted: {FUSION_VIDEO}")
        self.video = video
        self.video_from_audio_mod = nn.Linear(emb_dim, 2 * dim)
        self.audio_from_video_mod = nn.Linear(emb_dim, 2 * dim)
        self.video_from_audio = nn.Linear(dim, dim)
        self.audio_from_video = nn.Linear(dim, dim)
        for layer in (
            self.video_from_audio_mod,
            self.audio_from_video_mod,
            self.video_from_audio,
            self.audio_from_video,
        ):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @staticmethod
    def _mod(x: torch.Tensor, mod: nn.Linear, emb: torch.Tensor, norm: bool = True) -> torch.Tensor:
        shift, scale = mod(F.silu(emb)).unsqueeze(1).chunk(2, dim=-1)
        return _modulate(x, shift, 1 + scale) if norm else x * (1 + scale) + shift

    @staticmethod
    def changes(video_t: torch.Tensor) -> torch.Tensor:
        """(B, T, D) per-frame features -> their change from the clip's temporal mean, over the
        clip's RMS change (float32: the changes are a few % of the features). Changes under
        1e-3 of the features' RMS stay small rather than being scaled up to 1."""
        x = video_t.float()
        c = x - x.mean(1, keepdim=True)
        power = c.pow(2).mean((1, 2), keepdim=True) + 1e-6 * x.pow(2).mean((1, 2), keepdim=True)
        return (c / power.add(1e-12).sqrt()).to(video_t.dtype)

    def forward(
        self,
        hv: torch.Tensor,
        ha: torch.Tensor,
        frames: int,
        fps: float,
        tokens_t: int,
        audio_seconds: float,
        emb_to_video: torch.Tensor,
        emb_to_audio: torch.Tensor,
        joint: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hv (B, T·h·w, D), ha (B, t·f, D) -> what each receives (same shapes); joint (B,)
        float: 0 rows (iso) receive nothing."""
        b, _, d = hv.shape
        overlap = frame_overlap(frames, fps, tokens_t, audio_seconds, hv.device).to(hv.dtype)
        to_video = overlap / overlap.sum(1, keepdim=True).clamp(min=1e-9)  # (T, t)
        to_audio = overlap.T / overlap.T.sum(1, keepdim=True).clamp(min=1e-9)  # (t, T)
        audio_t = ha.reshape(b, tokens_t, -1, d).mean(2)  # (B, t, D)
        video_t = hv.reshape(b, frames, -1, d).mean(2)  # (B, T, D)
        heard = self._mod(to_video @ audio_t, self.video_from_audio_mod, emb_to_video)
        change = self.video == "change"  # already at unit RMS: no layer norm
        sent = self.changes(video_t) if change else video_t
        seen = self._mod(to_audio @ sent, self.audio_from_video_mod, emb_to_audio, norm=not change)
        # Audio tokens past the last frame (time padding) overlap no frame: they get nothing.
        has_v = (overlap.sum(0) > 0).to(hv.dtype)[None, :, None]  # (1, t, 1)
        has_a = (overlap.sum(1) > 0).to(hv.dtype)[None, :, None]  # (1, T, 1)
        gate = joint[:, None, None]
        dv = self.video_from_audio(heard) * has_a * gate
        da = self.audio_from_video(seen) * has_v * gate
        dv = dv[:, :, None].expand(b, frames, hv.shape[1] // frames, d)
        da = da[:, :, None].expand(b, tokens_t, ha.shape[1] // tokens_t, d)
        return dv.reshape(hv.shape), da.reshape(ha.shape)


class JointBlock(nn.Module):
    """One Joint Block; names mirror the modalities (video_* / audio_*)."""

    def __init__(
        self,
        video_channels: int,
        audio_channels: int,
        dim: int,
        heads: int,
        emb_dim: int,
        ff_mult: int = 4,
        rotary: RotaryTime | None = None,
        fusion: bool = False,
        fusion_adaln: str = "partner",
        fusion_video: str = "change",
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"joint width {dim} must be a multiple of the head count {heads}")
        if fusion_adaln not in FUSION_ADALN:
            raise ValueError(
                f"fusion_adaln {fusion_adaln!r} is not known; accepted: {FUSION_ADALN}"
            )
        self.heads = heads
        self.head_dim = dim // heads
        self.rotary = rotary or RotaryTime()
        # Plain tensors, not buffers: a bf16 cast of the model must not round the frequencies.
        self.rope_axis, self.rope_freqs = self.rotary.layout(self.head_dim)
        self.fusion = FrameFusion(dim, emb_dim, fusion_video) if fusion else None
        self.fusion_adaln = fusion_adaln
        self.video_in = nn.Linear(video_channels, dim)
        self.audio_in = nn.Linear(audio_channels, dim)
        self.video_adaln = AdaLN(emb_dim, dim)
        self.audio_adaln = AdaLN(emb_dim, dim)
        self.video_qkv = nn.Linear(dim, 3 * dim)
        self.audio_qkv = nn.Linear(dim, 3 * dim)
        self.context_kv = nn.Linear(dim, 2 * dim)
        self.video_norm_q = nn.RMSNorm(self.head_dim)
        self.video_norm_k = nn.RMSNorm(self.head_dim)
        self.audio_norm_q = nn.RMSNorm(self.head_dim)
        self.audio_norm_k = nn.RMSNorm(self.head_dim)
        self.context_norm_k = nn.RMSNorm(self.head_dim)
        self.video_attn_out = nn.Linear(dim, dim)
        self.audio_attn_out = nn.Linear(dim, dim)
        self.video_ff = FeedForward(dim, ff_mult)
        self.audio_ff = FeedForward(dim, ff_mult)
        self.video_out = nn.Linear(dim, video_channels)
        self.audio_out = nn.Linear(dim, audio_channels)
        for layer in (self.video_out, self.audio_out):  # identity at init (see module doc)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _rope(self, positions: torch.Tensor) -> torch.Tensor:
        return rope_layout_angles(positions, self.rope_axis, self.rope_freqs)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, H, N, d)

    def forward(
        self,
        video: torch.Tensor,
        audio: torch.Tensor,
        video_emb: torch.Tensor,
        audio_emb: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        frames: int,
        fps: float,
        audio_seconds: float,
        iso: torch.Tensor | None = None,
        q_chunk_v: int = 0,
        q_chunk_a: int = 0,
        kv_downsample: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """video (B·T, Cv, h, w), audio (B, Ca, t, f) -> the same shapes, updated.

        video_emb / audio_emb (B, E): each modality's timestep embedding; context (B, L, D)
        with keep-mask (B, L); iso (B,) bool: those samples see no tokens of the other
        modality (joint attention off); audio_seconds: the duration the audio tokens span.
        """
        bt, cv, h, w = video.shape
        b, ca, ta, fa = audio.shape
        dev = video.device
        xv = video.reshape(b, frames, cv, h, w).permute(0, 1, 3, 4, 2).reshape(b, -1, cv)
        xa = audio.permute(0, 2, 3, 1).reshape(b, -1, ca)
        hv, ha = self.video_in(xv), self.audio_in(xa)
        mv, ma = self.video_adaln(video_emb), self.audio_adaln(audio_emb)

        # --- joint attention ------------------------------------------------------------
        nv_in = _modulate(hv, mv[0], mv[1])
        na_in = _modulate(ha, ma[0], ma[1])
        qv, kv_, vv = self.video_qkv(nv_in).chunk(3, dim=-1)
        qa, ka, va = self.audio_qkv(na_in).chunk(3, dim=-1)
        kc, vc = self.context_kv(context).chunk(2, dim=-1)
        pos_v = video_positions(frames, h, w, fps, dev)
        pos_a = audio_positions(ta, fa, audio_seconds, dev)
        rope_v, rope_a = self._rope(pos_v), self._rope(pos_a)
        qv = apply_rope(self.video_norm_q(self._heads(qv)), rope_v)
        qa = apply_rope(self.audio_norm_q(self._heads(qa)), rope_a)
        if kv_downsample > 1:
            # Pooling then projecting equals projecting then pooling (linear); positions are
            # pooled the same way so pooled keys sit at their window's mean position.
            kv_, vv = (pool_video_tokens(x, frames, h, w, kv_downsample) for x in (kv_, vv))
            pos_kv = pool_video_tokens(pos_v[None], frames, h, w, kv_downsample)[0]
            rope_kv = self._rope(pos_kv)
        else:
            rope_kv = rope_v
        kv_ = apply_rope(self.video_norm_k(self._heads(kv_)), rope_kv)
        ka = apply_rope(self.audio_norm_k(self._heads(ka)), rope_a)
        keys = torch.cat([kv_, ka, self.context_norm_k(self._heads(kc))], dim=2)
        values = torch.cat([self._heads(vv), self._heads(va), self._heads(vc)], dim=2)

        n_kv, n_ka = kv_.shape[2], ka.shape[2]
        mask_for_video, mask_for_audio = _key_masks(iso, context_mask, n_kv, n_ka)
        out_v = attention(qv, keys, values, mask_for_video, q_chunk_v)
        out_a = attention(qa, keys, values, mask_for_audio, q_chunk_a)
        hv = hv + mv[2] * self.video_attn_out(out_v.transpose(1, 2).flatten(2))
        ha = ha + ma[2] * self.audio_attn_out(out_a.transpose(1, 2).flatten(2))

        # --- frame-aligned fusion (optional) --------------------------------------------
        if self.fusion is not None:
            partner = self.fusion_adaln == "partner"
            joint = torch.ones(b, device=dev) if iso is None else (~iso).float()
            dv, da = self.fusion(
                hv,
                ha,
                frames,
                fps,
                ta,
                audio_seconds,
                audio_emb if partner else video_emb,
                video_emb if partner else audio_emb,
                joint.to(hv.dtype),
            )
            hv, ha = hv + dv, ha + da

        # --- per-modality feed-forward ---------------------------------------------------
        hv = hv + mv[5] * self.video_ff(_modulate(hv, mv[3], mv[4]))
        ha = ha + ma[5] * self.audio_ff(_modulate(ha, ma[3], ma[4]))

        # --- back to the experts' feature maps, residually ------------------------------
        dv = self.video_out(hv).reshape(b, frames, h, w, cv).permute(0, 1, 4, 2, 3)
        da = self.audio_out(ha).reshape(b, ta, fa, ca).permute(0, 3, 1, 2)
        return video + dv.reshape(bt, cv, h, w), audio + da


def _key_masks(
    iso: torch.Tensor | None, context_mask: torch.Tensor, n_video: int, n_audio: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Keep-masks over [video | audio | context] keys for video and for audio queries.

    None where nothing is masked, so SDPA keeps its fastest kernel.
    """
    if (iso is None or _known_all(~iso)) and _known_all(context_mask.bool()):
        return None, None
    b = context_mask.shape[0]
    dev = context_mask.device
    joint = torch.ones(b, dtype=torch.bool, device=dev) if iso is None else ~iso
    own_v = torch.ones(b, n_video, dtype=torch.bool, device=dev)
    own_a = torch.ones(b, n_audio, dtype=torch.bool, device=dev)
    other_v = joint[:, None].expand(b, n_video)
    other_a = joint[:, None].expand(b, n_audio)
    ctx = context_mask.bool()
    return torch.cat([own_v, other_a, ctx], 1), torch.cat([other_v, own_a, ctx], 1)


def _known_all(x: torch.Tensor) -> bool:
    """True when every element is True; meta tensors (the memory planner) count as unknown."""
    return x.device.type != "meta" and bool(x.all())


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of unified times t (B,) in [0, 1] (scaled to 0..1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedding(nn.Module):
    """Unified time t in [0, 1] -> the embedding that drives one modality's AdaLN."""

    def __init__(self, emb_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))
