"""Expert UNets run block by block (Input / segments / Output) equal their own forward."""

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel

from jointdit.model.experts import AudioExpert, VideoExpert
from jointdit.model.sizes import TINY_AUDIO_UNET, TINY_VIDEO_UNET


@pytest.fixture(scope="module")
def unets():
    torch.manual_seed(0)
    video = UNetSpatioTemporalConditionModel(**TINY_VIDEO_UNET, cross_attention_dim=32).eval()
    audio = AudioLDM2UNet2DConditionModel(**TINY_AUDIO_UNET).eval()
    return video, audio


def _sliced(expert, state):
    for i in range(expert.num_segments):
        state = expert.run_segment(i, state)
    return expert.end(state)


@pytest.mark.parametrize("segments", [[2, 1], [1, 1, 1], [3]])
@pytest.mark.parametrize("size", [(8, 8), (7, 9)])  # odd maps take the forced-upsample path
def test_sliced_video_unet_equals_forward(unets, segments, size):
    unet = unets[0]
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 5, 8, *size, generator=g)
    c_noise = torch.randn(2, generator=g)
    ctx = torch.randn(2, 1, 32, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02], [6.0, 127.0, 0.5]])
    expert = VideoExpert(unet, segments)
    with torch.no_grad():
        ref = unet(sample, c_noise, ctx, ids).sample
        out = _sliced(expert, expert.begin(sample, c_noise, ctx, ids))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("segments", [[2, 1], [1, 2]])
@pytest.mark.parametrize("frames", [50, 49])
def test_sliced_audio_unet_equals_forward(unets, segments, frames):
    unet = unets[1]
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 8, frames, 16, generator=g)
    steps = torch.tensor([3, 917])
    ctx, ctx_1 = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 48, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expert = AudioExpert(unet, segments)
    with torch.no_grad():
        ref = unet(
            sample,
            steps,
            ctx,
            encoder_attention_mask=mask,
            encoder_hidden_states_1=ctx_1,
            encoder_attention_mask_1=mask,
        ).sample
        out = _sliced(expert, expert.begin(sample, steps, ctx, mask, ctx_1, mask))
    assert torch.equal(out, ref)
    assert expert.context_widths == (32, 48)


def test_bad_segments_name_the_stages(unets):
    with pytest.raises(ValueError, match="sum to 3.*down1, mid0, up0"):
        VideoExpert(unets[0], [1, 1])
    with pytest.raises(ValueError, match="positive"):
        AudioExpert(unets[1], [3, 0])


@pytest.mark.parametrize("which", [0, 1])
def test_layer_checkpointing_gives_the_same_gradients(unets, which):
    unet = unets[which]
    expert = (VideoExpert if which == 0 else AudioExpert)(unet, [2, 1])
    g = torch.Generator().manual_seed(3)
    if which == 0:
        sample = torch.randn(1, 3, 8, 8, 8, generator=g)
        ctx = torch.randn(1, 1, 32, generator=g, requires_grad=True)  # trainable context
        args = (sample, torch.tensor([0.3]), ctx, torch.tensor([[6.0, 127.0, 0.02]]))
    else:
        sample = torch.randn(1, 8, 8, 16, generator=g)
        ctx = torch.randn(1, 2, 32, generator=g, requires_grad=True)
        args = (sample, torch.tensor([10]), ctx, None, torch.randn(1, 2, 48, generator=g), None)

    def grads(on):
        unet.zero_grad()
        ctx.grad = None
        expert.set_layer_checkpointing(on)
        assert expert.layer_checkpointing == on
        unet.train()
        out = _sliced(expert, expert.begin(*args))
        out.square().mean().backward()
        unet.eval()
        return [ctx.grad.clone()] + [p.grad.clone() for p in unet.parameters()]

    plain, ckpt = grads(False), grads(True)
    expert.set_layer_checkpointing(False)
    assert len(plain) == len(ckpt)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b)
