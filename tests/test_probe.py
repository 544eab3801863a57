"""`make probe`: matched vs swapped partner losses tell whether joint attention carries anything."""

import json

import numpy as np
import pytest
import torch

from jointdit.checkpoint import load_model
from jointdit.data.cache import LatentDataset
from jointdit.errors import UserError
from jointdit.probe import coupling, summarize, swap_partners
from tests.conftest import run_script


def test_swap_partners_same_class_first():
    assert swap_partners(["a", "b", "a", "a"]) == [2, 2, 3, 0]
    assert swap_partners(["a", "b"]) == [1, 0]  # alone in its class: the next clip
    with pytest.raises(UserError, match="at least two"):
        swap_partners(["a"])


def _world_items(tiny_world):
    ds = LatentDataset(tiny_world.root / "cache", "val")
    torch.manual_seed(0)
    items = [ds[i] for i in range(len(ds))]
    return items, [ds.meta(i)["class"] for i in range(len(ds))]


def _joint_outputs(model, fill):
    for block in model.joint_blocks:
        for layer in (block.video_out, block.audio_out):
            fill(layer.weight)


@pytest.mark.parametrize("partner_clean", [False, True])
def test_probe_sees_no_coupling_without_joint_blocks_and_some_with(tiny_world, partner_clean):
    model, cfg, _ = load_model(tiny_world.ckpt)
    items, groups = _world_items(tiny_world)
    kw = {"partner_clean": partner_clean}
    with torch.no_grad():
        _joint_outputs(model, torch.nn.init.zeros_)  # joint blocks are the identity: no path
    off = coupling(model, cfg, items, groups, [0.3], repeats=1, batch_size=1, **kw)[0.3]
    for m in ("video", "audio"):
        np.testing.assert_allclose(off[f"{m}_swapped"], off[f"{m}_matched"], rtol=1e-6)
        np.testing.assert_allclose(off[f"{m}_iso"], off[f"{m}_matched"], rtol=1e-6)

    torch.manual_seed(1)
    with torch.no_grad():
        _joint_outputs(model, lambda w: torch.nn.init.normal_(w, std=0.5))
    on = coupling(model, cfg, items, groups, [0.3], repeats=1, batch_size=2, **kw)[0.3]
    for m in ("video", "audio"):
        assert np.abs(on[f"{m}_swapped"] - on[f"{m}_matched"]).max() > 1e-6, m
    if partner_clean:  # a clean partner is another input than one at the same level
        level = coupling(model, cfg, items, groups, [0.3], repeats=1, batch_size=2)[0.3]
        np.testing.assert_allclose(level["video_iso"], on["video_iso"], rtol=1e-5)
        assert np.abs(level["video_matched"] - on["video_matched"]).max() > 1e-6
    rows = summarize({0.3: on}, ["flash"] * len(items), n_boot=50)
    assert {(r["modality"], r["n"]) for r in rows} == {("video", 2), ("audio", 2)}
    lo, hi = rows[0]["gain_ci95"]
    assert lo <= rows[0]["gain_pct"] <= hi


def run_probe(*args, ckpt=""):
    return run_script("probe.py", *args, CKPT=ckpt)


def test_probe_script(tiny_world, tmp_path):
    out = run_probe()
    assert out.returncode == 2 and "CKPT is not set" in out.stderr
    out = run_probe(ckpt=str(tmp_path / "none"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "none" in out.stderr
    out = run_probe("--levels", "0.3,2", ckpt=str(tiny_world.ckpt))
    assert out.returncode == 2 and "--levels" in out.stderr

    report = tmp_path / "probe.json"
    args = ["--levels", "0.3", "--repeats", "1", "--json", str(report), "--partner", "clean"]
    out = run_probe(*args, ckpt=str(tiny_world.ckpt))
    assert out.returncode == 0, out.stderr
    assert "partner clean" in out.stdout
    assert "loss swapped" in out.stdout and "| 0.30 | video |" in out.stdout
    saved = json.loads(report.read_text())
    assert saved["clips"] == 2  # the world's two val clips, both of the flash family
    assert [(r["family"], r["modality"]) for r in saved["rows"]] == [
        ("flash", "video"),
        ("flash", "audio"),
    ]
