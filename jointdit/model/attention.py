"""The one attention function of the repo, and rotary positions for it.

Every attention in JointDiT's own modules goes through `attention()`, built on
`torch.nn.functional.scaled_dot_product_attention` so the fastest kernel for the device and
dtype is picked. Query chunking bounds the memory of the score matrix on backends that
materialise it (the MATH path); it is exact because each query row is independent.
"""

from __future__ import annotations

import math

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


def rope_layout_angles(
    positions: torch.Tensor, axis_of_pair: torch.Tensor, freqs: torch.Tensor
) -> torch.Tensor:
    """Rotation angles (..., N, pairs) for positions (..., N, A): pair j turns by
    positions[..., axis_of_pair[j]] * freqs[j] (any split of the head over the axes)."""
    return positions.float()[..., axis_of_pair.to(positions.device)] * freqs.to(positions.device)


def time_ladder(pairs: int, shortest: float, longest: float) -> torch.Tensor:
    """Angular frequencies (rad per unit) whose wavelengths run geometrically from `shortest`
    to `longest`: the fastest tells neighbouring frames apart, the slowest turns less than
    half a turn across a clip up to half of `longest` long."""
    if pairs < 1 or not 0 < shortest <= longest:
        raise ValueError(
            f"time ladder needs pairs >= 1 and 0 < shortest <= longest: "
            f"got {pairs}, {shortest}, {longest}"
        )
    wavelengths = torch.logspace(
        math.log10(shortest), math.log10(longest), pairs, dtype=torch.float64
    )
    return (2 * math.pi / wavelengths).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, H, N, d) by angles (N, d/2) or (B, 1, N, d/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = angles.cos(), angles.sin()
    rotated = torch.stack(
        (pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 0] * sin + pairs[..., 1] * cos),
        dim=-1,
    )
    return rotated.flatten(-2).to(x.dtype)
