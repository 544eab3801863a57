"""Inference pipeline: files and their timing match the request, seeds reproduce, guidance
weights matter, modes and bad inputs behave."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from jointdit.config import load_config
from jointdit.diffusion import GuidanceWeights
from jointdit.errors import UserError
from jointdit.media import read_clip
from jointdit.pipeline import Generator, Request
from tests.conftest import REPO, run_script


@pytest.fixture(scope="module")
def gen(tiny_world):
    return Generator(str(tiny_world.ckpt))


def _req(tmp_path, name, ref, **kw):
    kw.setdefault("steps", 3)
    kw.setdefault("seed", 1)
    return Request(out_dir=tmp_path / name, ref=str(ref), **kw)


def test_output_matches_request(gen, tiny_world, tmp_path):
    ref = tiny_world.refs[0]
    meta_ref = json.loads(ref.read_text())
    steps_seen = []
    result = gen.generate(_req(tmp_path, "a", ref), progress=lambda k, n: steps_seen.append(k))
    assert steps_seen == [1, 2, 3]
    clip = read_clip(result.video_path, fps=meta_ref["fps"], size=None)
    assert clip.frames.shape[0] == meta_ref["frames"]
    assert clip.frames.shape[-2:] == (64, 64)
    assert clip.sample_rate == 16000
    duration = meta_ref["frames"] / meta_ref["fps"]
    assert abs(clip.audio.shape[0] / 16000 - duration) < 1 / meta_ref["fps"]
    assert clip.audio.abs().max() > 0  # there is a real soundtrack, not silence
    meta = json.loads((result.out_dir / "meta.json").read_text())
    assert meta["request"]["seed"] == 1 and meta["mode"] == "joint"
    assert meta["clip_id"] == meta_ref["clip_id"] and "sample_s" in meta["timings"]
    assert Image.open(result.preview_path).size[0] >= 64 * 8


def _decoded(result):
    clip = read_clip(result.video_path, fps=7, size=None)
    return clip.frames, clip.audio


def test_same_seed_same_output_and_weights_matter(gen, tiny_world, tmp_path):
    ref = tiny_world.refs[0]
    w = GuidanceWeights(wv=1.5, wa=1.5, wi=0.5)
    a = gen.generate(_req(tmp_path, "a", ref, weights=w))
    b = gen.generate(_req(tmp_path, "b", ref, weights=w))
    c = gen.generate(_req(tmp_path, "c", ref, weights=GuidanceWeights()))
    d = gen.generate(_req(tmp_path, "d", ref, weights=w, seed=2))
    fa, aa = _decoded(a)
    fb, ab = _decoded(b)
    assert torch.equal(fa, fb) and torch.equal(aa, ab)
    for other in (c, d):
        fo, ao = _decoded(other)
        assert not torch.equal(fa, fo) or not torch.equal(aa, ao)


def test_image_and_modes(gen, tiny_world, tmp_path):
    png = tmp_path / "in.png"
    Image.fromarray(np.full((80, 120, 3), 200, dtype=np.uint8)).save(png)
    r = gen.generate(
        Request(out_dir=tmp_path / "img", image=str(png), prompt="a red lamp", steps=2)
    )
    assert read_clip(r.video_path, fps=7, size=None).frames.shape[-2:] == (64, 64)
    for mode in ("v2a", "a2v"):
        res = gen.generate(_req(tmp_path, mode, tiny_world.refs[0], mode=mode, steps=2))
        assert json.loads((res.out_dir / "meta.json").read_text())["mode"] == mode


def test_bad_inputs_are_one_line_errors(gen, tiny_world, tmp_path):
    bad_png = tmp_path / "bad.png"
    bad_png.write_text("not an image")
    with pytest.raises(UserError, match="bad.png"):
        gen.generate(Request(out_dir=tmp_path / "x", image=str(bad_png), steps=1))
    with pytest.raises(UserError, match="REF"):
        gen.generate(Request(out_dir=tmp_path / "x", ref=str(tmp_path / "nope.json"), steps=1))
    with pytest.raises(UserError, match="MODE"):
        gen.generate(_req(tmp_path, "x", tiny_world.refs[0], mode="sideways"))


def test_make_infer_cli(tiny_world, tmp_path):
    env = {
        "CKPT": str(tiny_world.ckpt),
        "REF": str(tiny_world.refs[0]),
        "STEPS": "2",
        "SEED": "3",
        "WV": "1.0",
        "OUT": str(tmp_path / "cli"),
    }
    proc = run_script("infer.py", **env)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "cli" / "meta.json").read_text())
    assert meta["request"]["steps"] == 2 and meta["request"]["weights"]["wv"] == 1.0
    # what was used, under its own name: the checkpoint's codecs and cache, not the defaults
    used = yaml.safe_load((tmp_path / "cli" / "infer_config.yaml").read_text())
    trained = yaml.safe_load((tiny_world.ckpt / "config.yaml").read_text())
    assert used["codecs"] == trained["codecs"] and used["cache"] == trained["cache"]
    assert used["codecs"]["video_vae"] != load_config(None, env={}).codecs.video_vae
    assert used["infer"]["steps"] == 2 and used["infer"]["wv"] == 1.0
    assert not (tmp_path / "cli" / "config.yaml").exists()

    for bad in ({"STEPS": "many"}, {"CKPT": str(tmp_path / "none")}, {"MODE": "up"}):
        proc = run_script("infer.py", **{**env, **bad})
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and next(iter(bad)) in last, proc.stderr


def test_training_writes_previews(tiny_world):
    from jointdit.config import load_config
    from jointdit.pipeline import TrainingPreview
    from jointdit.train import train

    overrides = [
        *tiny_world.overrides,
        "run.name=previews",
        "train.max_steps=2",
        "train.preview_every=2",
        "infer.steps=2",
    ]
    cfg = load_config(REPO / "configs" / "demo" / "stage_a.yaml", overrides)
    result = train(cfg, preview=TrainingPreview())
    shown = result.run_dir / "previews" / "step_2"
    assert (shown / "out.mp4").is_file() and (shown / "preview.png").is_file()
    assert read_clip(shown / "out.mp4", fps=7, size=None).frames.shape[0] == 14
