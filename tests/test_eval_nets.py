"""The FVD (I3D) and ImageBind networks: the published weight files load as they are, random
weights go through the same loader, and each front end matches its reference convention.

The key/shape fixtures were listed from the reference sources (tests/fixtures/*_keys.txt name
the file and commit), so a full-size build equal to them loads the real file without renaming.
"""

from __future__ import annotations

from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import pytest
import torch
from PIL import Image

from jointdit.errors import UserError
from jointdit.evaluation import i3d
from jointdit.evaluation import imagebind as ib

FIXTURES = Path(__file__).parent / "fixtures"


def _published(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape from a fixture: `key 1280x3x2x14x14` per line, `()` for a scalar."""
    shapes = {}
    for line in (FIXTURES / name).read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split()
            shapes[key] = () if shape == "()" else tuple(int(n) for n in shape.split("x"))
    return shapes


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _pil_bicubic(channels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL's antialiased bicubic resize of float channels (C, H, W) to size (W, H)."""
    return np.stack(
        [
            np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize(size, Image.BICUBIC))
            for c in channels
        ]
    )


def _uint8(shape, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


# ---------------------------------------------------------------- I3D


def test_i3d_full_size_keys_and_shapes_are_the_published_ones(tmp_path):
    path = i3d.random_weights(tmp_path / "i3d_pretrained_400.pt", small=False)
    state = torch.load(path, weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == _published(
        "i3d_pretrained_400_keys.txt"
    )
    model = i3d.load(path)
    assert sum(p.numel() for p in model.net.parameters()) == 12_697_264
    assert i3d.features(model, _uint8((1, 9, 224, 224, 3))).shape == (1, 400)


@pytest.fixture(scope="module")
def small_i3d(tmp_path_factory) -> Path:
    return i3d.random_weights(tmp_path_factory.mktemp("i3d") / "i3d_pretrained_400.pt")


def test_i3d_random_weights_load_and_give_per_video_features(small_i3d):
    model = i3d.load(small_i3d)
    assert not model.torchscript
    videos = _uint8((2, 12, 64, 80, 3))
    feats = i3d.features(model, videos)
    assert feats.shape == (2, 400) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    assert not torch.allclose(feats[0], feats[1])
    torch.testing.assert_close(i3d.features(model, videos[1:].numpy()), feats[1:])


class _TorchScriptDetector(torch.nn.Module):
    """StyleGAN-V's detector call signature around the I3D built here."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(
        self,
        x: torch.Tensor,
        rescale: bool = True,
        resize: bool = True,
        return_features: bool = False,
    ) -> torch.Tensor:
        if rescale or resize or not return_features:
            raise RuntimeError(
                "ASVA calls the detector with rescale=False, resize=False, return_features=True"
            )
        return self.net(x)


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
def test_i3d_torchscript_file_is_called_as_asva_calls_it(tmp_path, small_i3d):
    net = i3d.load(small_i3d).net
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(_TorchScriptDetector(net)), str(path))
    model = i3d.load(path)
    assert model.torchscript
    videos = _uint8((1, 10, 224, 224, 3))
    # At 224 px both conventions reduce to the [-1, 1] mapping, so the two forms of the same
    # weights must agree; at 256 px the bicubic (TorchScript) and bilinear paths differ.
    torch.testing.assert_close(
        i3d.features(model, videos), i3d.features(i3d.load(small_i3d), videos)
    )
    large = _uint8((1, 10, 256, 256, 3))
    with torch.no_grad():
        expected = net(i3d.preprocess(large, torchscript=True))
    torch.testing.assert_close(i3d.features(model, large), expected)


def test_i3d_preprocessing_follows_each_reference():
    # Value range: 0 -> -1 and 255 -> 1 in both conventions.
    for torchscript in (True, False):
        ends = torch.stack([torch.zeros(1, 300, 260, 3), torch.full((1, 300, 260, 3), 255.0)], 1)
        x = i3d.preprocess(ends.to(torch.uint8), torchscript=torchscript)
        assert x.shape == (1, 3, 2, 224, 224)
        torch.testing.assert_close(x[:, :, 0], torch.full_like(x[:, :, 0], -1.0))
        torch.testing.assert_close(x[:, :, 1], torch.full_like(x[:, :, 1], 1.0))

    # VideoGPT: short side to 224 by bilinear (no antialias), centre crop. Halving 448 x 560
    # averages 2x2 blocks; the 280 px wide result loses 28 columns on each side.
    frame = _uint8((1, 1, 448, 560, 3), seed=1)
    blocks = frame[0, 0].double().reshape(224, 2, 280, 2, 3).mean(dim=(1, 3))[:, 28:252]
    x = i3d.preprocess(frame, torchscript=False)[0, :, 0].permute(1, 2, 0).double()
    torch.testing.assert_close(x, blocks / 255 * 2 - 1, atol=1e-6, rtol=0)

    # ASVA: 224 x 224 bicubic with antialias, as torchvision's Resize and PIL's bicubic.
    frame = _uint8((1, 1, 256, 256, 3), seed=2)
    x = i3d.preprocess(frame, torchscript=True)[0, :, 0].numpy()
    pil = _pil_bicubic(frame[0, 0].permute(2, 0, 1).numpy(), (224, 224)) / 255 * 2 - 1
    np.testing.assert_allclose(x, pil, atol=2e-4)


def test_i3d_refuses_bad_files_and_inputs_with_one_clear_line(tmp_path, small_i3d):
    with pytest.raises(
        UserError, match="i3d_pretrained_400.pt.*not found|not found.*i3d_pretrained_400.pt"
    ):
        i3d.load(tmp_path / "i3d_pretrained_400.pt")

    state = torch.load(small_i3d, weights_only=True)
    renamed = {k.replace("Mixed_4c.b1b", "Mixed_4c.branch_1b"): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(UserError, match=r"renamed.pt: key 'Mixed_4c.b1b.conv3d.weight' is missing"):
        i3d.load(tmp_path / "renamed.pt")

    resized = dict(state, **{"logits.conv3d.bias": torch.zeros(600)})
    torch.save(resized, tmp_path / "i3d_600.pt")
    with pytest.raises(UserError, match=r"key 'logits.conv3d.bias' has shape \(600,\)"):
        i3d.load(tmp_path / "i3d_600.pt")

    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match="list.pt: holds a list"):
        i3d.load(tmp_path / "list.pt")

    model = i3d.load(small_i3d)
    with pytest.raises(UserError, match="at least 9 frames"):
        i3d.features(model, _uint8((1, 8, 64, 64, 3)))
    with pytest.raises(UserError, match="uint8"):
        i3d.features(model, torch.zeros(1, 12, 64, 64, 3))


# ---------------------------------------------------------------- ImageBind


def test_imagebind_full_size_keys_and_shapes_are_the_published_ones():
    with torch.device("meta"):
        model = ib.ImageBind(ib.HUGE)
    assert _shapes(model) == _published("imagebind_huge_keys.txt")
    counts = {
        m: sum(p.numel() for k, p in model.named_parameters() if k.split(".")[1] == m)
        for m in ("vision", "audio", "text")
    }
    # The reference has one more text parameter: its learned logit scale, a buffer here.
    assert counts == {"vision": 632_829_440, "audio": 86_235_648, "text": 354_032_640}


@pytest.fixture(scope="module")
def small_imagebind(tmp_path_factory) -> Path:
    return ib.random_weights(tmp_path_factory.mktemp("imagebind") / "imagebind_huge.pth")


def test_imagebind_random_weights_load_and_embed(small_imagebind):
    model = ib.load(small_imagebind)
    frames = _uint8((3, 180, 240, 3))
    vision = ib.embed_vision(model, frames)
    assert vision.shape == (3, 1024)
    torch.testing.assert_close(vision.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(ib.embed_vision(model, frames[1:].numpy()), vision[1:])

    rng = np.random.default_rng(0)
    two_seconds = rng.standard_normal(32000).astype(np.float32) * 0.1
    audio = ib.embed_audio(model, two_seconds, 16000)
    assert audio.shape == (1024,)
    torch.testing.assert_close(audio.norm(), torch.tensor(1.0))  # the three clips coincide
    longer = ib.embed_audio(model, rng.standard_normal(56000).astype(np.float32) * 0.1, 16000)
    assert torch.isfinite(longer).all() and 0 < longer.norm() <= 1 + 1e-6


def test_imagebind_text_is_tokenized_and_embedded_as_imagebind_does(small_imagebind):
    ids = ib.tokenize(["a photo of a cat", "word " * 100])
    assert ids.shape == (2, 77)
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert not ids[0, 8:].any()
    assert ids[1, 0] == 49406 and ids[1, 76] == 49407  # truncated, the end token kept

    model = ib.load(small_imagebind)
    text = ib.embed_text(model, ["dog barking", "hammering"])
    assert text.shape == (2, 1024)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    # Causal attention: ids after the end token cannot change the embedding read there.
    after_end = ids[:1].clone()
    after_end[0, 10] = 1000
    with torch.no_grad():
        torch.testing.assert_close(model.encode("text", after_end), model.encode("text", ids[:1]))
        before_end = ids[:1].clone()
        before_end[0, 3] = 1000
        assert not torch.allclose(model.encode("text", before_end), model.encode("text", ids[:1]))


def test_imagebind_load_skips_other_modalities_and_refuses_foreign_files(tmp_path, small_imagebind):
    state = torch.load(small_imagebind, weights_only=True)
    with_depth = dict(
        state, **{"modality_trunks.depth.blocks.0.attn.in_proj_weight": torch.zeros(3, 1)}
    )
    torch.save(with_depth, tmp_path / "with_depth.pth")
    ib.load(tmp_path / "with_depth.pth")

    extra = dict(state, **{"modality_trunks.vision.extra": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(
        UserError, match=r"extra.pth: unexpected key 'modality_trunks.vision.extra'"
    ):
        ib.load(tmp_path / "extra.pth")

    missing = {k: v for k, v in state.items() if k != "modality_heads.audio.2.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"key 'modality_heads.audio.2.weight' is missing"):
        ib.load(tmp_path / "missing.pth")

    with pytest.raises(UserError, match="imagebind_huge.pth"):
        ib.load(tmp_path / "imagebind_huge.pth")
    with pytest.raises(UserError, match="1-D float wave"):
        ib.embed_audio(ib.load(small_imagebind), np.zeros((2, 16000), np.float32), 16000)


def _kaldi_native(wave: np.ndarray, num_bins: int, frame_length_ms: int) -> np.ndarray:
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "hanning"
    opts.frame_opts.frame_length_ms = frame_length_ms
    opts.mel_opts.num_bins = num_bins
    opts.mel_opts.low_freq = 20
    opts.mel_opts.high_freq = 0
    opts.use_energy = False
    opts.htk_compat = True
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000, wave.tolist())
    fbank.input_finished()
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


def _test_wave(n: int = 32000) -> np.ndarray:
    t = np.arange(n) / 16000
    noise = np.random.default_rng(0).standard_normal(n)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * noise).astype(np.float32)


@pytest.mark.parametrize("num_bins, frame_length_ms", [(64, 25), (128, 50)])
def test_kaldi_fbank_matches_kaldi_native_fbank(num_bins, frame_length_ms):
    # Kaldi refuses ImageBind's exact setting (128 bins on 512 FFT points leaves the lowest
    # filters empty), so it checks the frame pipeline at 25 ms and the 128 filters at 50 ms.
    wave = _test_wave()
    ref = _kaldi_native(wave, num_bins, frame_length_ms)
    ours = ib.kaldi_fbank(
        torch.from_numpy(wave), num_mel_bins=num_bins, frame_length_ms=frame_length_ms
    )
    assert ours.shape == ref.shape
    diff = np.abs(ours.numpy() - ref)
    # Kaldi computes in float32: its quietest bins carry ~1e-4 of rounding in the log.
    assert np.percentile(diff, 99) < 1e-4 and diff.max() < 5e-4


def _direct_kaldi_fbank(wave: np.ndarray) -> np.ndarray:
    """Kaldi's formulas written out frame by frame, for ImageBind's settings (as torchaudio
    runs them: empty filters stay at the log floor)."""
    win, hop, n_fft, bins, sr = 400, 160, 512, 128, 16000
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / (win - 1))

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    lo, hi = mel(20.0), mel(sr / 2)
    delta = (hi - lo) / (bins + 1)
    banks = np.zeros((bins, n_fft // 2 + 1))
    for m in range(bins):
        left, center, right = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
        for k in range(n_fft // 2):
            f = mel(k * sr / n_fft)
            if left < f < right:
                banks[m, k] = (
                    (f - left) / (center - left) if f <= center else (right - f) / (right - center)
                )
    rows = []
    for start in range(0, len(wave) - win + 1, hop):
        frame = wave[start : start + win].astype(np.float64)
        frame = frame - frame.mean()
        frame = frame - 0.97 * np.concatenate([frame[:1], frame[:-1]])
        power = np.abs(np.fft.rfft(frame * window, n_fft)) ** 2
        rows.append(np.log(np.maximum(banks @ power, np.finfo(np.float32).eps)))
    return np.array(rows)


def test_kaldi_fbank_at_imagebind_settings_matches_the_kaldi_formulas():
    wave = _test_wave()
    ours = ib.kaldi_fbank(torch.from_numpy(wave)).numpy()
    ref = _direct_kaldi_fbank(wave)
    assert ours.shape == ref.shape == (198, 128)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_audio_clips_and_melspec_follow_imagebind():
    # pytorchvideo's ConstantClipsPerVideoSampler(2 s, 3 clips): starts 0, d/2 - 1, d - 2 s.
    assert ib.audio_clips(32000) == [(0, 32000)] * 3
    assert ib.audio_clips(16000) == [(0, 32000)] * 3  # a short sound: three equal short clips
    assert ib.audio_clips(80000) == [(0, 32000), (24000, 56000), (48000, 80000)]
    spec = ib.melspec(torch.from_numpy(_test_wave()))
    assert spec.shape == (1, 128, 204)
    # 2 s give 198 frames; the 6 padded frames are zeros before normalisation.
    torch.testing.assert_close(spec[0, :, 198:], torch.full((128, 6), 4.268 / 9.138))
    assert ib.melspec(torch.from_numpy(_test_wave(48000))).shape == (1, 128, 204)


def test_resampling_keeps_a_tone_and_the_length():
    t = np.arange(48000) / 48000
    wave = torch.from_numpy(np.sin(2 * np.pi * 1000 * t).astype(np.float32))
    out = ib.resample(wave, 48000, 16000)
    assert out.shape == (16000,)
    expected = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    np.testing.assert_allclose(out[200:-200].numpy(), expected[200:-200], atol=2e-3)
    assert ib.resample(wave, 16000, 16000) is wave


def test_imagebind_frames_are_prepared_as_imagebind_does():
    # Short side to 224 (bicubic, antialiased: PIL's resize), centre crop, CLIP mean/std.
    frame = _uint8((1, 200, 300, 3), seed=3)
    x = ib.preprocess_frames(frame)[0].numpy()
    pil = _pil_bicubic(frame[0].permute(2, 0, 1).numpy(), (336, 224))[:, :, 56:280] / 255
    mean = np.array(ib.CLIP_MEAN)[:, None, None]
    std = np.array(ib.CLIP_STD)[:, None, None]
    np.testing.assert_allclose(x, (pil - mean) / std, atol=1e-3)
