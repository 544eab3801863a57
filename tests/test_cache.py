"""The latent cache on a small synthetic set with tiny random codecs: contents, resume, shards,
a corrupt mp4, and a run killed with SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from jointdit.codecs.tiny import build_tiny_codecs, codecs_overrides, save_codecs
from jointdit.config import load_config
from jointdit.data.avsync15 import load_split
from jointdit.data.cache import LatentDataset, cache_split
from jointdit.data.synthetic import generate
from jointdit.errors import UserError

N_TRAIN, N_TEST = 4, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("cache")
    codecs = save_codecs(build_tiny_codecs(seed=0), base / "checkpoints" / "pretrained")
    overrides = [
        f"data.root={base / 'synth'}",
        f"data.synth.num_train={N_TRAIN}",
        f"data.synth.num_test={N_TEST}",
        "data.size=32",  # 4x cheaper than the embedded 64 px; latents (T, 4, 4, 4)
        *codecs_overrides(codecs),
    ]
    cfg = load_config(REPO / "configs/demo/base.yaml", overrides, env={})
    generate(base / "synth", cfg.data, seed=0, progress=False)
    return base, overrides


def make_cfg(world, cache_dir, *extra):
    base, overrides = world
    return load_config(
        REPO / "configs/demo/base.yaml", [*overrides, f"cache.dir={cache_dir}", *extra], env={}
    )


def run_script(world, cache_dir, *extra, wait=True):
    cmd = [sys.executable, "scripts/cache_latents.py", "--config", "configs/demo/base.yaml"]
    cmd += ["--split", "train", *world[1], f"cache.dir={cache_dir}", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if wait:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def cached(cache_dir, split="train"):
    return sorted(p.stem for p in (cache_dir / split).glob("*.safetensors"))


def test_records_meta_and_dataset(world, tmp_path):
    cfg = make_cfg(world, tmp_path / "c")
    report = cache_split(cfg, "train")
    assert (report.written, report.skipped, report.failed) == (N_TRAIN, 0, [])
    ids = [r.clip_id for r in load_split(cfg.data.root, "train")]
    assert cached(tmp_path / "c") == sorted(ids)
    meta = json.loads((tmp_path / "c" / "meta" / "train" / f"{sorted(ids)[0]}.json").read_text())
    assert meta["frames"] == 14 and meta["fps"] == 7 and meta["sample_rate"] == 16000
    assert meta["duration"] == 2.0 and meta["cache_version"] == 2 and meta["caption"]
    assert meta["shapes"]["first_frame"] == [4, 4, 4, 4]  # cache.first_frame_draws encodings
    assert meta["family"] in ("flash", "bounce") and meta["events"] and meta["event_frames"]
    assert meta["source"].endswith(".mp4") and meta["codecs"]["video_vae"]
    assert (tmp_path / "c" / "config.yaml").is_file()

    ds = LatentDataset(tmp_path / "c", "train")
    a, b = ds[0], ds[0]
    assert a["video"].shape == (14, 4, 4, 4) and a["audio"].shape == (8, 50, 16)
    assert a["first_frame"].shape == (4, 4, 4) and a["image_emb"].shape == (32,)
    assert a["text_emb"].shape == (16, 32) and a["text_mask"].dtype == torch.int64
    assert a["clip_id"] == sorted(ids)[0]
    assert not torch.equal(a["video"], b["video"])  # sampled from (mean, std) at load time
    short = LatentDataset(tmp_path / "c", "train", max_t=7)[0]
    assert short["video"].shape == (7, 4, 4, 4) and short["audio"].shape == (8, 25, 16)
    means = LatentDataset(tmp_path / "c", "train", latents="mean")
    m = means[0]
    assert torch.equal(m["video"], means[0]["video"]) and torch.equal(m["audio"], means[0]["audio"])
    noise = (a["audio"] - m["audio"]).abs().mean()  # the draw sits around the mean, off it
    assert 0 < noise < a["audio"].abs().mean()
    with pytest.raises(UserError, match="accepted: sample, mean"):
        LatentDataset(tmp_path / "c", "train", latents="mode")


def test_first_frame_draws_are_pixel_noised_encodings(world, tmp_path):
    """The first frame is noise-augmented in pixel space, as SVD's pipeline does it: each
    cached draw is the VAE's mode of frame + cond_aug * noise, drawn from the clip's own seed."""
    cache_split(make_cfg(world, tmp_path / "c", "diffusion.cond_aug=0.3"), "train")
    ds = LatentDataset(tmp_path / "c", "train")
    clip = ds[0]["clip_id"]
    draws = load_file(tmp_path / "c" / "train" / f"{clip}.safetensors")["first_frame"]
    assert draws.shape[0] == 4 and not torch.equal(draws[0], draws[1])
    cache_split(make_cfg(world, tmp_path / "d", "diffusion.cond_aug=0.3"), "train")
    redo = load_file(tmp_path / "d" / "train" / f"{clip}.safetensors")["first_frame"]
    assert torch.equal(draws, redo)  # the same on every run
    picked = {
        int((draws == ds[0]["first_frame"]).flatten(1).all(1).nonzero()[0]) for _ in range(20)
    }
    assert len(picked) > 1  # training sees several of them


def test_old_cache_layout_stops_with_what_to_rebuild(world, tmp_path):
    cfg = make_cfg(world, tmp_path / "c")
    cache_split(cfg, "train")
    for meta_path in (tmp_path / "c" / "meta" / "train").glob("*.json"):
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({**meta, "cache_version": 1}))
    with pytest.raises(UserError, match="cache version 1.*make cache-train.*--overwrite"):
        LatentDataset(tmp_path / "c", "train")


def test_rerun_skips_overwrite_redoes_and_val_reads_test_list(world, tmp_path):
    cfg = make_cfg(world, tmp_path / "c")
    cache_split(cfg, "train")
    again = cache_split(cfg, "train")
    assert (again.written, again.skipped) == (0, N_TRAIN)
    redo = cache_split(cfg, "train", overwrite=True)
    assert redo.written == N_TRAIN
    val = cache_split(cfg, "val")
    assert val.written == N_TEST and len(cached(tmp_path / "c", "val")) == N_TEST
    other = make_cfg(world, tmp_path / "c", "data.fps=5")
    with pytest.raises(UserError, match="--overwrite"):
        cache_split(other, "train")  # never mixes records made with other settings


def test_ranks_split_the_work(world, tmp_path):
    cfg = make_cfg(world, tmp_path / "c")
    a = cache_split(cfg, "train", rank=0, world=2)
    b = cache_split(cfg, "train", rank=1, world=2)
    assert a.written + b.written == N_TRAIN and a.skipped == b.skipped == 0
    assert len(cached(tmp_path / "c")) == N_TRAIN


def test_corrupt_mp4_goes_to_failures_only(world, tmp_path):
    base, _ = world
    bad = load_split(base / "synth", "train")[3]
    good_bytes = bad.path.read_bytes()
    bad.path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    try:
        proc = run_script(world, tmp_path / "c", "cache.max_fail_frac=0.0")
    finally:
        bad.path.write_bytes(good_bytes)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "above cache.max_fail_frac" in proc.stderr
    failures = (tmp_path / "c" / "failures" / "train.rank0.tsv").read_text().splitlines()
    assert len(failures) == 1 and failures[0].startswith(bad.clip_id + "\t")
    assert bad.clip_id not in cached(tmp_path / "c")
    assert len(cached(tmp_path / "c")) == N_TRAIN - 1
    leftovers = [p for p in (tmp_path / "c").rglob("*") if bad.clip_id in p.name]
    assert leftovers == []
    ok = run_script(world, tmp_path / "c")  # the source is fixed; the tolerance is the default
    assert ok.returncode == 0 and len(cached(tmp_path / "c")) == N_TRAIN


def test_clip_without_sound_fails_unless_the_config_allows_silence(world, tmp_path):
    """No audio stream: a failure with its reason by default; cached as silence and marked in
    the meta JSON with cache.no_audio=silence (issue 12)."""
    from jointdit.media import read_video, write_mp4

    base, _ = world
    mute = load_split(base / "synth", "train")[1]
    sound = mute.path.read_bytes()
    write_mp4(mute.path, read_video(mute.path, 7, None), 7)  # the same picture, no audio stream
    try:
        report = cache_split(make_cfg(world, tmp_path / "c"), "train")
        assert [cid for cid, _ in report.failed] == [mute.clip_id]
        assert "no audio stream" in report.failed[0][1]
        assert mute.clip_id not in cached(tmp_path / "c")
        report = cache_split(make_cfg(world, tmp_path / "c", "cache.no_audio=silence"), "train")
        assert report.failed == [] and report.written == 1
    finally:
        mute.path.write_bytes(sound)
    metas = {
        p.stem: json.loads(p.read_text()) for p in (tmp_path / "c" / "meta" / "train").glob("*")
    }
    assert {cid: m["audio_stream"] for cid, m in metas.items() if not m["audio_stream"]} == {
        mute.clip_id: False
    }
    assert len(metas) == N_TRAIN


def test_sigkill_midway_then_rerun_caches_every_clip_once(world, tmp_path):
    cache_dir = tmp_path / "c"
    proc = run_script(world, cache_dir, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and not list((cache_dir / "meta" / "train").glob("*.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list((cache_dir / "meta" / "train").glob("*.json")))
    assert 1 <= done_at_kill < N_TRAIN
    ids = sorted(r.clip_id for r in load_split(world[0] / "synth", "train"))
    # what a kill during a write leaves behind: a partial file under a temporary name
    (cache_dir / "train" / f".{ids[-1]}.safetensors.999999.tmp").write_bytes(b"partial")
    rerun = run_script(world, cache_dir)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert cached(cache_dir) == ids
    metas = sorted(p.stem for p in (cache_dir / "meta" / "train").glob("*.json"))
    assert metas == ids
    assert [p for p in cache_dir.rglob("*.tmp")] == []
    for clip_id in ids:
        assert (
            load_file(cache_dir / "train" / f"{clip_id}.safetensors")["video_mean"].shape[0] == 14
        )
