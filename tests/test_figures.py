"""The evaluation's pictures: the event strip marks each detected event where it happened, the
sync plot has a panel per family, and `make docs-figures` turns an evaluated run into the
README's picture and table."""

import json

import numpy as np
import pytest
from PIL import Image

from jointdit.figures import event_strip, strip_rows, sync_plot
from jointdit.media import write_mp4
from tests.conftest import run_script
from tests.test_metrics import FPS, SR, flash_clip

ORANGE, CYAN = (255, 140, 0), (0, 188, 212)  # figures.VIDEO_COLOUR, figures.AUDIO_COLOUR


def _columns(path, colour, tol=40):
    """x positions (pixels) of the image columns that hold `colour` somewhere."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    near = (np.abs(rgb - np.array(colour)).max(axis=-1) < tol).any(axis=0)
    return np.flatnonzero(near)


@pytest.fixture
def clip_file(tmp_path):
    clip = flash_clip(0, np.random.default_rng(0))
    path = write_mp4(tmp_path / "clip.mp4", clip["frames"], FPS, clip["audio"], SR)
    return {"clip_id": "c0", "family": "flash", "fps": FPS, "path": str(path)}


def test_event_strip_marks_each_event_at_its_time(tmp_path, clip_file):
    def strip(name, video, audio):
        row = {**clip_file, "video_events": video, "audio_onsets": audio}
        return event_strip([("joint", row)], tmp_path / name)

    none = strip("none.png", [], [])
    assert len(_columns(none, ORANGE)) == 0 and len(_columns(none, CYAN)) == 0
    early, late = strip("early.png", [0.4], [1.6]), strip("late.png", [1.6], [0.4])
    for path in (early, late):
        assert len(_columns(path, ORANGE)) and len(_columns(path, CYAN))
    # the same time lands on the same column; an event at 1.6 s right of one at 0.4 s
    assert _columns(early, ORANGE).mean() == pytest.approx(_columns(late, CYAN).mean(), abs=3)
    assert _columns(late, ORANGE).mean() > _columns(early, ORANGE).mean() + 100


def _stats(mean):
    return {"mean": mean, "ci95": [mean - 0.1, mean + 0.1]}


def _group(clips, sync=0.8):
    return {"n": len(clips), "sync": _stats(sync), "sync_chance": _stats(0.3), "clips": clips}


def test_strip_rows_take_one_reference_per_family_in_every_group():
    def clip(cid, family):
        return {"clip_id": cid, "family": family}

    clips = [clip("b2", "bounce"), clip("f1", "flash"), clip("b1", "bounce"), clip("f0", "flash")]
    metrics = {
        "groups": {
            "iso": _group(clips),
            "joint": _group(clips[::-1]),
            "joint [flash]": _group(clips[1::2]),  # per-family rows are not groups of their own
        }
    }
    rows = [(g, c["clip_id"]) for g, c in strip_rows(metrics)]
    assert rows == [("joint", "b1"), ("iso", "b1"), ("joint", "f0"), ("iso", "f0")]
    assert [g for g, _ in strip_rows(metrics, ["iso"])] == ["iso", "iso"]


def test_sync_plot_has_a_panel_per_family(tmp_path):
    one = {"groups": {"joint": _group([]), "iso": _group([], 0.3)}}
    single = {"n": 1, "sync": _stats(0.9)}  # one clip: a score, no shuffled chance
    three = {"groups": {**one["groups"], "joint [flash]": _group([]), "joint [bounce]": single}}
    narrow = Image.open(sync_plot(one, tmp_path / "one.png")).size[0]
    wide = Image.open(sync_plot(three, tmp_path / "three.png")).size[0]
    assert wide > 2.5 * narrow
    with pytest.raises(ValueError, match="no group has a sync score"):
        sync_plot({"groups": {"flat": {"n": 3}}}, tmp_path / "none.png")


def test_docs_figures_from_an_evaluated_run(tmp_path, clip_file):
    from jointdit.demo import headline

    run = tmp_path / "run"
    row = {**clip_file, "video_events": [0.4], "audio_onsets": [0.41]}
    gap = {**_stats(0.5), "clips": []}
    metrics = {
        "groups": {
            "joint": {**_group([row]), "sync_gap": gap},
            "iso": {**_group([row], 0.3), "sync_gap": _stats(0.0)},
        },
        "contrasts": {
            "joint - iso": {"all": {"n": 1, "sync": _stats(0.5)}},
            "v2a - chance": {"all": {"n": 1, "sync": _stats(0.6)}},
        },
    }
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "assets"
    done = run_script("docs_figures.py", "--out", str(out), DIR=str(run))
    assert done.returncode == 0, done.stderr
    saved = json.loads((out / "demo_metrics.json").read_text())
    assert "clips" not in saved["groups"]["joint"]  # scores only: no per-clip rows, no paths
    assert headline(saved) in done.stdout and headline(saved) == headline(metrics)
    assert (out / "demo_events.png").is_file() and (out / "demo_sync.png").is_file()

    missing = run_script("docs_figures.py", "--out", str(out), DIR=str(tmp_path))
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"error: DIR={tmp_path}: no metrics.json in it (make eval DIR={tmp_path} writes it)"
    )
