"""Codecs on tiny random models saved in the checkpoints/pretrained/ layout (no downloads)."""

import json

import numpy as np
import pytest
import torch
from transformers.audio_utils import mel_filter_bank

from jointdit.codecs import load_codecs
from jointdit.codecs.audio import log_mel
from jointdit.codecs.clip_tokenizer import build_clip_tokenizer
from jointdit.codecs.tiny import build_tiny_codecs, codecs_overrides, save_codecs
from jointdit.config import load_config
from jointdit.errors import UserError


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt") / "checkpoints" / "pretrained"
    return save_codecs(build_tiny_codecs(seed=0), root)


@pytest.fixture(scope="module")
def codecs(pretrained):
    return load_codecs(load_config(None, codecs_overrides(pretrained), env={}).codecs)


def frames(t=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(t, 3, 64, 64, generator=g) * 2 - 1


def test_video_encode_decode_shapes(codecs):
    video = codecs.video
    x = frames()
    mean, std = video.encode(x)
    assert mean.shape == std.shape == (14, 4, 8, 8)
    assert video.spatial_factor == 8 and video.latent_channels == 4
    assert (std > 0).all()
    first = video.encode_first_frame(x[0])
    # the first-frame latent is the unscaled posterior mean (SVD convention)
    torch.testing.assert_close(first * video.scaling_factor, mean[0], rtol=1e-4, atol=1e-5)
    out = video.decode(mean)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1


def test_chunked_decode_keeps_frames_and_bounds_the_batch(codecs, monkeypatch):
    video = codecs.video
    z = torch.randn(37, 4, 8, 8)
    seen = []
    decode = video.vae.decode

    def spy(latents, num_frames):
        seen.append((latents.shape[0], num_frames))
        return decode(latents, num_frames=num_frames)

    monkeypatch.setattr(video.vae, "decode", spy)
    out = video.decode(z, chunk=8)
    assert out.shape == (37, 3, 64, 64)
    assert seen == [(8, 8)] * 4 + [(5, 5)]  # peak memory follows the chunk, not the clip
    seen.clear()
    whole = video.decode(z[:8], chunk=8)
    halves = video.decode(z[:8], chunk=4)
    assert whole.shape == halves.shape  # values differ: temporal layers see only their chunk
    assert seen == [(8, 8), (4, 4), (4, 4)]


def test_decode_chunk_follows_env_knob(pretrained):
    cfg = load_config(None, codecs_overrides(pretrained), env={"JOINTDIT_VID_DECODE_CHUNK": "3"})
    assert load_codecs(cfg.codecs).video.decode_chunk == 3


def test_mel_matches_audioldm2_front_end():
    sr, n = 16000, 32000
    t = np.arange(n) / sr
    wave = 0.5 * np.sin(2 * np.pi * 1000 * t)
    mel = log_mel(torch.from_numpy(wave).float())
    assert mel.shape == (200, 64)  # hop 160 -> 100 frames per second
    # independent numpy reference: reflect pad 432, periodic hann 1024, |rfft|, slaney mels
    padded = np.pad(wave, 432, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(1024) / 1024)
    spec = np.stack(
        [np.abs(np.fft.rfft(padded[i * 160 : i * 160 + 1024] * window)) for i in range(200)]
    )
    fb = mel_filter_bank(513, 64, 0, 8000, 16000, norm="slaney", mel_scale="slaney")
    ref = np.log(np.clip(spec @ fb, 1e-5, None))
    np.testing.assert_allclose(mel.numpy(), ref, atol=2e-3)
    assert fb[:, -1].nonzero()[0].max() <= 512 and fb.sum(0).min() > 0  # 64 bands up to 8 kHz
    silence = log_mel(torch.zeros(16000))
    torch.testing.assert_close(silence, torch.full((100, 64), float(np.log(1e-5))))


def test_audio_shapes_and_vocoder_length(codecs):
    audio = codecs.audio
    wave = torch.randn(32000) * 0.1
    mean, std = audio.encode(wave)
    assert mean.shape == std.shape == (8, 50, 16)
    assert audio.mel(wave).shape == (200, 64)
    assert audio.decode(mean, 32000).shape == (32000,)
    assert audio.decode(mean, 31000).shape == (31000,)
    # the raw vocoder overshoots a little: 160 samples per frame or more, cropped on decode
    raw = audio.vocoder(audio.decode_mel(mean)[None])[0]
    assert raw.shape[0] >= 200 * 160
    odd, _ = audio.encode(torch.randn(20800) * 0.1)  # 130 frames -> padded to 132
    assert odd.shape == (8, 33, 16)
    with pytest.raises(ValueError, match="samples"):
        audio.decode(mean, 40000)


@pytest.mark.parametrize("n", [32159, 16080, 16001, 20800])
def test_audio_round_trip_any_sample_count(codecs, n):
    """decode(encode(w)[0], len(w)) for lengths that are not a multiple of the hop (issue 12)."""
    wave = torch.randn(n) * 0.1
    assert codecs.audio.decode(codecs.audio.encode(wave)[0], n).shape == (n,)


def test_conditions(codecs):
    cond = codecs.cond
    assert (cond.image_dim, cond.text_dim, cond.max_text_len) == (32, 32, 16)
    x = frames(2)
    a, b = cond.image(x[0]), cond.image(x[1])
    assert a.shape == (32,) and not torch.allclose(a, b)
    torch.testing.assert_close(cond.image(x[0]), a)
    emb, mask = cond.text(["a photo of a cat", "word " * 40])
    assert emb.shape == (2, 16, 32) and mask.dtype == torch.int64
    assert mask[0].tolist() == [1] * 7 + [0] * 9 and mask[1].sum() == 16  # truncated


def test_clip_tokenizer_is_the_real_vocabulary():
    tok = build_clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_missing_folder_names_the_fix(tmp_path):
    cfg = load_config(None, codecs_overrides(tmp_path / "checkpoints" / "embedded"), env={})
    with pytest.raises(UserError, match="make tiny-models"):
        load_codecs(cfg.codecs)
    cfg = load_config(None, codecs_overrides(tmp_path / "nowhere"), env={})
    with pytest.raises(UserError, match="make fetch-models"):
        load_codecs(cfg.codecs)


def test_tiny_models_train_save_report_and_enforce_the_bar(tmp_path):
    from conftest import REPO

    from jointdit.codecs.tiny_train import train_tiny_codecs
    from jointdit.data.synthetic import generate

    steps = [
        "codecs.tiny.video_steps=2",
        "codecs.tiny.audio_steps=2",
        "codecs.tiny.vocoder_steps=2",
    ]
    base = [
        f"data.root={tmp_path / 'synth'}",
        "data.synth.num_train=2",
        "data.synth.num_test=1",
        f"codecs.tiny.out_dir={tmp_path / 'embedded'}",
        "codecs.tiny.val_clips=1",
        *steps,
    ]
    cfg = load_config(REPO / "configs/demo/base.yaml", base, env={})
    generate(tmp_path / "synth", cfg.data, seed=0, progress=False)
    # 2 steps cannot reach the real bars (the colour one among them, when it is set)
    strict = [*base, "codecs.tiny.colour_err_bar=32.0"]
    with pytest.raises(UserError, match="video_psnr_db.*video_colour_err"):
        train_tiny_codecs(load_config(REPO / "configs/demo/base.yaml", strict, env={}))
    lenient = ["codecs.tiny.psnr_bar=0.0", "codecs.tiny.psnr_gain_bar=-100.0"]
    lenient += ["codecs.tiny.mel_l1_bar=100.0"]
    lenient += ["codecs.tiny.flash_bar=0.0", "codecs.tiny.onset_bar=0.0"]
    figures = train_tiny_codecs(
        load_config(REPO / "configs/demo/base.yaml", base + lenient, env={})
    )
    assert set(figures) >= {
        "video_psnr_db",
        "video_mean_frame_psnr_db",
        "video_colour_err",
        "video_recolour_err",
        "audio_mel_l1",
        "flash_detect",
        "onset_recall",
        "onset_recall_metric",
    }
    # the colour error per event family too (one held-out clip here: one family)
    assert [k for k in figures if k.startswith("video_colour_err_")] in (
        ["video_colour_err_flash"],
        ["video_colour_err_bounce"],
    )
    report = json.loads((tmp_path / "embedded" / "quality.json").read_text())
    assert report["passed"] is True
    # the recipe the demo checks before re-using them; the bars are not part of it
    from jointdit.codecs.tiny import recipe

    assert report["recipe"] == recipe(cfg.codecs.tiny)
    assert report["recipe"]["settings"]["video_steps"] == 2
    saved = tmp_path / "embedded"
    assert (saved / "quality.json").is_file() and (saved / "config.yaml").is_file()
    codecs = load_codecs(load_config(None, codecs_overrides(saved), env={}).codecs)
    assert codecs.video.encode(frames(4))[0].shape == (4, 4, 8, 8)
    assert codecs.audio.vocoder.config.upsample_rates == [5, 4, 4, 2]


def test_codec_report_tells_reading_colour_from_recalling_it(codecs):
    from jointdit.codecs.tiny_train import Example, evaluate

    clip = -torch.ones(6, 3, 64, 64)
    clip[:, :, 20:40, 20:40] = torch.tensor([-0.4, 0.1, 1.0])[:, None, None]  # a blue square
    audio = torch.zeros(16000)
    data = [Example(clip, audio, log_mel(audio), {"family": "flash"})]

    class Exact:  # gives back what it was given
        def encode(self, x):
            return x, None

        def decode(self, z):
            return z

    class Recalls(Exact):  # always draws the object in the colour it learned
        def decode(self, z):
            return clip

    exact = evaluate(Exact(), codecs.audio, data)
    assert exact["video_colour_err"] == exact["video_recolour_err"] == 0.0
    assert exact["video_colour_err_flash"] == 0.0
    recalls = evaluate(Recalls(), codecs.audio, data)
    assert recalls["video_colour_err"] == 0.0
    # RGB -> BRG turns the square's (-0.4, 0.1, 1.0) into (1.0, -0.4, 0.1): the recalled colour
    # is off by 1.4, 0.5 and 0.9 (in [-1, 1]), i.e. 119 in 0-255 units
    assert recalls["video_recolour_err"] == pytest.approx(255 * (1.4 + 0.9 + 0.5) / 2 / 3, rel=1e-4)


def test_video_vae_training_starts_from_a_small_posterior():
    from jointdit.codecs.tiny_train import VIDEO_INIT_LOGVAR, _start_posterior_small

    vae = build_tiny_codecs(seed=0).video_vae
    fresh = vae.encode(frames(2)).latent_dist
    assert fresh.std.mean() > 2 * fresh.mean.std()  # as built: the latents drown in noise
    _start_posterior_small(vae, VIDEO_INIT_LOGVAR)
    small = vae.encode(frames(2)).latent_dist
    torch.testing.assert_close(small.mean, fresh.mean)  # the means are untouched
    torch.testing.assert_close(small.std, torch.full_like(small.std, np.exp(VIDEO_INIT_LOGVAR / 2)))
    assert small.mean.std() > 2 * small.std.mean()


def test_audio_vae_output_starts_at_the_mean_mel_level():
    from jointdit.codecs.tiny_train import Example, _start_output_at_mean

    vae = build_tiny_codecs(seed=0).audio_vae
    mels = [torch.full((64, 64), -11.5), torch.full((64, 64), -9.5)]
    data = [Example(torch.zeros(1), torch.zeros(1), m, {}) for m in mels]
    z = torch.zeros(1, vae.config.latent_channels, 16, 16)
    fresh = vae.decode(z).sample.mean().item()
    bias = vae.decoder.conv_out.bias.mean().item()  # a small random start, as built
    _start_output_at_mean(vae, data)
    started = vae.decode(z).sample.mean().item()
    assert abs(fresh) < 1.0  # as built: a zero-level output, 10 log units from the mels
    assert started - fresh == pytest.approx(-10.5 - bias, abs=1e-3)


def test_each_tiny_codec_draws_its_own_starting_weights():
    import jointdit.codecs.tiny as tiny

    before = build_tiny_codecs(seed=0)
    resized = dict(tiny.VIDEO_VAE, block_out_channels=(32, 32, 32, 32))
    saved = tiny.VIDEO_VAE
    try:
        tiny.VIDEO_VAE = resized  # resizing one codec ...
        after = build_tiny_codecs(seed=0)
    finally:
        tiny.VIDEO_VAE = saved
    # ... leaves the others' weights as they were
    for name in ("audio_vae", "vocoder", "image_encoder", "text_encoder"):
        for a, b in zip(getattr(before, name).parameters(), getattr(after, name).parameters()):
            torch.testing.assert_close(a, b)
    assert (
        before.video_vae.decoder.conv_in.out_channels
        != after.video_vae.decoder.conv_in.out_channels
    )


def test_video_loss_weighs_the_object_over_the_background():
    from types import SimpleNamespace

    from jointdit.codecs.tiny_train import Example, _video_loss

    clip = torch.full((6, 3, 64, 64), -0.88)
    clip[:, 0, 20:36, 20:36] = 0.9  # a red square: 256 object pixels
    example = Example(clip, torch.zeros(1), torch.zeros(1, 64), {})

    class Identity:  # a "VAE" that returns its input plus a fixed error
        def __init__(self, error):
            self.error = error

        def encode(self, x):
            dist = SimpleNamespace(sample=lambda: x, kl=lambda: torch.zeros(1), mean=x)
            return SimpleNamespace(latent_dist=dist)

        def decode(self, z, num_frames):
            return SimpleNamespace(sample=z + self.error)

    on_object, on_background = torch.zeros(3, 64, 64), torch.zeros(3, 64, 64)
    on_object[:, 20:36, 20:36] = 0.2
    on_background[:, 40:56, 40:56] = 0.2  # the same error on as many background pixels
    for weight, ratio in ((0.0, 1.0), (8.0, 9.0)):
        t = SimpleNamespace(video_batch=1, video_crop=64, video_object_weight=weight)
        losses = [
            _video_loss(Identity(e), [example], t, chunk=4).item()
            for e in (on_object, on_background)
        ]
        assert losses[0] / losses[1] == pytest.approx(ratio, rel=1e-4)


@pytest.mark.parametrize("size", [(320, 576), (64, 96), (224, 224), (100, 90)])
def test_clip_resize_is_svds(size):
    """The picture reaches CLIP resized exactly as SVD's pipeline resizes it (blur + bicubic)."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        _resize_with_antialiasing,
    )

    from jointdit.codecs.conditions import svd_resize

    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(
        svd_resize(x, (224, 224)), _resize_with_antialiasing(x, (224, 224)), rtol=0, atol=1e-5
    )
