"""JointDiT: zero-init equals the experts, iso cuts cross-modal paths, levers, freezing."""

import json

import pytest
import torch

from jointdit.config import load_config
from jointdit.errors import UserError
from jointdit.model import build_model

B = 2


def _model(*overrides):
    torch.manual_seed(0)
    return build_model(load_config(overrides=overrides)).eval()


def _inputs(seed=0, b=B, frames=6, audio_frames=22):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, 16, dtype=torch.long)
    mask[0, 5:] = 0
    return dict(
        video=torch.randn(b, frames, 4, 8, 8, generator=g),
        audio=torch.randn(b, 8, audio_frames, 16, generator=g),
        video_timestep=torch.randn(b, generator=g),
        audio_timestep=torch.randint(0, 1000, (b,), generator=g),
        video_t=torch.rand(b, generator=g),
        audio_t=torch.rand(b, generator=g),
        first_frame=torch.randn(b, 4, 8, 8, generator=g),
        cond_aug=torch.full((b,), 0.02),
        image_emb=torch.randn(b, 32, generator=g),
        text_emb=torch.randn(b, 16, 32, generator=g),
        text_mask=mask,
    )


def _randomize_joint_blocks(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.joint_blocks.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


TIME_ALIGNED = ("model.rope_time=aligned", "model.frame_fusion=true")


@pytest.mark.parametrize("overrides", [(), TIME_ALIGNED], ids=["paper", "aligned+fusion"])
def test_zero_init_jointdit_equals_the_two_experts(overrides):
    model = _model(*overrides)
    x = _inputs()
    with torch.no_grad():
        video, audio = model(**x)
        image_tok, ctx, ctx_mask = model.context(x["image_emb"], x["text_emb"], x["text_mask"])
        ref_v = model.video_expert.unet(
            torch.cat([x["video"], x["first_frame"][:, None].expand_as(x["video"])], 2),
            x["video_timestep"],
            image_tok,
            model.added_time_ids(x["cond_aug"]),
        ).sample
        ref_a = model.audio_expert.unet(
            x["audio"],
            x["audio_timestep"],
            model.audio_context_proj(ctx),
            encoder_attention_mask=ctx_mask,
            encoder_hidden_states_1=model.audio_context_proj_1(ctx),
            encoder_attention_mask_1=ctx_mask,
        ).sample
    assert torch.equal(video, ref_v)
    assert torch.equal(audio, ref_a)


def test_audio_is_padded_to_the_unet_multiple_and_cropped_back():
    model = _model()
    x = _inputs(audio_frames=21)
    with torch.no_grad():
        video, audio = model(**x)
    assert video.shape == x["video"].shape and audio.shape == x["audio"].shape


def test_iso_mode_has_no_cross_modal_dependence():
    model = _model()
    _randomize_joint_blocks(model)
    x = _inputs()
    other = {**x, "audio": torch.randn_like(x["audio"])}
    with torch.no_grad():
        iso_v = model(**x, iso=True)[0]
        iso_v2 = model(**other, iso=True)[0]
        joint_v = model(**x)[0]
        joint_v2 = model(**other)[0]
        # Per-row iso: row 0 iso, row 1 joint.
        rows = torch.tensor([True, False])
        mixed_v = model(**other, iso=rows)[0]
    torch.testing.assert_close(iso_v, iso_v2)
    assert not torch.allclose(joint_v, joint_v2)  # positive control: joint mode does listen
    torch.testing.assert_close(mixed_v[0], iso_v[0])
    torch.testing.assert_close(mixed_v[1], joint_v2[1])


def test_query_chunks_and_grad_ckpt_are_exact():
    model = _model()
    _randomize_joint_blocks(model)
    x = _inputs()

    def run(**levers):
        model.set_memory(q_chunk_v=0, q_chunk_a=0, grad_ckpt=False)
        model.set_memory(**levers)
        model.zero_grad()
        model.train()
        v, a = model(**x)
        (v.square().mean() + a.square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return v.detach(), a.detach(), grads

    ref = run()
    for levers in ({"q_chunk_v": 50, "q_chunk_a": 7}, {"grad_ckpt": True}):
        v, a, grads = run(**levers)
        torch.testing.assert_close(v, ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, ref[1], rtol=1e-5, atol=1e-5)
        assert grads.keys() == ref[2].keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref[2][n], rtol=1e-4, atol=1e-5, msg=n)


def test_frozen_experts_get_no_gradients():
    model = _model()
    model.freeze_experts(["video_expert.unet.conv_out"])
    model.train()
    v, a = model(**_inputs())
    (v.mean() + a.mean()).backward()
    for name, p in model.named_parameters():
        if name.startswith("video_expert.unet.conv_out"):
            assert p.requires_grad and p.grad is not None, name
        elif name.startswith(("video_expert.", "audio_expert.")):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad, name
    # The zero-init output projections get gradient in Stage A, so the joint blocks learn.
    assert model.joint_blocks[0].video_out.weight.grad.abs().sum() > 0
    assert model.joint_blocks[-1].audio_out.weight.grad.abs().sum() > 0


def test_dropped_conditions_use_the_null_embeddings():
    model = _model()
    x = _inputs()
    drop = torch.tensor([True, False])
    image_tok, ctx, mask = model.context(x["image_emb"], x["text_emb"], x["text_mask"], drop, drop)
    assert torch.equal(image_tok[0, 0], model.null_image_emb.detach())
    assert torch.equal(image_tok[1, 0], x["image_emb"][1])
    assert mask[0].tolist() == [True, True] + [False] * 15  # image token + one null text token
    assert mask[1].tolist() == [True] + x["text_mask"][1].bool().tolist()


def test_max_t_caps_frames():
    model = _model("memory.max_t=4")
    with pytest.raises(UserError, match="JOINTDIT_MAX_T"):
        model(**_inputs(frames=6))


def test_unknown_size_and_missing_pretrained_folder_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="accepted: tiny"):
        _model("model.size=huge")
    with pytest.raises(UserError, match="make fetch-models"):
        _model("model.size=svd+audioldm2", f"model.video_unet={tmp_path}/none")


def test_pretrained_size_loads_saved_experts(tmp_path):
    tiny = _model()
    tiny.video_expert.unet.save_pretrained(tmp_path / "svd")
    tiny.audio_expert.unet.save_pretrained(tmp_path / "audioldm2")
    assert json.loads((tmp_path / "svd" / "config.json").read_text())["cross_attention_dim"] == 32
    common = (
        "model.size=svd+audioldm2",
        f"model.video_unet={tmp_path}/svd",
        f"model.audio_unet={tmp_path}/audioldm2",
        "model.video_segments=[2,1]",
        "model.audio_segments=[2,1]",
        "model.joint_dim=32",
        "model.joint_heads=2",
    )
    loaded = _model(*common)
    torch.testing.assert_close(
        loaded.audio_expert.unet.conv_in.weight, tiny.audio_expert.unet.conv_in.weight
    )
    torch.manual_seed(1)
    random = build_model(load_config(overrides=(*common, "model.random_init=true")))
    assert not torch.equal(
        random.audio_expert.unet.conv_in.weight, tiny.audio_expert.unet.conv_in.weight
    )
    x = _inputs(b=1)  # the pretrained size's audio expert reads AudioLDM2's prompt encoding
    g = torch.Generator().manual_seed(2)
    x |= {
        "audio_cond": torch.randn(1, 8, 32, generator=g),
        "audio_cond_1": torch.randn(1, 5, 48, generator=g),
        "audio_cond_1_mask": torch.ones(1, 5, dtype=torch.long),
    }
    with torch.no_grad():
        assert loaded(**x)[1].shape == x["audio"].shape
