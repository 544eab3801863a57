"""Checkpoints hold what training changed plus a checked reference to the frozen parts they
build on: Stage B on Stage A, pretrained folders, content hashes, older full checkpoints."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from jointdit import checkpoint as ckpt_io
from jointdit.config import load_config
from jointdit.errors import UserError
from jointdit.train import train
from tests.test_train import cfg_for, make_cache, tiny_overrides


@pytest.fixture
def cache(tmp_path):
    return make_cache(tmp_path / "cache")


def run(tmp_path, cache, name, **train_keys):
    return train(
        load_config(overrides=[*tiny_overrides(tmp_path, cache, **train_keys), f"run.name={name}"])
    )


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage_b_builds_on_stage_a_and_resumes_bit_exact(tmp_path, cache):
    stage_a = run(tmp_path, cache, "a", max_steps=1, save_every=1)
    a_ckpt = stage_a.last_checkpoint
    # Stage B freezes the experts it got from Stage A: those come from A's files
    b_args = {"init_from": str(a_ckpt), "freeze_experts": True, "save_every": 1, "keep_last": 2}
    stage_b = run(tmp_path, cache, "b", max_steps=2, **b_args)
    saved = load_file(str(stage_b.last_checkpoint / "model.safetensors"))
    assert saved and not any(k.startswith(("video_expert.", "audio_expert.")) for k in saved)
    base = ckpt_io.read_base(stage_b.last_checkpoint)
    assert base["init"]["path"] == str(a_ckpt.resolve())
    assert base["init"]["sha256"] == ckpt_io.content_hash(a_ckpt / "model.safetensors")

    # inference rebuilds the frozen parts from A, then loads B's tensors
    model, _, _ = ckpt_io.load_model(stage_b.last_checkpoint, ema=False)
    assert _equal(model.state_dict(), stage_b.model.state_dict())

    # resume from B's step 1 (copied to a new run) to step 2 == 2 steps straight
    shutil.copytree(stage_b.run_dir / "step_1", tmp_path / "ckpt" / "b2" / "step_1")
    resumed = run(tmp_path, cache, "b2", max_steps=2, **b_args)
    for name in ("model.safetensors", "ema.safetensors"):
        assert _equal(
            load_file(str(stage_b.last_checkpoint / name)),
            load_file(str(resumed.last_checkpoint / name)),
        ), name

    # an older full checkpoint (no base.json) still loads
    old = tmp_path / "old" / "step_1"
    shutil.copytree(a_ckpt, old)
    (old / "base.json").unlink()
    model_old, _, _ = ckpt_io.load_model(old, ema=False)
    assert _equal(model_old.state_dict(), stage_a.model.state_dict())

    # A's weights changed after B was trained: one line naming the file
    tensors = load_file(str(a_ckpt / "model.safetensors"))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(a_ckpt / "model.safetensors"))
    with pytest.raises(UserError, match=r"step_1/model.safetensors: content hash .* differs"):
        ckpt_io.load_model(stage_b.last_checkpoint)


def test_pretrained_folders_are_referenced_not_saved(tmp_path, cache, monkeypatch):
    folder = tmp_path / "pretrained" / "unet"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"weights v1")
    # pretend the tiny video expert was loaded from that folder (as svd+audioldm2 does)
    monkeypatch.setattr(
        ckpt_io,
        "frozen_sources",
        lambda cfg: [{"prefix": "video_expert.unet.", "path": str(folder)}],
    )
    result = train(cfg_for(tmp_path, cache, max_steps=1, save_every=1, freeze_experts=True))
    ckpt = result.last_checkpoint
    saved = load_file(str(ckpt / "model.safetensors"))
    assert not any(k.startswith("video_expert.") for k in saved)
    assert any(k.startswith("audio_expert.") for k in saved)  # from scratch: no file holds it
    assert any(k.startswith("joint_blocks.") for k in saved)
    (ref,) = json.loads((ckpt / "base.json").read_text())["pretrained"]
    assert ref["path"] == str(folder) and len(ref["sha256"]) == 64
    ckpt_io.restore(result.model, ckpt, tmp_path / "ckpt")  # unchanged folder: accepted
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"weights v2")
    with pytest.raises(UserError, match=r"pretrained/unet: content hash .* differs"):
        ckpt_io.restore(result.model, ckpt, tmp_path / "ckpt")


def test_content_hash_reads_each_file_once(tmp_path, monkeypatch):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"x" * 100)
    (folder / "b.json").write_text("{}")
    reads = []
    real = ckpt_io._file_sha256
    monkeypatch.setattr(ckpt_io, "_file_sha256", lambda p: reads.append(p) or real(p))
    first = ckpt_io.content_hash(folder, tmp_path)
    assert ckpt_io.content_hash(folder, tmp_path) == first and len(reads) == 2  # memoised
    (folder / "a.bin").write_bytes(b"y" * 100)  # same size, new mtime: hashed again
    st = (folder / "a.bin").stat()
    os.utime(folder / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ckpt_io.content_hash(folder, tmp_path) != first and len(reads) == 3
