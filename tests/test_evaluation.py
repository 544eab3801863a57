"""The evaluation suite (jointdit/evaluation): distances, weights, front ends, protocol."""

import importlib.util
import json
import socket
import urllib.request

import numpy as np
import pytest
import scipy.linalg
import torch

from jointdit.evaluation.fd import Gaussian, frechet_distance, kvd
from tests.conftest import REPO


def _scipy_fd(x: np.ndarray, y: np.ndarray) -> float:
    """The reference form: sqrtm of the product of the covariances."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("n", [500, 40])  # more and fewer features than dimensions
def test_frechet_distance_matches_scipy(n):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 64))
    y = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.5
    ours = frechet_distance(Gaussian.of(x), Gaussian.of(y))
    assert ours == pytest.approx(_scipy_fd(x, y), rel=1e-6)
    # rank-deficient covariances (n < D) leave rounding noise of ~1e-8 of the trace
    assert frechet_distance(Gaussian.of(x), Gaussian.of(x)) == pytest.approx(0.0, abs=1e-5)


def test_frechet_distance_closed_form_gaussians():
    """Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2, exactly."""
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([3.0, 1.0, 0.0])
    got = frechet_distance(Gaussian(mu1, np.diag(a), 0), Gaussian(mu2, np.diag(b), 0))
    want = 9 + 4 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert got == pytest.approx(want, rel=1e-12)
    # a full covariance: rotating both Gaussians together changes nothing
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    rotated = frechet_distance(
        Gaussian(q @ mu1, q @ np.diag(a) @ q.T, 0), Gaussian(q @ mu2, q @ np.diag(b) @ q.T, 0)
    )
    assert rotated == pytest.approx(want, rel=1e-9)


def test_kvd_reference_estimator():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 5)), rng.normal(size=(7, 5)) + 1.0
    kxx, kyy, kxy = ((a @ b.T / 5 + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    want = (kxx.sum() - np.trace(kxx)) / 30 + (kyy.sum() - np.trace(kyy)) / 42 - 2 * kxy.mean()
    assert kvd(x, y) == pytest.approx(want, rel=1e-12)
    # the unbiased within-set terms: two copies of one set give -2 (m tr K - sum K) / (m^2 (m-1))
    m, k = len(x), kxx
    assert kvd(x, x) == pytest.approx(-2 * (m * np.trace(k) - k.sum()) / (m * m * (m - 1)))
    # and two large samples of one distribution are ~0, far below a shifted one
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    assert abs(kvd(a, b)) < 0.02 * kvd(a, b + 0.5)


def test_distances_refuse_bad_shapes():
    with pytest.raises(ValueError, match="feature sizes differ"):
        kvd(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        Gaussian.of(np.zeros((1, 4)))


# ---------------------------------------------------------------------------------------------
# VGGish (FAD)

# The published torchvggish state dict: conv 3x3 layers at these Sequential indices, then the
# embedding MLP (vggish-10086976.pth's keys and shapes).
VGGISH_PUBLISHED = {
    **{
        f"features.{i}.weight": (out, cin, 3, 3)
        for i, cin, out in (
            (0, 1, 64),
            (3, 64, 128),
            (6, 128, 256),
            (8, 256, 256),
            (11, 256, 512),
            (13, 512, 512),
        )
    },
    **{
        f"features.{i}.bias": (out,)
        for i, out in ((0, 64), (3, 128), (6, 256), (8, 256), (11, 512), (13, 512))
    },
    "embeddings.0.weight": (4096, 12288),
    "embeddings.0.bias": (4096,),
    "embeddings.2.weight": (4096, 4096),
    "embeddings.2.bias": (4096,),
    "embeddings.4.weight": (128, 4096),
    "embeddings.4.bias": (128,),
}


def _reference_log_mel(wave: np.ndarray) -> np.ndarray:
    """AudioSet's VGGish front end written out from its description, loop by loop: 400-sample
    periodic-Hann frames every 160 samples, |FFT| on 512 points, 64 HTK-mel triangles whose
    edges are evenly spaced in mel from 125 to 7500 Hz (DC bin excluded), log(x + 0.01)."""
    win, hop, n_fft, sr = 400, 160, 512, 16000
    hann = [0.5 - 0.5 * np.cos(2 * np.pi * k / win) for k in range(win)]
    n_frames = 1 + (len(wave) - win) // hop
    spec = np.array(
        [np.abs(np.fft.rfft(wave[t * hop : t * hop + win] * hann, n_fft)) for t in range(n_frames)]
    )

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    edges = np.linspace(mel(125.0), mel(7500.0), 66)
    out = np.zeros((n_frames, 64))
    for band in range(64):
        lo, mid, hi = edges[band : band + 3]
        for b in range(1, n_fft // 2 + 1):
            m = mel(b * sr / n_fft)
            w = max(0.0, min((m - lo) / (mid - lo), (hi - m) / (hi - mid)))
            out[:, band] += w * spec[:, b]
    return np.log(out + 0.01)


def test_vggish_log_mel_matches_the_published_recipe():
    from jointdit.evaluation import vggish

    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.normal(size=t.size)
    got = vggish.log_mel(wave).numpy()
    assert got.shape == (98, 64)
    np.testing.assert_allclose(got, _reference_log_mel(wave), rtol=1e-9, atol=1e-9)
    # 2 s -> 198 frames -> 2 whole examples of 96 frames (the rest is dropped)
    assert tuple(vggish.examples(np.zeros(32000)).shape) == (2, 1, 96, 64)
    with pytest.raises(ValueError, match="16000 Hz"):
        vggish.log_mel(wave, 22050)


def test_vggish_has_the_published_keys_and_loads_random_weights(tmp_path):
    from jointdit.errors import UserError
    from jointdit.evaluation import vggish

    with torch.device("meta"):  # the published size, without allocating it
        full = vggish.VGGish()
    assert {k: tuple(v.shape) for k, v in full.state_dict().items()} == VGGISH_PUBLISHED
    path = vggish.random_weights(tmp_path / "vggish-10086976.pth")
    model = vggish.load(path)
    state = torch.load(path, weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    emb = vggish.embed(model, np.random.default_rng(0).normal(size=32000) * 0.1, 16000)
    assert emb.shape == (2, 128)
    assert (emb < 0).any()  # no final ReLU
    torch.save({"embeddings.0.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="bad.pth: does not fit VGGish"):
        vggish.load(tmp_path / "bad.pth")


# ---------------------------------------------------------------------------------------------
# CLIP and CLAP text scores


@pytest.mark.parametrize("kind", ["clip", "clap"])
def test_text_scores_on_random_weight_folders(tmp_path, kind):
    from jointdit.evaluation import text_scores

    folder = getattr(text_scores, f"random_{kind}")(tmp_path / kind)
    scorer = getattr(text_scores, f"load_{kind}")(folder)
    rng = np.random.default_rng(0)
    if kind == "clip":
        frames = rng.integers(0, 256, size=(3, 40, 56, 3), dtype=np.uint8)
        score = text_scores.clip_score(scorer, frames, "a dog barks")
        # the mean of per-frame cosines, each computed by hand from the model's own embeddings
        pixels = scorer.processor(images=list(frames), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            img = scorer.model.get_image_features(pixel_values=pixels).pooler_output
            tok = scorer.tokenizer(["a dog barks"], return_tensors="pt")
            txt = scorer.model.get_text_features(**tok).pooler_output
        want = torch.nn.functional.cosine_similarity(img, txt).mean()
        assert score == pytest.approx(float(want), abs=1e-5)
    else:
        wave = rng.normal(size=32000) * 0.1
        score = text_scores.clap_score(scorer, wave, 16000, "a dog barks")
        # the same sound given at 48 kHz scores the same (resampled to the extractor's rate)
        again = text_scores.clap_score(scorer, np.repeat(wave, 3), 48000, "a dog barks")
        assert abs(score - again) < 0.05
    assert -1.0 <= score <= 1.0
    assert score != text_scores.__dict__[f"{kind}_score"](
        scorer, *((frames,) if kind == "clip" else (wave, 16000)), "loud music and the cat meows"
    )


def test_text_score_folder_incomplete(tmp_path):
    from jointdit.errors import UserError
    from jointdit.evaluation import text_scores

    (tmp_path / "clip").mkdir()
    with pytest.raises(UserError, match="clip: not a complete CLIPModel folder"):
        text_scores.load_clip(tmp_path / "clip")


# ---------------------------------------------------------------------------------------------
# AV-Align, published form

CLICK_TIMES = (0.5, 1.0, 1.5)


def _square_jumps(fps: int = 12, n: int = 24) -> np.ndarray:
    """A white square that jumps 14 px right at each click time (uint8 (T, 64, 64, 3))."""
    frames = np.zeros((n, 64, 64, 3), np.uint8)
    x = 4
    for t in range(n):
        x += 14 * any(abs(t / fps - e) < 1e-9 for e in CLICK_TIMES)
        frames[t, 20:36, x : x + 16] = 255
    return frames


def _clicks(length_s: float, sr: int = 16000) -> np.ndarray:
    wave, n = np.zeros(2 * sr), round(length_s * sr)
    for e in CLICK_TIMES:
        wave[round(e * sr) : round(e * sr) + n] += np.hanning(n)
    return wave


def test_av_align_reference_on_a_synchronised_click_track():
    from jointdit import metrics
    from jointdit.evaluation import av_align

    frames = _square_jumps()
    np.testing.assert_allclose(av_align.video_peaks(frames, 12), CLICK_TIMES)
    onsets = av_align.audio_peaks(_clicks(0.010), 16000)
    # librosa's frame grid: 512 / 22050 s; each click's onset is the first frame after it
    np.testing.assert_allclose(onsets, [22 * 512 / 22050, 44 * 512 / 22050, 65 * 512 / 22050])
    assert av_align.av_align(frames, _clicks(0.010), 12, 16000) == 1.0
    late = np.roll(_clicks(0.010), 4000)  # the sound 0.25 s late: three frames off
    assert av_align.av_align(frames, late, 12, 16000) == 0.0
    # the trap: 80 ms clicks give librosa two onsets each (attack, then ~0.1 s later), so the
    # published score of a perfectly synchronised clip is 3 / (6 + 3 - 3) = 0.5; the repo's own
    # detector (one onset per sound event) scores it 1
    slow = _clicks(0.080)
    assert len(av_align.audio_peaks(slow, 16000)) == 6
    assert av_align.av_align(frames, slow, 12, 16000) == 0.5
    pictures = frames.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    assert metrics.av_align(pictures, slow, 12, 16000) == 1.0


def test_av_align_reference_iou_is_not_one_to_one():
    from jointdit.evaluation.av_align import iou

    assert iou(np.array([0.5, 0.52]), np.array([0.5]), fps=12) == 2.0  # 2 / (2 + 1 - 2)
    assert iou(np.array([0.5]), np.array([0.5 + 1 / 12]), fps=12) == 0.0  # strict window
    assert iou(np.zeros(0), np.zeros(0), fps=12) == 0.0


def test_librosa_style_peak_pick_and_mel_filters():
    from jointdit.evaluation.av_align import mel_filters, peak_pick

    x = np.array([0.0, 1.0, 0.0, 0.9, 0.0, 0.0, 0.5, 0.0])
    # x[n] is the max of x[n-1 : n+1] and >= mean(x[n-2 : n+2]) + 0.1; two samples' wait
    assert peak_pick(x, 1, 1, 2, 2, 0.1, 0).tolist() == [1, 3, 6]
    assert peak_pick(x, 1, 1, 2, 2, 0.1, 2).tolist() == [1, 6]
    m = mel_filters()
    assert m.shape == (128, 1025) and (m >= 0).all()
    # Slaney normalisation: each triangle has area ~1 in Hz (exactly 1 as a continuous shape)
    hz_per_bin = 22050 / 2048
    areas = m.sum(axis=1) * hz_per_bin
    np.testing.assert_allclose(areas[40:], 1.0, rtol=0.03)


# ---------------------------------------------------------------------------------------------
# protocol


def _painted(n: int, h: int = 32, w: int = 48) -> torch.Tensor:
    """(n, 3, h, w) frames in [-1, 1] whose grey level encodes the frame index (10 * k)."""
    levels = torch.arange(n, dtype=torch.float32) * 10 / 127.5 - 1
    return levels[:, None, None, None].expand(n, 3, h, w).clone()


def test_protocol_samples_the_frame_shown_at_each_instant():
    from jointdit.config import load_config
    from jointdit.errors import UserError
    from jointdit.evaluation.protocol import Protocol

    cfg = load_config("configs/asva_eval.yaml")
    p = Protocol.from_config(cfg)
    assert (p.fps, p.frames, p.height, p.width, p.sample_rate) == (6.0, 12, 256, 256, 16000)
    assert p.clips_per_video == 3 and p.starts(10.0) == [0.0, 4.0, 8.0]
    assert p.starts(2.0) == [0.0, 0.0, 0.0]
    # the model's clip: 14 frames at 7 fps, 576x320; frame k of the protocol is the one shown
    # at k / 6 s: floor(7 k / 6)
    frames, wave = p.resample(_painted(14, 320, 576), 7.0, torch.ones(32000), 16000)
    assert frames.shape == (12, 256, 256, 3) and frames.dtype == np.uint8
    assert (frames[:, 100, 100, 0] // 10).tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]
    assert wave.shape == (32000,)
    # a shorter clip keeps its last frame shown and its audio is zero-padded
    frames, wave = p.resample(_painted(4), 2.0, torch.ones(8000), 8000)
    assert (frames[:, 0, 0, 0] // 10).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert wave.shape == (32000,) and wave[-100:].max() == 0.0 and wave[1000] > 0.99
    # the hash: every field counts
    other = load_config("configs/asva_eval.yaml", ["eval.clips_per_video=1"])
    assert Protocol.from_config(other).hash != p.hash
    with pytest.raises(UserError, match="'eval.clips_per_video' is 0; accepted: >= 1"):
        load_config("configs/asva_eval.yaml", ["eval.clips_per_video=0"])


def test_protocol_reads_windows_of_a_painted_video(tmp_path):
    from jointdit import media
    from jointdit.config import load_config
    from jointdit.evaluation.protocol import Protocol, video_duration

    path = media.write_mp4(tmp_path / "v.mp4", _painted(24), 12.0, torch.zeros(32000), 16000)
    assert video_duration(path) == pytest.approx(2.0, abs=0.01)
    cfg = load_config("configs/asva_eval.yaml", ["data.duration=1.0", "data.size=32"])
    p = Protocol.from_config(cfg)
    assert p.starts(video_duration(path)) == pytest.approx([0.0, 0.5, 1.0], abs=0.01)
    frames, _ = p.read_window(path, 0.5)  # 6 frames at 6 fps from 0.5 s: source frames 6, 8, ..
    assert ((frames[:, 16, 16, 0] + 5) // 10).tolist() == [6, 8, 10, 12, 14, 16]


# ---------------------------------------------------------------------------------------------
# the suite: weights, skip lines, no downloads, cached outputs, make eval-avsync15


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network (sockets, torch.hub, the HF hub) fails the test."""
    import huggingface_hub
    import torch.hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    for name in ("load", "load_state_dict_from_url", "download_url_to_file"):
        monkeypatch.setattr(torch.hub, name, refuse)
    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)


def test_missing_weights_give_one_skip_line_each(tmp_path):
    from jointdit.evaluation.suite import available_networks
    from jointdit.evaluation.weights import WEIGHTS

    lines = []
    nets = available_networks(tmp_path, lines.append)
    assert [n.name for n in nets] == [None]  # the signal detectors only
    assert len(lines) == len(WEIGHTS)
    for line, w in zip(lines, WEIGHTS.values()):
        assert line.startswith("skip ") and "\n" not in line
        assert all(name in line for name in w.names) and str(tmp_path) in line and w.url in line
    assert lines[0].startswith("skip FVD, KVD: no i3d_torchscript.pt or i3d_pretrained_400.pt")


def _clips(n: int, shift: float, seed: int):
    from jointdit.evaluation.suite import EvalClip

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        frames = rng.integers(0, 60, size=(12, 32, 32, 3)).astype(np.uint8)
        frames[:, 8:16, 4 + i : 12 + i] = 200 + int(shift)
        audio = (rng.normal(size=32000) * (0.05 + shift / 1000)).astype(np.float32)
        out.append(EvalClip(f"c{i}", frames, audio, frames[0], "a dog barks", None))
    return out


def test_suite_scores_all_metrics_on_random_weights(tmp_path, no_network):
    from jointdit.errors import UserError
    from jointdit.evaluation.suite import (
        METRICS,
        available_networks,
        format_scores,
        group_outputs,
        score_groups,
    )
    from jointdit.evaluation.weights import write_random_weights

    write_random_weights(tmp_path / "w")
    lines = []
    nets = available_networks(tmp_path / "w", lines.append)
    assert lines == [] and len(nets) == 6 and all(len(n.sha256) == 64 for n in nets[1:])
    args = dict(networks=nets, protocol_hash="p1", fps=6.0, sample_rate=16000)
    ref = group_outputs(_clips(4, 0, 0), cache_dir=tmp_path / "ref", **args)
    groups = {
        "joint": group_outputs(_clips(4, 10, 1), cache_dir=tmp_path / "joint", **args),
        "cascade": group_outputs(_clips(4, 40, 2), cache_dir=tmp_path / "cascade", **args),
    }
    assert ref["i3d"].shape == (4, 400) and ref["vggish"].shape == (4, 2, 128)
    rows = score_groups(groups, ref, ("joint", "cascade"), n_boot=50, fd_boot=10, seed=0)
    assert set(rows) == {"joint", "cascade", "ground truth", "joint - cascade"}
    assert set(rows["joint"]) == {m.name for m in METRICS}
    assert "FVD" not in rows["ground truth"] and "IB-AV" in rows["ground truth"]
    # the contrast's point estimate is the difference of the groups' own
    for m in ("FVD", "FAD", "CLIP", "AV-Align"):
        want = rows["joint"][m]["mean"] - rows["cascade"][m]["mean"]
        assert rows["joint - cascade"][m]["mean"] == pytest.approx(want)
    table = format_scores(rows)
    assert "| FVD ↓" in table and "CLAP ↑" in table and "| joint - cascade" in table
    # cached: a second pass reads the files; another protocol is refused, not mixed in
    stamp = (tmp_path / "ref" / "vggish.npz").stat().st_mtime_ns
    group_outputs(_clips(4, 0, 0), cache_dir=tmp_path / "ref", **args)
    assert (tmp_path / "ref" / "vggish.npz").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"signal.npz: computed under protocol p1, now p2"):
        group_outputs(
            _clips(4, 0, 0), cache_dir=tmp_path / "ref", **(args | {"protocol_hash": "p2"})
        )


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_avsync15_end_to_end(tiny_world, tmp_path, capsys, no_network):
    """Generate the tiny world's test split for joint and cascade, score with random-weight
    extractors: the whole table; then again with no weights: skip lines, no re-sampling,
    AV-Align and sync still scored."""
    from jointdit.evaluation.weights import write_random_weights

    write_random_weights(tmp_path / "w")
    args = [
        "--config",
        "configs/demo/eval_avsync15.yaml",
        f"data.root={tiny_world.root / 'synth'}",
        "data.size=64",
        f"eval.out_dir={tmp_path / 'out'}",
        "eval.bootstrap=50",
        "eval.fd_bootstrap=10",
        "infer.steps=1",
        f"infer.ckpt={tiny_world.ckpt}",
    ]
    assert _script("eval_avsync15").main([*args, f"eval.weights_dir={tmp_path / 'w'}"]) == 0
    out = capsys.readouterr().out
    assert "skip" not in out and "2 clips of 2 test videos; protocol" in out
    for column in ("FVD ↓", "KVD ↓", "FAD ↓", "IB-AV ↑", "IB-IA ↑", "CLIP ↑", "CLAP ↑", "sync ↑"):
        assert column in out
    run_dir = tmp_path / "out" / tiny_world.ckpt.parent.name / tiny_world.ckpt.name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_clips"] == 2 and len(results["protocol_hash"]) == 16
    assert set(results["weights"]) == {"i3d", "vggish", "imagebind", "clip", "clap"}
    assert len(list(run_dir.glob("cascade/*/out.mp4"))) == 2
    # no weights: the same clips (nothing sampled again), skip lines, the signal metrics
    assert _script("eval_avsync15").main([*args, f"eval.weights_dir={tmp_path / 'none'}"]) == 0
    captured = capsys.readouterr()
    skips = [line for line in captured.out.splitlines() if line.startswith("skip ")]
    assert len(skips) == 5 and "sampling" not in captured.err
    assert "AV-Align ↑" in captured.out and "sync ↑" in captured.out
    assert "FVD ↓" not in captured.out


def test_make_eval_adds_the_per_clip_metrics_it_has_weights_for(tmp_path, capsys):
    from jointdit.evaluation.weights import write_random_weights
    from jointdit.media import write_mp4

    write_random_weights(tmp_path / "w")
    for clip in _clips(3, 0, 0):
        frames = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        folder = tmp_path / "samples" / "joint" / clip.key
        write_mp4(folder / "out.mp4", frames, 6.0, torch.from_numpy(clip.audio), 16000)
        (folder / "meta.json").write_text(json.dumps({"fps": 6.0, "caption": "a dog barks"}))
    argv = ["--dir", str(tmp_path / "samples"), "eval.bootstrap=50"]
    assert _script("eval").main([*argv, f"eval.weights_dir={tmp_path / 'w'}"]) == 0
    out = capsys.readouterr().out
    assert "skip" not in out
    assert "| IB-AV ↑" in out and "CLIP ↑" in out and "CLAP ↑" in out and "| AV-Align ↑" in out
    saved = json.loads((tmp_path / "samples" / "published_metrics.json").read_text())
    assert set(saved["weights"]) == {"imagebind", "clip", "clap"} and saved["n"] == {"joint": 3}
    assert set(saved["groups"]["joint"]) == {"IB-AV", "IB-IV", "IB-IA", "CLIP", "CLAP", "AV-Align"}
    assert _script("eval").main([*argv, f"eval.weights_dir={tmp_path / 'none'}"]) == 0
    out = capsys.readouterr().out
    assert [line[:12] for line in out.splitlines() if line.startswith("skip ")] == [
        "skip IB-AV, ",
        "skip CLIP: n",
        "skip CLAP: n",
    ]
    assert "| AV-Align ↑" in out and "make eval-avsync15 computes them" in out
