"""What a run leaves on disk across a move, a resume and a killed save (issue 12): the run
resumes wherever it lives, metrics.jsonl has each step once, dead savers' temp folders go."""

import json
import os
import shutil
import signal

import torch
from safetensors.torch import load_file

from jointdit import checkpoint as ckpt_io
from jointdit.config import REPO_ROOT, load_config
from jointdit.train import run_fingerprint, train
from tests.test_train import make_cache, tiny_overrides


def _tiny(root, cache):
    """Two steps of the smallest run: one clip per step, two frames, experts frozen."""
    small = ["memory.max_t=2", "train.batch_size=1", "train.freeze_experts=true"]
    over = tiny_overrides(root, cache, max_steps=2, save_every=1)
    return load_config(overrides=[*over, *small])


def _steps(run_dir):
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_moved_run_resumes_and_logs_each_step_once(tmp_path):
    cache = make_cache(tmp_path / "cache", n=4)
    first = tmp_path / "here"
    run = train(_tiny(first, cache)).run_dir
    assert _steps(run) == [1, 2]
    final = load_file(str(run / "step_2" / "model.safetensors"))

    # move the run elsewhere and lose its last checkpoint, as a kill after logging step 2 but
    # before saving it would: the resume starts at step 1 and trains step 2 again
    moved = tmp_path / "there"
    shutil.move(first / "ckpt", moved / "ckpt")
    shutil.rmtree(moved / "ckpt" / "t" / "step_2")
    result = train(_tiny(moved, cache))
    assert result.step == 2
    assert _steps(result.run_dir) == [1, 2]
    again = load_file(str(result.run_dir / "step_2" / "model.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_fingerprint_ignores_where_the_repo_lives(tmp_path):
    cache = make_cache(tmp_path / "cache", n=2)
    base = tiny_overrides(tmp_path, cache)
    relative = load_config(overrides=[*base, "train.init_from=checkpoints/demo_a"])
    absolute = load_config(
        overrides=[*base, f"train.init_from={REPO_ROOT / 'checkpoints' / 'demo_a'}"]
    )
    elsewhere = load_config(overrides=[*base, f"train.out_dir={tmp_path / 'other'}"])
    assert run_fingerprint(relative) == run_fingerprint(absolute)
    assert run_fingerprint(elsewhere) == run_fingerprint(load_config(overrides=base))
    other_init = load_config(overrides=[*base, "train.init_from=checkpoints/other"])
    assert run_fingerprint(other_init) != run_fingerprint(relative)


def _save(run_dir, step):
    ckpt_io.save_checkpoint(
        run_dir,
        step,
        model_state={"w": torch.ones(4)},
        ema_state={"w": torch.ones(4)},
        optimizer_state={"step": step},
        rng_states={"torch_cpu": torch.get_rng_state()},
        state=ckpt_io.CheckpointState(step, step, "fp", {}),
        config_text="{}\n",
        keep_last=0,
    )


def test_killed_save_leaves_nothing_for_good(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _save(run, 1)
    pid = os.fork()
    if pid == 0:  # a writer killed in the middle of its save (after the weights, before state)
        monkeypatch.setattr(torch, "save", lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
        try:
            _save(run, 2)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    stale = run / f".tmp_step_2_{pid}"
    assert (stale / "model.safetensors").is_file()
    live = run / f".tmp_step_3_{os.getppid()}"  # a save by a process that still runs
    live.mkdir()
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["step_1"]  # step 2 never landed

    _save(run, 2)
    assert not stale.exists() and live.is_dir()
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["step_1", "step_2"]
