"""Several processes for real, on CPU (gloo): FSDP trains the demo Stage A and Stage B through
`make final-train-*`'s launcher, agrees with data parallel, resumes bit-exactly after a SIGKILL,
leaves no worker behind, and writes checkpoints one process loads; plus the run lock, the
launcher watch and the process-count-independent sample order."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from jointdit import checkpoint as ckpt_io
from jointdit.config import load_config
from jointdit.engine import asked_engine
from jointdit.errors import UserError
from jointdit.processes import LAUNCHER_PID_VAR, run_lock
from jointdit.train import batches, train
from tests.conftest import REPO, run_script


def _overrides(world, out_dir, name, steps, **extra):
    keep = [o for o in world.overrides if not o.startswith(("run.name", "train.max_steps"))]
    more = [f"{k}={v}" for k, v in extra.items()]
    return [
        *keep,
        f"run.name={name}",
        f"train.out_dir={out_dir}",
        f"train.max_steps={steps}",
        "train.save_every=1",
        "train.log_every=1",
        "memory.max_t=4",
        *more,
    ]


def _launch(stage, overrides, engine="fsdp", launcher="final_train"):
    """Train the demo stage on 2 CPU processes, in a session of its own. launcher "final_train":
    `ACCELERATE_CONFIG=configs/accelerate/<engine>.yaml make final-train-<stage> NUM_GPUS=2`;
    "torchrun": scripts/train.py under torchrun, asking for the engine as accelerate's launcher
    does (quicker to start)."""
    script = ["--config", f"configs/demo/stage_{stage}.yaml", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if launcher == "final_train":
        cmd = [sys.executable, str(REPO / "scripts" / "final_train.py"), *script]
        env.update(ACCELERATE_CONFIG=f"configs/accelerate/{engine}.yaml", NUM_GPUS="2")
    else:
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
        cmd = [*run, "2", str(REPO / "scripts" / "train.py"), *script]
        if engine == "fsdp":
            env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _run(stage, overrides, engine="fsdp", launcher="final_train"):
    proc = _launch(stage, overrides, engine, launcher)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    # one engine line and one summary per run, from rank 0
    assert out.count(f"engine {engine}, 2 process(es) on cpu") == 1, out[-3000:]
    assert out.count("latest checkpoint") == 1, out[-3000:]
    return out


def _kill_after_first_checkpoint(proc, run_dir):
    """SIGKILL the launcher once step_1 is saved; every process it started must be gone soon
    after. Returns the step the run got to."""
    deadline = time.monotonic() + 180
    while not (run_dir / "step_1" / "state.json").is_file():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.05)
    family = psutil.Process(proc.pid).children(recursive=True)
    assert len(family) >= 3  # accelerate's launcher and two workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"still running after the launcher died: {alive}"
    return ckpt_io.read_state(ckpt_io.latest_checkpoint(run_dir)).step


def _same_checkpoints(a, b):
    for name in ("model.safetensors", "ema.safetensors", "rng.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys(), name
        assert all(torch.equal(x[k], y[k]) for k in x), name
    x, y = ckpt_io.load_optimizer_state(a), ckpt_io.load_optimizer_state(b)
    assert x["scheduler"] == y["scheduler"]
    sx, sy = x["optimizer"]["state"], y["optimizer"]["state"]
    assert sx.keys() == sy.keys() and len(sx) > 0
    assert all(torch.equal(sx[i][k], sy[i][k]) for i in sx for k in sx[i])


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["loss_video"], r["loss_audio"]) for r in rows]


def test_fsdp_trains_demo_stages_and_resumes_bit_exact_after_sigkill(tiny_world, tmp_path, capsys):
    straight, broken = tmp_path / "straight", tmp_path / "broken"

    # Stage A under FSDP and under data parallel: the same data, noise and updates (sharding
    # only reorders sums)
    _run("a", _overrides(tiny_world, straight, "a", 2), launcher="torchrun")
    _run("a", _overrides(tiny_world, tmp_path / "ddp", "a", 2), "ddp", "torchrun")
    fsdp, ddp = _losses(straight / "a"), _losses(tmp_path / "ddp" / "a")
    assert [r[0] for r in fsdp] == [r[0] for r in ddp] == [1, 2]
    for f, d in zip(fsdp, ddp):
        assert all(abs(x - y) <= 1e-4 * abs(y) for x, y in zip(f[1:], d[1:])), (fsdp, ddp)

    # Stage B from Stage A: uninterrupted, and killed (SIGKILL of the launcher: its workers
    # follow) after its first checkpoint, then the same command again resumes
    init = {"train.init_from": straight / "a"}
    _run("b", _overrides(tiny_world, straight, "b", 2, **init), launcher="torchrun")
    b_broken = _overrides(tiny_world, broken, "b", 2, **init)
    reached = _kill_after_first_checkpoint(_launch("b", b_broken), broken / "b")
    assert reached == 1
    assert "resuming b from step 1" in _run("b", b_broken)
    _same_checkpoints(straight / "b" / "step_2", broken / "b" / "step_2")
    assert _losses(straight / "b") == _losses(broken / "b")

    # one process loads the gathered checkpoint for inference (EMA weights), and resumes it
    model, _, _ = ckpt_io.load_model(broken / "b")
    ema = load_file(str(broken / "b" / "step_2" / "ema.safetensors"))
    params = dict(model.named_parameters())
    assert ema and all(torch.equal(params[k], v) for k, v in ema.items())
    cfg = load_config(
        REPO / "configs" / "demo" / "stage_b.yaml", _overrides(tiny_world, broken, "b", 3, **init)
    )
    result = train(cfg)
    assert "process count 2 -> 1: the sample order continues at sample 8" in capsys.readouterr().out
    assert result.step == 3 and result.samples_seen == 2 * 2 * 2 + 2  # 2 steps x 2 ranks, then 1
    # and back to 2 processes (every rank finds a random state to resume)
    out = _run("b", _overrides(tiny_world, broken, "b", 4, **init), launcher="torchrun")
    assert "process count 1 -> 2: the sample order continues at sample 10" in out
    assert ckpt_io.read_state(ckpt_io.latest_checkpoint(broken / "b")).samples_seen == 14


def test_sample_order_is_the_same_for_any_process_count():
    n, batch, seed = 10, 2, 3
    one = batches(n, batch, seed, 0, 1, start_sample=6)
    stream = [i for _ in range(12) for i in next(one)]
    for world in (2, 4):
        feeds = [batches(n, batch, seed, r, world, start_sample=6) for r in range(world)]
        got = [i for _ in range(12 // world) for f in feeds for i in next(f)]
        assert got == stream, world
    # each epoch is a permutation of the clips
    whole = batches(n, batch, seed, 0, 1)
    first = [i for _ in range(n // batch) for i in next(whole)]
    assert sorted(first) == list(range(n))


def _holder(code):
    """A python process running `code` (it prints "ready" when set up), in the repo."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _lock_holder(run_dir):
    """A python process holding the run lock of `run_dir` until killed."""
    return _holder(
        "import time; from pathlib import Path; from jointdit.processes import run_lock\n"
        f"with run_lock(Path({str(run_dir)!r})):\n"
        "    print('ready', flush=True); time.sleep(60)\n"
    )


def test_run_lock_names_its_holder_and_is_taken_over_when_it_dies(tmp_path):
    run_dir = tmp_path / "run"
    holder = _lock_holder(run_dir)
    try:
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            with run_lock(run_dir):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(run_dir) as path:  # the dead holder's lock is taken over
        assert path.read_text().strip() == str(os.getpid())


def test_a_second_run_on_a_locked_run_folder_stops_naming_the_holder(tmp_path):
    from tests.test_train import cfg_for, make_cache

    cfg = cfg_for(tmp_path, make_cache(tmp_path / "cache"), max_steps=1)
    run_dir = tmp_path / "ckpt" / "t"
    holder = _lock_holder(run_dir)
    try:
        with pytest.raises(UserError, match=f"another run \\(pid {holder.pid}\\)"):
            train(cfg)
        assert ckpt_io.latest_checkpoint(run_dir) is None
    finally:
        holder.kill()
        holder.wait()
    assert train(cfg).step == 1  # the killed holder's lock is taken over
    assert not (run_dir / ".run.lock").exists()  # and a finished run leaves none


def test_workers_stop_when_their_launcher_is_killed():
    launcher = subprocess.Popen(["sleep", "60"])
    code = (
        "import time; from jointdit.processes import die_with_launcher\n"
        f"assert die_with_launcher({{{LAUNCHER_PID_VAR!r}: '{launcher.pid}'}}, interval=0.05)\n"
        "print('ready', flush=True); time.sleep(60)\n"
    )
    worker = _holder(code)
    try:
        launcher.kill()
        launcher.wait()
        assert worker.wait(timeout=10) == 1
    finally:
        worker.kill()
        worker.wait()


@pytest.mark.parametrize(
    "env,world,message",
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, 2, "DeepSpeed"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, 2, "fsdp_version 1"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, 1, "this run has 1"),
        (
            {
                "ACCELERATE_USE_FSDP": "true",
                "FSDP_VERSION": "2",
                "FSDP_ACTIVATION_CHECKPOINTING": "true",
            },
            2,
            "memory.grad_ckpt",
        ),
    ],
)
def test_an_engine_that_cannot_run_stops_with_one_line(env, world, message):
    with pytest.raises(UserError, match=message):
        asked_engine(env, world)


def test_asked_engines():
    assert asked_engine({}, 1) == "single"
    assert asked_engine({}, 2) == "ddp"
    assert asked_engine({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, 2) == "fsdp"


def test_deepspeed_config_stops_the_run_in_one_line():
    out = run_script(
        "train.py", "--config", "configs/demo/stage_a.yaml", ACCELERATE_USE_DEEPSPEED="true"
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "DeepSpeed" in out.stderr, out.stderr


def test_only_the_first_process_prints_the_error_line():
    bad = ("train.py", "--config", "configs/demo/stage_a.yaml", "train.no_such_key=1")
    first, other = run_script(*bad, RANK="0"), run_script(*bad, RANK="1")
    assert first.returncode == other.returncode == 2
    assert first.stderr.count("\n") == 1 and "no_such_key" in first.stderr
    assert other.stderr == ""
