"""Frame-aligned fusion: zero at init, frame-local in both directions, nothing for iso rows;
audio hears what changes in the picture, not its static content."""

import pytest
import torch

from jointdit.model.joint_block import FrameFusion, JointBlock, frame_overlap

D, EMB = 16, 8


def _randomized(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def _tokens(b=1, frames=14, hw=4, ta=28, fa=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, frames * hw, D, generator=g), torch.randn(b, ta * fa, D, generator=g)


def _fuse(fusion, hv, ha, joint=None, frames=14, ta=28):
    emb = torch.ones(hv.shape[0], EMB)
    joint = torch.ones(hv.shape[0]) if joint is None else joint
    return fusion(hv, ha, frames, 7.0, ta, 2.0, emb, emb, joint)


def test_fusion_is_zero_at_init():
    hv, ha = _tokens()
    dv, da = _fuse(FrameFusion(D, EMB), hv, ha)
    assert not dv.any() and not da.any()


def test_frame_overlap_covers_each_frame_once():
    # 2 s: 14 frames, 28 audio tokens (two per frame); the 29th..32nd are time padding
    overlap = frame_overlap(14, 7.0, 32, 32 / 14)
    torch.testing.assert_close(overlap.sum(1), torch.full((14,), 1 / 7))
    assert not overlap[:, 28:].any()


@pytest.mark.parametrize("video", ["mean", "change"])
def test_an_audio_impulse_moves_only_its_own_frame_and_back(video):
    fusion = _randomized(FrameFusion(D, EMB, video))
    hv, ha = _tokens()
    dv, da = _fuse(fusion, hv, ha)
    # audio token 9 spans [9/14, 10/14) s, inside frame 4 = [4/7, 5/7) s
    kicked = ha.clone().reshape(1, 28, 2, D)
    impulse = 5 * torch.randn(D, generator=torch.Generator().manual_seed(2))
    kicked[:, 9] += impulse  # not a constant: the features are layer-normed
    dv2, da2 = _fuse(fusion, hv, kicked.reshape(ha.shape))
    changed = (dv2 - dv).abs().reshape(14, 4, D).amax((1, 2)) > 1e-6
    assert changed.tolist() == [k == 4 for k in range(14)]
    torch.testing.assert_close(da2, da)  # audio never hears itself through fusion
    # the other way round: video frame 4 reaches audio tokens 8 and 9 only
    seen = hv.clone().reshape(1, 14, 4, D)
    seen[:, 4] += impulse
    _, da3 = _fuse(fusion, seen.reshape(hv.shape), ha)
    moved = (da3 - da).abs().reshape(28, 2, D).amax((1, 2))
    own, others = moved[[8, 9]], moved[[i for i in range(28) if i not in (8, 9)]]
    if video == "mean":
        assert (own > 1e-6).all() and not (others > 1e-6).any()
    else:  # the clip's mean and RMS shift a little everywhere; the frame's own tokens most
        assert own.min() > 3 * others.max()


def test_audio_hears_what_changes_in_the_picture_not_its_static_content():
    hv, ha = _tokens(b=2)
    static = 3 * torch.randn(2, 1, 1, D, generator=torch.Generator().manual_seed(4))
    restyled = (hv.reshape(2, 14, 4, D) + static).reshape(hv.shape)  # same events, new scene
    for video, same in (("change", True), ("mean", False)):
        fusion = _randomized(FrameFusion(D, EMB, video))
        _, da = _fuse(fusion, hv, ha)
        _, da2 = _fuse(fusion, restyled, ha)
        assert torch.allclose(da2, da, atol=1e-3) == same
    frames = hv.reshape(2, 14, 4, D).mean(2)
    moving = FrameFusion.changes(frames)
    torch.testing.assert_close(moving.pow(2).mean((1, 2)), torch.ones(2))  # unit RMS per clip
    still = FrameFusion.changes(frames[:, :1].expand(2, 14, D))  # a clip where nothing happens
    assert still.abs().max() < 1e-3  # rounding is not blown up into events


def test_fusion_video_is_checked():
    with pytest.raises(ValueError, match="fusion_video 'motion' is not known"):
        FrameFusion(D, EMB, "motion")


@pytest.mark.parametrize("fusion_adaln", ["partner", "own"])
def test_iso_rows_get_no_fusion_in_the_joint_block(fusion_adaln):
    torch.manual_seed(0)
    block = _randomized(JointBlock(8, 8, D, 2, EMB, fusion=True, fusion_adaln=fusion_adaln))
    b, frames = 2, 3
    video, audio = torch.randn(b * frames, 8, 2, 2), torch.randn(b, 8, 6, 2)
    emb, ctx, cmask = torch.randn(b, EMB), torch.randn(b, 2, D), torch.ones(b, 2, dtype=bool)
    iso = torch.tensor([False, True])

    def run(aud, blk=block):
        return blk(video, aud, emb, emb, ctx, cmask, frames, 7.0, 6 / 25, iso)

    out_v, out_a = run(audio)
    other_v, _ = run(torch.randn_like(audio))
    assert not torch.allclose(other_v[:frames], out_v[:frames])  # the joint row hears audio
    torch.testing.assert_close(other_v[frames:], out_v[frames:])  # the iso row does not
    fusion, block.fusion = block.fusion, None
    plain_v, plain_a = run(audio)  # the same block without the fusion path
    block.fusion = fusion
    torch.testing.assert_close(out_v[frames:], plain_v[frames:])
    torch.testing.assert_close(out_a[1:], plain_a[1:])
    assert not torch.allclose(out_v[:frames], plain_v[:frames])
