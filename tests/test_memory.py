"""The memory planner and the final-training wrapper (issue 5, item 4)."""

import sys

import pytest

from jointdit import memory
from jointdit.config import load_config
from jointdit.errors import UserError
from jointdit.memory import GIB
from tests.conftest import REPO, run_script

DEMO = str(REPO / "configs" / "demo" / "base.yaml")


@pytest.fixture(scope="module")
def cfg():
    return load_config(DEMO, env={})


_PREDICTED: dict = {}


def _predict_once(cfg, levers, batch_size):
    """predict_peak, memoised (each call builds and steps the real tiny model: seconds)."""
    key = (tuple(sorted({**memory.base_levers(cfg), **levers}.items())), batch_size)
    if key not in _PREDICTED:
        _PREDICTED[key] = memory.predict_peak(cfg, levers, batch_size)
    return _PREDICTED[key]


@pytest.fixture
def bumpy_predictor(monkeypatch):
    """A fast stand-in whose peaks are not even monotone along the ladder: the planner's
    choice must still be monotone in the budget."""

    def predict(cfg, levers, batch_size):
        rank = memory.ladder(cfg).index({**memory.base_levers(cfg), **levers})
        return (100 - 7 * rank + (13 if rank % 3 == 0 else 0)) * 2**20

    monkeypatch.setattr(memory, "predict_peak", predict)


def test_ladder_turns_exact_levers_before_lossy_ones(cfg):
    rungs = memory.ladder(cfg)
    frames = memory.clip_frames(cfg)
    assert rungs[0] == memory.base_levers(cfg)
    assert rungs[1]["grad_ckpt"] and not memory.is_lossy(rungs[1], frames)
    lossy = [memory.is_lossy(r, frames) for r in rungs]
    assert lossy == sorted(lossy), "a lossy rung came before an exact one"
    assert rungs[-1]["kv_downsample"] == 8 and 0 < rungs[-1]["max_t"] < frames


def test_prediction_grows_with_frames_and_shrinks_with_levers(cfg):
    base = memory.base_levers(cfg)
    full = _predict_once(cfg, base, 4)
    assert _predict_once(cfg, {**base, "max_t": 4}, 4) < _predict_once(cfg, {**base, "max_t": 8}, 4)
    assert _predict_once(cfg, {**base, "max_t": 8}, 4) < full
    assert _predict_once(cfg, {**base, "grad_ckpt": True}, 4) < full
    assert _predict_once(cfg, {**base, "kv_downsample": 4}, 4) < full
    assert _predict_once(cfg, base, 8) > full


def test_plan_is_monotone_in_budget(cfg, bumpy_predictor):
    top = max(row.predicted_peak for row in memory.plan_table(cfg, 0))
    positions = []
    for budget in [int(top * f / 40) for f in range(0, 50)]:
        chosen = memory.plan(cfg, budget)
        positions.append(chosen.ladder_position)
        assert chosen.fits == (chosen.predicted_peak <= budget)
    assert positions == sorted(positions, reverse=True), "more memory picked a lossier rung"
    assert positions[-1] == 0 and positions[0] == len(memory.ladder(cfg)) - 1
    assert len(set(positions)) > 3


def test_user_levers_stay_as_given_on_every_rung(cfg, monkeypatch):
    monkeypatch.setattr(memory, "predict_peak", lambda *a: 2**40)  # nothing fits
    user = {"kv_downsample": 1, "q_chunk_v": 512}
    for rung in memory.ladder(cfg, user):
        assert rung["kv_downsample"] == 1 and rung["q_chunk_v"] == 512
    chosen = memory.plan(cfg, 0, user)
    assert chosen.levers["kv_downsample"] == 1 and chosen.levers["q_chunk_v"] == 512
    assert chosen.levers["max_t"] > 0  # the planner still turned what it was free to turn


def test_next_knob_follows_the_ladder(cfg):
    levers = memory.base_levers(cfg)
    assert "JOINTDIT_GRAD_CKPT=1" in memory.next_knob(levers)
    levers["grad_ckpt"] = True
    assert "JOINTDIT_Q_CHUNK_V=1024 JOINTDIT_Q_CHUNK_A=1024" in memory.next_knob(levers)
    levers.update(q_chunk_v=32, q_chunk_a=32, kv_downsample=2)
    assert "JOINTDIT_KV_DOWNSAMPLE=4" in memory.next_knob(levers)
    levers.update(kv_downsample=8, max_t=2)
    assert "batch_size" in memory.next_knob(levers)


def test_force_keep_user_envs_keeps_user_knobs(cfg):
    env = {"JOINTDIT_KV_DOWNSAMPLE": "2", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}
    user_cfg = load_config(DEMO, env=env)
    planned = {**memory.base_levers(cfg), "grad_ckpt": True, "kv_downsample": 8, "max_t": 4}

    assert memory.pinned_levers(user_cfg, [], env, keep_user_envs=True) == {"kv_downsample": 2}
    kept = memory.child_env(env, planned, keep_user_envs=True)
    assert kept["JOINTDIT_KV_DOWNSAMPLE"] == "2"
    assert kept["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64"
    assert kept["JOINTDIT_GRAD_CKPT"] == "1" and kept["JOINTDIT_MAX_T"] == "4"

    assert memory.pinned_levers(user_cfg, [], env, keep_user_envs=False) == {}
    replaced = memory.child_env(env, planned, keep_user_envs=False)
    assert replaced["JOINTDIT_KV_DOWNSAMPLE"] == "8"
    assert replaced["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    # A command-line override wins in the child, so the planner plans around it regardless.
    over = ["memory.max_t=6"]
    pinned = memory.pinned_levers(load_config(DEMO, over, env={}), over, {}, keep_user_envs=False)
    assert pinned == {"max_t": 6}


def test_launch_command_for_gpus_and_accelerate_config():
    one = memory.launch_command("c.yaml", ["train.lr=1"], memory.launch_settings({}), "bf16")
    assert "--multi_gpu" not in one and one[one.index("--num_processes") + 1] == "1"
    assert one[one.index("--mixed_precision") + 1] == "bf16"
    assert one[-4:] == [str(memory.TRAIN_SCRIPT), "--config", "c.yaml", "train.lr=1"]
    two = memory.launch_command("c.yaml", [], memory.launch_settings({"NUM_GPUS": "2"}), "no")
    assert "--multi_gpu" in two and two[two.index("--num_processes") + 1] == "2"
    acc = memory.launch_settings({"ACCELERATE_CONFIG": "configs/accelerate/ddp.yaml"})
    cmd = memory.launch_command("c.yaml", [], acc, "no")
    assert cmd[cmd.index("--config_file") + 1] == "configs/accelerate/ddp.yaml"


@pytest.mark.parametrize(
    "var, value", [("NUM_GPUS", "two"), ("NUM_GPUS", "0"), ("GPU_GB", "-3"), ("GPU_GB", "x")]
)
def test_bad_launch_variables_name_the_variable(var, value):
    with pytest.raises(UserError, match=var):
        memory.launch_settings({var: value})


def test_wrapper_prints_plan_and_next_knob_after_oom(cfg, bumpy_predictor, monkeypatch, capfd):
    # The child stands in for scripts/train.py hitting CUDA OOM: it reports the knobs it got.
    fake_train = (
        "import os, sys; print('child', os.environ['JOINTDIT_GRAD_CKPT'], "
        "os.environ['PYTORCH_CUDA_ALLOC_CONF']); print('out of memory'); sys.exit(3)"
    )
    monkeypatch.setattr(memory, "launch_command", lambda *a: [sys.executable, "-c", fake_train])
    gpus = [("Fake GPU", 80 * 2**20, 48 * GIB)]  # 80 MiB free: rung 4 is the first to fit
    code = memory.final_train(DEMO, [], env={}, gpus=gpus)
    out, err = capfd.readouterr()
    assert code == memory.OOM_EXIT
    assert "chosen (rung" in out and "predicted peak" in out
    assert "child 1 expandable_segments:True" in out
    assert "chosen (rung 4)" in out
    assert "out of memory; next: set JOINTDIT_Q_CHUNK_V=32 JOINTDIT_Q_CHUNK_A=32" in err


def test_final_train_script_rejects_bad_num_gpus():
    proc = run_script("final_train.py", "--config", DEMO, NUM_GPUS="many")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "NUM_GPUS='many'" in proc.stderr


def test_plan_memory_prints_the_table():
    # Pinned levers shorten the ladder to two rungs (each row runs the real model on meta).
    pins = ["memory.q_chunk_v=32", "memory.q_chunk_a=32", "memory.kv_downsample=8"]
    pins += ["memory.max_t=4"]
    proc = run_script("plan_memory.py", "--config", DEMO, *pins, GPU_GB="1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.split()[:2] == ["rung", "levers"] for line in lines)
    rows = [line for line in lines if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 2 and "JOINTDIT_GRAD_CKPT=1" in rows[1]
    assert all(line.split()[-2] in ("yes", "no") for line in rows)
    assert lines[-1].startswith("chosen: rung 0")  # the tiny model fits 1 GiB as it is
