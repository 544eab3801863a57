"""`make demo`'s flow end to end at toy size: every stage runs, outputs and the table appear,
and a second run re-uses what the first one finished."""

import json

import pytest

from jointdit.codecs.tiny import build_tiny_codecs, codecs_overrides, recipe, save_codecs
from jointdit.config import load_config
from jointdit.demo import headline, run_demo
from tests.conftest import REPO


def _passed(cfg, root, **changes):
    """Mark codecs under `root` as having passed `make tiny-models` with cfg's recipe."""
    tiny = cfg.codecs.tiny.copy()
    for k, v in changes.items():
        tiny[k] = v
    (root / "quality.json").write_text(json.dumps({"passed": True, "recipe": recipe(tiny)}))


def test_demo_flow_and_rerun(tmp_path, capsys):
    # random tiny codecs, marked as having passed `make tiny-models` so the demo uses them
    save_codecs(build_tiny_codecs(seed=0), tmp_path / "embedded")
    overrides = [
        f"data.root={tmp_path / 'synth'}",
        "data.synth.num_train=4",
        "data.synth.num_test=2",
        f"codecs.tiny.out_dir={tmp_path / 'embedded'}",
        *codecs_overrides(tmp_path / "embedded"),
        f"cache.dir={tmp_path / 'cache'}",
        f"train.out_dir={tmp_path / 'ckpt'}",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.tensorboard=false",
        f"demo.out_dir={tmp_path / 'out'}",
        "demo.num_samples=2",
        "infer.steps=2",
    ]
    cfg = load_config(REPO / "configs" / "demo" / "demo.yaml", overrides)
    _passed(cfg, tmp_path / "embedded")
    first = run_demo(cfg, overrides=overrides)
    out = first["out_dir"]
    for group in ("joint", "iso", "v2a"):
        clips = sorted((out / group).glob("*/out.mp4"))
        assert len(clips) == 2, group
        metas = [json.loads((c.parent / "meta.json").read_text()) for c in clips]
        assert metas[0]["iso"] == (group == "iso")
        assert metas[0]["mode"] == ("v2a" if group == "v2a" else "joint")
        assert len({m["request"]["seed"] for m in metas}) == 2, "each clip needs its own noise"
    assert set(first["results"]) >= {"joint", "iso", "v2a"}
    assert (out / "metrics.json").is_file()
    assert (out / "sync.png").is_file() and (out / "events.png").is_file()
    printed = capsys.readouterr().out
    assert "joint" in printed and "iso" in printed and "chance" in printed.lower()
    # the README's table is this one (tests/test_docs.py holds README to the saved run)
    assert headline(json.loads((out / "metrics.json").read_text())) in printed
    assert "make probe CKPT=" in printed

    stamps = sorted(p.stat().st_mtime_ns for p in out.glob("*/*/out.mp4"))
    second = run_demo(cfg, overrides=overrides)  # everything already done: nothing redone
    assert second["out_dir"] == out
    assert sorted(p.stat().st_mtime_ns for p in out.glob("*/*/out.mp4")) == stamps
    assert "already finished" in capsys.readouterr().out


def test_the_demo_refuses_codecs_trained_from_another_recipe(tmp_path):
    from jointdit.demo import _codecs_ready
    from jointdit.errors import UserError

    root = tmp_path / "embedded"
    root.mkdir()
    cfg = load_config(REPO / "configs" / "demo" / "demo.yaml", [f"codecs.tiny.out_dir={root}"])
    assert not _codecs_ready(cfg)  # nothing trained yet: the demo trains them
    _passed(cfg, root, psnr_bar=99.0)  # another bar: the same codecs
    assert _codecs_ready(cfg)
    _passed(cfg, root, video_steps=cfg.codecs.tiny.video_steps - 300)  # an older recipe
    with pytest.raises(UserError, match="holds tiny codecs trained from another recipe"):
        _codecs_ready(cfg)
    (root / "quality.json").write_text('{"passed": true}')  # written before recipes existed
    with pytest.raises(UserError, match=str(root)):
        _codecs_ready(cfg)
