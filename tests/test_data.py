"""The synthetic sounding-video set, the AVSync15 index that reads it, and `make synth`."""

import json

import numpy as np
import pytest
import torch
import yaml

from jointdit.config import load_config
from jointdit.data.avsync15 import load_split
from jointdit.data.synthetic import CLASSES, generate, read_events
from jointdit.errors import UserError
from jointdit.media import read_clip
from tests.conftest import REPO, run_script

# one clip per class in train, a few in test: small but covers both families
SMALL = ["data.synth.num_train=6", "data.synth.num_test=3"]


def _data_cfg(*overrides):
    return load_config(REPO / "configs" / "demo" / "base.yaml", [*SMALL, *overrides]).data


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = generate(root, _data_cfg(), seed=3, progress=False)
    assert summary["written"] == 9 and summary["skipped"] == 0
    return root


def _onsets(audio, sr, threshold=0.05, gap=0.1):
    loud = np.flatnonzero(np.abs(audio.numpy()) > threshold)
    starts = [int(loud[0])] if len(loud) else []
    starts += [int(b) for a, b in zip(loud, loud[1:]) if b - a > gap * sr]
    return [s / sr for s in starts]


def test_the_index_reads_the_set_with_captions(synth_root):
    train = load_split(synth_root, "train")
    test = load_split(synth_root, "test")
    val = load_split(synth_root, "val")
    assert len(train) == 6 and len(test) == 3
    assert [r.path for r in val] == [r.path for r in test]
    assert {r.split for r in val} == {"val"}
    assert {r.cls for r in train} == {c.name for c in CLASSES}
    ids = [r.clip_id for r in train + test]
    assert len(set(ids)) == len(ids)
    for r in train + test:
        assert r.path.is_file()
        assert r.path.parent.name == r.cls
        assert r.caption == next(c.caption for c in CLASSES if c.name == r.cls)
        assert r.start is None and r.end is None
    assert train[0].caption == "a red lamp flashing with a beep"


def test_events_match_what_is_seen_and_heard(synth_root):
    for record in load_split(synth_root, "train"):
        side = read_events(synth_root, record)
        fps, frames = side["fps"], side["event_frames"]
        n_frames = round(side["duration"] * fps)
        assert 1 <= len(frames) <= 2
        assert all(1 <= k <= n_frames - 2 for k in frames)  # never the first or last frame
        assert side["events"] == pytest.approx([k / fps for k in frames], abs=1e-5)
        clip = read_clip(record.path, fps=fps, size=side["size"])
        assert clip.frames.shape == (n_frames, 3, 64, 64)
        lum = (clip.frames.mean(dim=1) + 1) / 2  # (T, H, W)
        if side["family"] == "flash":
            # exactly the event frames are brighter than both neighbours
            brightness = lum.mean(dim=(1, 2))
            spikes = [
                k
                for k in range(1, n_frames - 1)
                if brightness[k] > max(brightness[k - 1], brightness[k + 1]) + 0.01
            ]
            assert spikes == frames
        else:
            # the ball (brightest blob) is lowest exactly at the contact frames
            rows = torch.arange(64, dtype=torch.float32)[:, None]
            mask = (lum > 0.3).float()
            depth = (mask * rows).sum(dim=(1, 2)) / mask.sum(dim=(1, 2))
            lowest = [
                k
                for k in range(1, n_frames - 1)
                if depth[k] > depth[k - 1] and depth[k] > depth[k + 1]
            ]
            assert lowest == frames
        onsets = _onsets(clip.audio, clip.sample_rate)
        assert len(onsets) == len(frames)
        for onset, event in zip(onsets, side["events"]):
            assert abs(onset - event) < 1 / fps


def test_first_frame_does_not_tell_when_events_happen(tmp_path):
    # many clips of one flash class: the first frame looks the same whatever the event frames
    data = _data_cfg(
        "data.synth.num_train=12", "data.synth.num_test=0", "data.synth.classes=[red_lamp_beep]"
    )
    generate(tmp_path, data, seed=0, progress=False)
    firsts = {}
    for record in load_split(tmp_path, "train"):
        side = read_events(tmp_path, record)
        level = read_clip(record.path, fps=7, size=64).frames[0].max().item()
        firsts.setdefault(tuple(side["event_frames"]), []).append(level)
    assert len(firsts) > 3  # event timing varies from clip to clip
    levels = [v for vs in firsts.values() for v in vs]
    assert max(levels) - min(levels) < 0.2  # the object is dim in frame 0 of every clip


def test_same_seed_same_set_and_reruns_skip_finished_clips(synth_root, tmp_path):
    again = generate(tmp_path, _data_cfg(), seed=3, progress=False)
    assert again["written"] == 9
    for a, b in zip(load_split(synth_root, "test"), load_split(tmp_path, "test")):
        side_a = (synth_root / "events" / a.cls / f"{a.path.stem}.json").read_bytes()
        side_b = (tmp_path / "events" / b.cls / f"{b.path.stem}.json").read_bytes()
        assert side_a == side_b
        clip_a, clip_b = read_clip(a.path, 7, 64), read_clip(b.path, 7, 64)
        assert torch.equal(clip_a.frames, clip_b.frames)
        assert torch.equal(clip_a.audio, clip_b.audio)

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "videos").rglob("*.mp4")}
    rerun = generate(tmp_path, _data_cfg(), seed=3, progress=False)
    assert rerun["written"] == 0 and rerun["skipped"] == 9
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "videos").rglob("*.mp4")}
    # another seed redraws the clips in place
    other = generate(tmp_path, _data_cfg(), seed=4, progress=False)
    assert other["written"] == 9
    events = [read_events(tmp_path, r)["events"] for r in load_split(tmp_path, "train")]
    first = [read_events(synth_root, r)["events"] for r in load_split(synth_root, "train")]
    assert events != first
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic writes leave nothing behind


def test_bad_synth_settings_name_the_key(tmp_path):
    with pytest.raises(UserError, match="data.size=33"):
        generate(tmp_path, _data_cfg("data.size=33"), seed=0, progress=False)
    with pytest.raises(UserError, match="unknown class 'red_lamp'.*red_lamp_beep"):
        generate(tmp_path, _data_cfg("data.synth.classes=[red_lamp]"), seed=0, progress=False)
    with pytest.raises(UserError, match="data.duration"):
        generate(tmp_path, _data_cfg("data.duration=0.4"), seed=0, progress=False)


def test_avsync15_layout_with_windows_and_class_mapping(tmp_path):
    (tmp_path / "videos" / "dog_barking").mkdir(parents=True)
    (tmp_path / "class_mapping.json").write_text(json.dumps({"dog_barking": "dog barking"}))
    (tmp_path / "train.txt").write_text(
        "dog_barking/abc-123_000010.mp4\n\nhammering/x y.mp4,1.5,3.5\nhammering/x y.mp4,4,6\n"
    )
    records = load_split(tmp_path, "train")
    assert [r.clip_id for r in records] == [
        "dog_barking__abc-123_000010",
        "hammering__x_y__1.5-3.5",
        "hammering__x_y__4-6",
    ]
    assert records[0].caption == "a video of dog barking"
    assert records[1].caption == "a video of hammering"
    assert records[0].path == tmp_path / "videos" / "dog_barking" / "abc-123_000010.mp4"
    assert (records[1].start, records[1].end) == (1.5, 3.5)
    with pytest.raises(UserError, match="no event sidecar"):
        read_events(tmp_path, records[0])

    broken = tmp_path / "events" / "dog_barking" / "abc-123_000010.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{")
    with pytest.raises(UserError, match="abc-123_000010.json: damaged sidecar"):
        load_split(tmp_path, "train")

    (tmp_path / "test.txt").write_text("dog_barking/a.mp4,2,1\n")
    with pytest.raises(UserError, match="test.txt:1"):
        load_split(tmp_path, "val")
    (tmp_path / "test.txt").write_text("dog_barking/a.mp4\ndog_barking/a.mp4\n")
    with pytest.raises(UserError, match="test.txt:2.*repeats line 1"):
        load_split(tmp_path, "test")


def test_a_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="not found.*ASVA.*terms.*data/AVSync15"):
        load_split(tmp_path / "AVSync15", "train")
    with pytest.raises(UserError, match="train.txt not found.*ASVA"):
        load_split(tmp_path, "train")
    with pytest.raises(UserError, match="unknown split 'dev'.*train, test, val"):
        load_split(tmp_path, "dev")


def _make_synth(*args):
    return run_script("make_synth.py", *args, timeout=120)


def test_make_synth_script(tmp_path):
    root = tmp_path / "synth"
    done = _make_synth(f"data.root={root}", "data.synth.num_train=2", "data.synth.num_test=1")
    assert done.returncode == 0, done.stderr
    assert "2 train, 1 test" in done.stdout and str(root) in done.stdout
    assert len(load_split(root, "train")) == 2
    saved = yaml.safe_load((root / "config.yaml").read_text())  # the resolved config
    assert saved["data"]["synth"]["num_train"] == 2

    bad = _make_synth(f"data.root={root}", "data.synth.num_trian=2")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "data.synth.num_trian" in bad.stderr
