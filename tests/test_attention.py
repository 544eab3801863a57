"""The one attention function: query chunking is exact; RoPE; video-only KV pooling."""

import pytest
import torch

from jointdit.model.attention import apply_rope, attention, rope_layout_angles
from jointdit.model.joint_block import JointBlock, RotaryTime, audio_positions, pool_video_tokens


def rope_angles(pos, head_dim, kind="paper"):
    return rope_layout_angles(pos, *RotaryTime(kind=kind).layout(head_dim))


def _qkv(nq=37, nk=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (nq, nk, nk))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def _value_and_grads(q_chunk, mask):
    q, k, v = _qkv()
    out = attention(q, k, v, mask, q_chunk)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def test_query_chunking_equals_unchunked_values_and_grads():
    mask = torch.ones(2, 53, dtype=torch.bool)
    mask[1, 20:40] = False
    for m in (None, mask):
        ref = _value_and_grads(0, m)
        for chunk in (1, 5, 16, 36, 37, 100):
            for a, b in zip(ref, _value_and_grads(chunk, m)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_key_mask_hides_keys():
    q, k, v = (t.detach() for t in _qkv())
    mask = torch.ones(2, 53, dtype=torch.bool)
    mask[:, 30:] = False
    full = attention(q, k, v, mask)
    torch.testing.assert_close(full, attention(q, k[:, :, :30], v[:, :, :30]))


def test_rope_keeps_norms_and_depends_on_offsets_only():
    pos = torch.tensor([[0.0, 1.0, 2.0, 3.0], [5.0, 1.0, 2.0, 3.0]])
    x = torch.randn(1, 1, 2, 16)
    rotated = apply_rope(x, rope_angles(pos, 16))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    # q·k is unchanged when both positions shift by the same amount (relative positions).
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def dot(pq, pk):
        aq, ak = rope_angles(pq[None], 16), rope_angles(pk[None], 16)
        return (apply_rope(q, aq) * apply_rope(k, ak)).sum()

    p1, p2 = torch.tensor([3.0, 1, 0, 2]), torch.tensor([1.0, 0, 2, 2])
    shift = torch.tensor([7.0, 2, 1, 3])
    torch.testing.assert_close(dot(p1, p2), dot(p1 + shift, p2 + shift), rtol=1e-4, atol=1e-4)


def test_audio_and_video_tokens_of_one_instant_share_a_time_position():
    from jointdit.model.joint_block import video_positions

    # 2 s: 14 frames at 7 fps; 50 audio latents at 25 /s pooled 2x -> 25 tokens.
    v = video_positions(14, 2, 2, fps=7.0)[:, 0].reshape(14, 4)[:, 0]
    a = audio_positions(25, 8, seconds=2.0)[:, 0].reshape(25, 8)[:, 0]
    # Frame 7 (centre 1.0714 s) and the audio token covering that instant are close in time.
    nearest = (a - v[7]).abs().min()
    assert nearest <= (a[1] - a[0]) / 2 + 1e-5
    torch.testing.assert_close(v[-1] - v[0], torch.tensor(13 / 7))  # seconds


def test_kv_pooling_keeps_frames_and_modalities_apart():
    # Channel 0: a video marker (1.0); channel 1: the frame index. 3x5 maps with k=2 leave
    # partial edge windows: a pooled marker must still be exactly 1 and the frame exact.
    b, frames, h, w = 2, 4, 3, 5
    frame_id = torch.arange(frames, dtype=torch.float32)[:, None, None].expand(frames, h, w)
    tokens = torch.stack([torch.ones(frames, h, w), frame_id], dim=-1).reshape(1, -1, 2)
    pooled = pool_video_tokens(tokens.expand(b, -1, -1), frames, h, w, 2)
    assert pooled.shape == (b, frames * 2 * 3, 2)
    assert torch.equal(pooled[..., 0], torch.ones_like(pooled[..., 0]))
    expected = torch.arange(frames, dtype=torch.float32).repeat_interleave(6)
    assert torch.equal(pooled[0, :, 1], expected)


def test_kv_downsample_pools_video_keys_only():
    torch.manual_seed(0)
    block = JointBlock(video_channels=8, audio_channels=8, dim=16, heads=2, emb_dim=8)
    for p in block.parameters():  # leave the zero init so outputs depend on the attention
        torch.nn.init.normal_(p, std=0.3)
    b, frames, h, w = 1, 3, 4, 4
    video = torch.randn(b * frames, 8, h, w)
    audio = torch.randn(b, 8, 6, 4)
    emb = torch.randn(b, 8)
    ctx = torch.randn(b, 2, 16)
    cmask = torch.ones(b, 2, dtype=torch.bool)

    def run(vid, aud, k, iso=False):
        return block(
            vid, aud, emb, emb, ctx, cmask, frames, 7.0, 6 / 25, torch.tensor([iso]), 0, 0, k
        )

    ref_v, ref_a = run(video, audio, 1)
    pooled_v, pooled_a = run(video, audio, 2)
    assert not torch.allclose(pooled_v, ref_v)  # pooling is lossy...
    # ...but with the other modality cut off (iso), audio queries see only audio keys,
    # which pooling never touches: audio output is identical.
    torch.testing.assert_close(run(video, audio, 2, iso=True)[1], run(video, audio, 1, iso=True)[1])
    # And the pooled video keys hold no audio: with iso, video ignores any audio change.
    other = torch.randn_like(audio)
    torch.testing.assert_close(run(video, audio, 2, iso=True)[0], run(video, other, 2, iso=True)[0])


def _positional_margin(kind, head_dim, frames, fps):
    """Worst, over video queries, of (aligned score - best score of a key >= 1 frame away) /
    aligned score, with q = k = constant; keys: every video frame and 25 /s audio tokens."""
    axis, freqs = RotaryTime(kind=kind, fps=fps, max_seconds=5.0).layout(head_dim)
    from jointdit.model.joint_block import video_positions

    seconds = frames / fps
    pos_v = video_positions(frames, 1, 1, fps)
    keys = torch.cat([pos_v, audio_positions(round(seconds * 25), 1, seconds)])
    ones = torch.ones(1, 1, len(keys), head_dim)
    k = apply_rope(ones, rope_layout_angles(keys, axis, freqs))
    q = apply_rope(ones[:, :, :frames], rope_layout_angles(pos_v, axis, freqs))
    scores = (q[0, 0] @ k[0, 0].T).double()  # (frames, keys)
    far = (keys[None, :, 0] - pos_v[:, None, 0]).abs() >= 1 / fps - 1e-6
    aligned = scores.diagonal()
    best_far = scores.masked_fill(~far, float("-inf")).amax(1)
    return float(((aligned - best_far) / aligned).min())


@pytest.mark.parametrize("head_dim", [16, 64])  # the tiny and the real joint head
@pytest.mark.parametrize("frames,fps", [(12, 6.0), (14, 7.0), (35, 7.0)])  # ASVA, paper, 5 s
def test_aligned_rotary_time_finds_the_key_of_the_same_instant(head_dim, frames, fps):
    assert _positional_margin("aligned", head_dim, frames, fps) >= 0.15
    # the paper's ladder cannot tell a key a frame or more away from the aligned one
    assert _positional_margin("paper", head_dim, frames, fps) < 0.05


def test_paper_rotary_layout_is_the_old_even_split():
    # the old ladder: a quarter of the head per axis, base 10000, time in 1/25 s
    pos = torch.tensor([[0.3, 1.0, 2.0, 0.0], [1.1, 0.0, 0.0, 5.0]])
    share = 16 // 4
    freqs = 10000.0 ** (-torch.arange(0, share, 2) / share)
    old = (pos * torch.tensor([25.0, 1, 1, 1]))[..., None] * freqs
    torch.testing.assert_close(rope_angles(pos, 16), old.flatten(-2))
    axis, _ = RotaryTime(kind="aligned").layout(16)
    assert axis.tolist() == [0, 0, 0, 0, 1, 2, 3, 3]  # half the pairs on time
