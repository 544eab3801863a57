"""The one attention function of the repo, and rotary positions for it.

Every attention in JointDiT's own modules goes through `attention()`, built on
`torch.nn.functional.scaled_dot_product_attention` so the fastest kernel for the device and
dtype is picked. Query chunking bounds the memory of the score matrix on backends that
materialise it (the MATH path); it is exact because each query row is independent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    q_chunk: int = 0,
) -> torch.Tensor:
    """Softmax attention of q (B, H, Nq, d) over k, v (B, H, Nk, d) -> (B, H, Nq, d).

    key_mask: (B, Nk) bool, True = may be attended to (every query row must keep one key).
    q_chunk: > 0 processes that many queries at a time (same result, less peak memory).
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]
    n = q.shape[-2]
    if q_chunk <= 0 or q_chunk >= n:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    parts = [
        F.scaled_dot_product_attention(q[..., i : i + q_chunk, :], k, v, attn_mask=mask)
        for i in range(0, n, q_chunk)
    ]
    return torch.cat(parts, dim=-2)


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Rotation angles (..., N, head_dim/2) for positions (..., N, A) on A axes.

    The head dimension is split evenly over the axes; each axis gets the usual RoPE
    frequency ladder. An axis with position 0 leaves its share of the head unrotated.
    """
    axes = positions.shape[-1]
    share = head_dim // axes
    if share * axes != head_dim or share % 2:
        raise ValueError(f"head_dim {head_dim} must split into {axes} even parts for RoPE")
    freqs = base ** (-torch.arange(0, share, 2, device=positions.device) / share)
    angles = positions.float()[..., None] * freqs  # (..., N, A, share/2)
    return angles.flatten(-2)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, H, N, d) by angles (N, d/2) or (B, 1, N, d/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = angles.cos(), angles.sin()
    rotated = torch.stack(
        (pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 0] * sin + pairs[..., 1] * cos),
        dim=-1,
    )
    return rotated.flatten(-2).to(x.dtype)
