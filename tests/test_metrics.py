"""Sync metrics on constructed clips (numpy-drawn frames and audio), and make eval end to end."""

import json

import numpy as np
import pytest

from jointdit.metrics import (
    audio_onsets,
    av_align,
    bootstrap_ci,
    detect_clip,
    evaluate_clips,
    format_table,
    object_colour_error,
    paired_contrasts,
    picture_fidelity,
    sync_score,
    video_events,
)
from tests.conftest import run_script

FPS, SR, T, SIZE = 7.0, 16000, 14, 64  # the embedded default: 2 s at 7 fps, 16 kHz


def sounds(times, rng, kind="beep", level=0.5, noise=1e-3):
    """Near-silent background with a tone burst (beep) or a decaying click at each time."""
    n = int(T / FPS * SR)
    audio = noise * rng.standard_normal(n)
    for when in times:
        start = round(when * SR)
        t = np.arange(min(int(0.2 * SR), n - start)) / SR
        if kind == "beep":  # 80 ms at 880 Hz, 5 ms attack
            env = np.clip(np.minimum(t / 0.005, (0.08 - t) / 0.01), 0.0, 1.0)
            burst = env * np.sin(2 * np.pi * 880 * t)
        else:  # percussive click: noise with a 20 ms exponential decay
            burst = np.exp(-t / 0.02) * rng.standard_normal(len(t))
        audio[start : start + len(t)] += level * burst
    return np.clip(audio, -1, 1)


def flash_video(event_frames, rng, noise=0.0, contrast=1.0, leak=0.0):
    """A dim square on a dark background, fully bright for one frame at each event.

    `leak` lets part of a flash spill into the next frame and `noise` adds pixel noise, the way a
    blurry generated clip looks.
    """
    level = np.zeros(T)
    for k in event_frames:
        level[k] += 1.0
        if k + 1 < T:
            level[k + 1] += leak
    video = np.full((T, 3, SIZE, SIZE), -0.85)
    video[:, :, 20:40, 24:44] = (-0.2 + contrast * level)[:, None, None, None]
    video += noise * rng.standard_normal(video.shape)
    return np.clip(video, -1, 1)


def bounce_video(contact_frames, rng, noise=0.0):
    """A bright ball falling under gravity and bouncing on the floor at the given frames."""
    floor, top = 52.0, 10.0
    marks = [0, *contact_frames, T - 1]
    heights = np.zeros(T)  # pixels above the floor: parabolic hops between contacts
    for a, b in zip(marks[:-1], marks[1:]):
        for k in range(a, b + 1):
            if a == 0:  # a fall from `top` to the first contact
                heights[k] = (floor - top) * (1 - (k / b) ** 2)
            elif b == T - 1:  # a rise from the last contact, still going up at the end
                heights[k] = (floor - top) * 0.6 * (1 - (1 - (k - a) / (2 * (b - a))) ** 2)
            else:  # a hop that peaks half-way
                heights[k] = (floor - top) * 0.5 * (1 - (2 * (k - a) / (b - a) - 1) ** 2)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    video = np.full((T, 3, SIZE, SIZE), -0.9)
    for k, h in enumerate(heights):
        video[k][:, (yy - (floor - h)) ** 2 + (xx - 32) ** 2 <= 25] = 0.9
    video += noise * rng.standard_normal(video.shape)
    return np.clip(video, -1, 1)


def flash_clip(i, rng, shift=0, **look):
    """Clip i of a constructed flash set: 1-2 events at random inner frames, sound `shift` late."""
    events = sorted(rng.choice(np.arange(2, T - 4), size=rng.integers(1, 3), replace=False))
    return {
        "clip_id": f"clip{i}",
        "frames": flash_video(events, rng, **look),
        "audio": sounds([(k + shift) / FPS for k in events], rng),
        "fps": FPS,
        "sample_rate": SR,
        "family": "flash",
        "events": [k / FPS for k in events],
    }


# ---------------------------------------------------------------------------------------------
# detectors


def test_audio_onsets_find_beeps_and_clicks_not_noise():
    rng = np.random.default_rng(0)
    for kind in ("beep", "click"):
        found = audio_onsets(sounds([0.43, 1.29], rng, kind=kind), SR)
        assert found == pytest.approx([0.43, 1.29], abs=0.02), kind
    assert audio_onsets(np.zeros(int(2 * SR)), SR).size == 0
    assert audio_onsets(0.1 * rng.standard_normal(2 * SR), SR).size == 0  # steady noise


@pytest.mark.parametrize(
    "look",
    [{}, {"noise": 0.15}, {"noise": 0.1, "contrast": 0.4, "leak": 0.3}],
    ids=["clean", "noisy", "blurry-dim"],
)
def test_flash_events_clean_and_degraded(look):
    rng = np.random.default_rng(1)
    found = video_events(flash_video([3, 9], rng, **look), FPS, "flash")
    assert found * FPS == pytest.approx([3, 9])
    static = flash_video([], rng, **look)
    assert video_events(static, FPS, "flash").size == 0
    assert video_events(static, FPS, None).size == 0


@pytest.mark.parametrize("noise", [0.0, 0.15])
def test_bounce_events_are_floor_contacts(noise):
    rng = np.random.default_rng(2)
    video = bounce_video([4, 9], rng, noise=noise)
    assert video_events(video, FPS, "bounce") * FPS == pytest.approx([4, 9], abs=0.5)
    clicks = sounds([4 / FPS, 9 / FPS], rng, kind="click")
    assert sync_score(video, clicks, FPS, SR, "bounce") == 1.0
    late = sounds([6 / FPS, 11 / FPS], rng, kind="click")
    assert sync_score(video, late, FPS, SR, "bounce") == 0.0


def test_first_and_last_frame_are_ignored():
    rng = np.random.default_rng(3)
    edges = flash_video([0, T - 1], rng)
    assert video_events(edges, FPS, "flash").size == 0
    assert video_events(edges, FPS, None).size == 0
    edge_beeps = sounds([0.0, (T - 1) / FPS], rng)
    assert sync_score(edges, edge_beeps, FPS, SR, "flash") == 0.0  # nothing left: no evidence
    # a ball that is lowest in the last frame is still falling: no contact seen
    falling = bounce_video([], rng)[::-1].copy()
    assert video_events(falling, FPS, "bounce").size == 0
    # sounds in the first or last frame do not count against (or for) the clip
    inner = flash_video([5], rng)
    audio = sounds([0.0, 5 / FPS, (T - 1) / FPS], rng)
    assert sync_score(inner, audio, FPS, SR, "flash") == 1.0


def test_aligned_scores_high_shifted_low():
    rng = np.random.default_rng(4)
    video = flash_video([3, 9], rng, noise=0.1)
    aligned = sounds([3 / FPS, 9 / FPS], rng)
    shifted = sounds([5 / FPS, 11 / FPS], rng)  # two frames late
    assert sync_score(video, aligned, FPS, SR, "flash") == 1.0
    assert sync_score(video, shifted, FPS, SR, "flash") == 0.0
    assert av_align(video, aligned, FPS, SR) >= 0.5
    assert av_align(video, shifted, FPS, SR) <= 0.25
    # torch tensors (what read_clip returns) work the same
    torch = pytest.importorskip("torch")
    tv, ta = torch.from_numpy(video).float(), torch.from_numpy(aligned).float()
    assert sync_score(tv, ta, FPS, SR, "flash") == 1.0


# ---------------------------------------------------------------------------------------------
# clip sets


def test_evaluate_clips_aligned_beats_chance_shifted_does_not():
    rng = np.random.default_rng(5)
    aligned = [flash_clip(i, rng, noise=0.1) for i in range(16)]
    res = evaluate_clips(aligned, n_boot=300, n_shuffles=6, seed=0)
    assert res["n"] == 16 and len(res["clips"]) == 16
    assert res["sync"]["mean"] > 0.9
    assert res["sync"]["ci95"][0] > res["sync_chance"]["ci95"][1]
    assert res["sync_gap"]["ci95"][0] > 0
    assert res["av_align"]["mean"] > res["av_align_chance"]["mean"]
    assert res["video_vs_truth"]["mean"] == 1.0 and res["audio_vs_truth"]["mean"] == 1.0
    shifted = [flash_clip(i, rng, shift=2, noise=0.1) for i in range(16)]
    res = evaluate_clips(shifted, n_boot=300, n_shuffles=6, seed=0)
    assert res["sync"]["mean"] < 0.2
    assert res["sync_gap"]["ci95"][0] < 0.05  # no better than chance
    json.dumps(res)  # the result is what metrics.json holds


def test_bootstrap_interval_contains_mean_narrows_with_n_and_is_paired():
    rng = np.random.default_rng(6)
    widths = []
    for n in (10, 40, 160):
        scores = rng.uniform(0, 1, n)
        stats = bootstrap_ci({"s": scores}, 1000, np.random.default_rng(0))["s"]
        lo, hi = stats["ci95"]
        assert lo <= stats["mean"] <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # paired: a column and the same column minus a constant move together in every resample
    both = bootstrap_ci({"a": scores, "b": scores - 0.1}, 500, np.random.default_rng(1))
    assert np.allclose(np.subtract(both["a"]["ci95"], both["b"]["ci95"]), 0.1)


def test_format_table_rows_per_group():
    rng = np.random.default_rng(7)
    res = evaluate_clips([flash_clip(i, rng) for i in range(4)], n_boot=100)
    single = evaluate_clips([flash_clip(9, rng)], n_boot=100)  # one clip: no shuffle possible
    table = format_table({"joint": res, "iso": single})
    lines = table.splitlines()
    assert len(lines) == 4 and "sync chance" in lines[0]
    assert lines[2].startswith("| joint ") and "| 4 " in lines[2]
    assert lines[3].startswith("| iso ") and "n/a" in lines[3]


# ---------------------------------------------------------------------------------------------
# picture fidelity


def lamp_video(colour=(1.0, 0.15, 0.1), flashes=(5,), background=0.06):
    """A red lamp (dim, full brightness at `flashes`) on a near-black background, in [-1, 1]."""
    rgb = np.full((T, 3, SIZE, SIZE), background)
    for k in range(T):
        rgb[k, :, 20:40, 24:44] = np.asarray(colour)[:, None, None] * (1.0 if k in flashes else 0.3)
    return rgb * 2 - 1


def test_object_colour_error_sees_a_grey_object_that_psnr_forgives():
    clip = lamp_video()
    grey = np.repeat(clip.mean(axis=1, keepdims=True), 3, axis=1)  # same brightness, no colour
    noisy_background = clip.copy()
    noisy_background[:, :, :10] += 0.2  # a strip of background goes wrong, the object is kept
    assert object_colour_error(clip, clip) == 0.0
    assert object_colour_error(noisy_background, clip) == 0.0
    assert object_colour_error(grey, clip) > 25  # 0-255 units
    mse = np.mean(((grey - clip) / 2) ** 2)
    assert 10 * np.log10(1 / mse) > 24  # what the PSNR bar alone let through
    assert np.isnan(object_colour_error(clip, np.full_like(clip, -0.9)))  # nothing to measure


def test_picture_fidelity_keeps_colour_through_flashes_not_grey_or_gone():
    clip = lamp_video(flashes=(4, 9))
    kept = picture_fidelity(clip, clip[0])
    assert kept["frame0_psnr"] >= 99 and kept["colour_err"] < 1  # flashes: 2 of 14 frames
    grey = picture_fidelity(np.repeat(clip.mean(axis=1, keepdims=True), 3, axis=1), clip[0])
    gone = picture_fidelity(np.full_like(clip, 0.06 * 2 - 1), clip[0])
    blue = picture_fidelity(lamp_video(colour=(0.3, 0.55, 1.0)), clip[0])
    for worse in (grey, gone, blue):
        assert worse["colour_err"] > 15 and worse["frame0_psnr"] < 40
    torch = pytest.importorskip("torch")
    as_tensors = picture_fidelity(torch.from_numpy(clip).float(), torch.from_numpy(clip[0]).float())
    assert as_tensors["colour_err"] == pytest.approx(kept["colour_err"], abs=1e-3)


# ---------------------------------------------------------------------------------------------
# paired contrasts


def test_paired_contrasts_pair_by_reference_and_seed():
    rng = np.random.default_rng(9)
    joint, iso = [], []
    for i in range(8):
        clip = flash_clip(i, rng, noise=0.05)
        joint.append({**detect_clip(clip), "seed": i})
        late = {**clip, "audio": sounds([t + 2 / FPS for t in clip["events"]], rng)}
        iso.append({**detect_clip(late), "seed": i})  # same reference and seed, sound 2 frames late
    out = paired_contrasts({"joint": joint, "iso": iso[::-1]}, n_boot=200, n_shuffles=4)
    flash = out["joint - iso"]["flash"]
    assert flash["n"] == 8 and set(out) == {"joint - iso"} and set(out["joint - iso"]) == {"flash"}
    assert flash["sync"]["mean"] > 0.8 and flash["sync"]["ci95"][0] > 0.5
    reverse = paired_contrasts({"joint": iso, "iso": joint}, n_boot=200)["joint - iso"]["flash"]
    assert reverse["sync"]["mean"] == pytest.approx(-flash["sync"]["mean"])
    # another seed is another sample: nothing to pair
    reseeded = [{**r, "seed": r["seed"] + 100} for r in iso]
    assert paired_contrasts({"joint": joint, "iso": reseeded}, n_boot=50) == {}
    # v2a against its own shuffled chance, per family ("all" beside them when mixed)
    ball = {**detect_clip(flash_clip(99, rng)), "family": "bounce", "seed": 0}
    out = paired_contrasts({"v2a": joint + [ball]}, n_boot=200, n_shuffles=4)
    assert set(out) == {"v2a - chance"} and set(out["v2a - chance"]) == {"flash", "all"}
    assert out["v2a - chance"]["flash"]["sync"]["ci95"][0] > 0  # a lone bounce clip has no chance
    table = format_table(
        {"v2a": {**evaluate_clips([flash_clip(1, rng)], n_boot=10), "contrasts": out}}
    )
    assert "| v2a - chance " in table and "| flash " in table


# ---------------------------------------------------------------------------------------------
# make eval (scripts/eval.py)


def run_eval(env_dir, *args):
    return run_script("eval.py", *args, DIR=env_dir)


def test_eval_missing_or_empty_dir_exits_2(tmp_path):
    missing = tmp_path / "nowhere"
    out = run_eval(str(missing))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and str(missing) in out.stderr
    from jointdit.config import load_config
    from jointdit.errors import UserError
    from jointdit.metrics import evaluate_dirs

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .mp4 clips"):
        evaluate_dirs([str(tmp_path / "empty")], load_config())
    with pytest.raises(UserError, match="DIR is not set"):
        evaluate_dirs([], load_config())


def test_eval_script_end_to_end(tmp_path):
    from jointdit.media import write_mp4

    rng = np.random.default_rng(8)
    root = tmp_path / "samples"
    for i in range(4):  # pipeline layout: <DIR>/<group>/<clip_id>/out.mp4 + meta.json
        clip = flash_clip(i, rng)
        # the reference: a source clip and the cache meta JSON naming it (what REF= points to)
        source = write_mp4(tmp_path / "refs" / f"{clip['clip_id']}.mp4", clip["frames"], FPS)
        ref = tmp_path / "refs" / f"{clip['clip_id']}.json"
        ref.write_text(json.dumps({"source": str(source), "fps": FPS, "start": 0.0}))
        meta = {k: clip[k] for k in ("clip_id", "family", "events", "fps")}
        request = {"seed": 7, "mode": "joint", "ref": str(ref)}  # one seed for all: eval warns
        # iso: the sound 2 frames late, the grey object green (own generator: `rng` draws the rest)
        late = sounds([t + 2 / FPS for t in clip["events"]], np.random.default_rng(i))
        green = clip["frames"].copy()
        green[:, [0, 2]] = -0.85
        for group, audio, frames in (
            ("joint", clip["audio"], clip["frames"]),
            ("iso", late, green),
        ):
            folder = root / group / clip["clip_id"]
            write_mp4(folder / "out.mp4", frames, FPS, audio, SR)
            (folder / "meta.json").write_text(json.dumps({**meta, "request": request}))
    bounce = bounce_video([5, 10], rng)  # a second family in the same group
    folder = root / "joint" / "ball"
    write_mp4(folder / "out.mp4", bounce, FPS, sounds([5 / FPS, 10 / FPS], rng, "click"), SR)
    ball = {"clip_id": "ball", "family": "bounce", "request": {"seed": 7}}
    (folder / "meta.json").write_text(json.dumps(ball))
    for i in range(3):  # a flat folder of mp4s, no metadata: fps from the stream
        clip = flash_clip(10 + i, rng)
        write_mp4(root / "flat" / f"{clip['clip_id']}.mp4", clip["frames"], FPS, clip["audio"], SR)
    out = run_eval(str(root), "eval.bootstrap=200")
    assert out.returncode == 0, out.stderr
    assert "| joint " in out.stdout and "| flat " in out.stdout
    assert "warning: joint: every clip was generated with seed 7" in out.stdout
    assert "warning: flat" not in out.stdout  # no metadata, no seeds to compare
    saved = json.loads((root / "metrics.json").read_text())
    joint = saved["groups"]["joint"]
    assert joint["n"] == 5 and joint["settings"]["bootstrap"] == 200
    assert joint["sync"]["mean"] > 0.9  # flashes, balls and their sounds survive H.264 + AAC
    assert saved["groups"]["joint [flash]"]["n"] == 4  # mixed families: one row each too
    assert saved["groups"]["joint [bounce]"]["n"] == 1
    assert saved["groups"]["flat"]["n"] == 3
    # the conditioning picture: kept in joint (the reference's own frames), not in iso
    assert joint["frame0_psnr"]["mean"] > 35 and saved["groups"]["iso"]["colour_err"]["mean"] > 15
    assert saved["groups"]["joint [flash]"]["colour_err"]["mean"] < 3
    assert "frame0_psnr" not in saved["groups"]["flat"]  # no reference to compare with
    # paired over the same references and seeds; the printed table carries them
    contrast = saved["contrasts"]["joint - iso"]["flash"]
    assert contrast["n"] == 4 and contrast["sync"]["ci95"][0] > 0.5
    assert "| joint - iso " in out.stdout and "colour err" in out.stdout
    assert (root / "eval_config.yaml").is_file()
    assert (root / "sync.png").is_file() and (root / "events.png").is_file()
