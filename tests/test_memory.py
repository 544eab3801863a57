"""The memory planner and the final-training wrapper (issue 5, item 4)."""

import os
import sys

import pytest

from jointdit import launch, memory
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


def _rank(levers) -> int:
    """How many ladder moves `levers` are from all-off (one per rung along any ladder)."""
    steps = sum(1 for k in memory.STATE if levers[k]) + bool(levers["grad_ckpt"])
    for key, values in (
        ("q_chunk_v", memory.Q_CHUNKS),
        ("kv_downsample", memory.KV_FACTORS),
        ("max_t", tuple(t for t in memory.MAX_TS if t < 14)),  # the demo's 14 frames
    ):
        steps += values.index(levers[key]) + 1 if levers[key] in values else 0
    return steps + (levers["lora_rank"] > 0)


@pytest.fixture
def bumpy_predictor(monkeypatch):
    """A fast stand-in whose peaks are not even monotone along the ladder: the planner's
    choice must still be monotone in the budget."""

    def predict(cfg, levers, batch_size):
        rank = _rank(levers)
        return (200 - 7 * rank + (13 if rank % 3 == 0 else 0)) * 2**20

    monkeypatch.setattr(memory, "predict_peak", predict)


def test_ladder_turns_exact_levers_before_lossy_ones(cfg):
    frames = memory.clip_frames(cfg)
    for c in (cfg, load_config(DEMO, ["train.unfreeze=[video_expert.unet.mid_block]"], env={})):
        rungs = memory.ladder(c)
        assert rungs[0] == memory.base_levers(c)
        kinds = [memory.KINDS.index(memory.lever_kind(r, frames)) for r in rungs]
        assert kinds == sorted(kinds), "a less faithful rung came before a more faithful one"
        exact = [r for r in rungs if memory.lever_kind(r, frames) == "exact"]
        for key in ("grad_ckpt", "ema_on_cpu", "optim_on_cpu", "fused_step", "frozen_lowp"):
            assert exact[-1][key], f"{key} is not among the exact rungs"
        assert [_rank(r) for r in rungs] == list(range(len(rungs)))  # one move per rung
        assert rungs[-1]["kv_downsample"] == 8 and 0 < rungs[-1]["max_t"] < frames
        # AdamW's state is on the CPU before 8 bits would shrink it: no 8-bit rung then
        assert not any(r["optim_8bit"] for r in rungs)
    assert rungs[-1]["lora_rank"] > 0 and not memory.ladder(cfg)[-1]["lora_rank"]  # Stage B only
    pinned = memory.ladder(cfg, {"optim_on_cpu": False})
    assert memory.lever_kind(next(r for r in pinned if r["optim_8bit"]), frames) == "approximation"


def test_prediction_grows_with_frames_and_shrinks_with_levers():
    cfg = load_config(DEMO, ["train.freeze_experts=true"], env={})  # fewer parameters: faster
    base = memory.base_levers(cfg)
    full = _predict_once(cfg, base, 4)
    assert _predict_once(cfg, {**base, "max_t": 4}, 4) < _predict_once(cfg, {**base, "max_t": 8}, 4)
    assert _predict_once(cfg, {**base, "max_t": 8}, 4) < full
    assert _predict_once(cfg, {**base, "grad_ckpt": True}, 4) < full
    assert _predict_once(cfg, {**base, "kv_downsample": 4}, 4) < full
    assert _predict_once(cfg, base, 8) > full


def test_state_levers_take_their_bytes_per_parameter_off(cfg):
    base = memory.base_levers(cfg)
    model, _ = memory.build_for_prediction(cfg, base)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    ref = memory.state_bytes(cfg, base)
    assert ref["weights"] == 4 * (trainable + frozen) and ref["ema"] == 4 * trainable
    assert ref["optimizer"] == 8 * trainable and ref["grads"] == 4 * trainable
    assert ref["host"] == 0
    for levers, part, expected, host in (
        ({"ema_on_cpu": True}, "ema", 0, 4 * trainable),
        ({"optim_on_cpu": True}, "optimizer", 0, 8 * trainable),
        ({"optim_8bit": True}, "optimizer", int(2.03125 * trainable), 0),
        ({"fused_step": True}, "grads", 0, 0),
        ({"frozen_lowp": True}, "weights", ref["weights"], 0),  # fp32 run: nothing stored low
    ):
        got = memory.state_bytes(cfg, {**base, **levers})
        assert got[part] == expected and got["host"] == host, levers
        same = {k for k in ref if k not in (part, "host")}
        assert {k: got[k] for k in same} == {k: ref[k] for k in same}
    half = load_config(DEMO, ["memory.precision=bf16", "train.freeze_experts=true"], env={})
    hb = memory.base_levers(half)
    full = memory.state_bytes(half, hb)
    low = memory.state_bytes(half, {**hb, "frozen_lowp": True})
    frozen_half = sum(
        p.numel()
        for p in memory.build_for_prediction(half, hb)[0].parameters()
        if not p.requires_grad
    )
    assert 0 < full["weights"] - low["weights"] <= 2 * frozen_half  # frozen Linear/Conv weights


def test_cuda_autocast_casts_as_torch_autocast_does():
    """Compute-dtype ops cast to bf16, norms return fp32, a trainable weight's cast is cached
    for the forward pass and a frozen one's is not (autograd keeps that cast for backward)."""
    import torch
    from torch import nn

    with torch.device("meta"):
        lin, frozen, norm = nn.Linear(8, 8), nn.Linear(8, 8), nn.GroupNorm(2, 8)
    frozen.requires_grad_(False)
    linear, casts = torch.nn.functional.linear, []
    with memory._cuda_autocast("bf16") as amp, amp.forward():
        x = torch.empty(2, 8, device="meta")
        h = lin(x)
        assert h.dtype == torch.bfloat16 and norm(h).dtype == torch.float32
        assert frozen(h).dtype == torch.bfloat16
        casts += [amp._low(lin.weight), amp._low(lin.weight), amp._low(frozen.weight)]
        assert casts[0] is casts[1] and amp._low(frozen.weight) is not casts[2]
    assert not amp.cache and torch.nn.functional.linear is linear  # the patch is undone
    assert lin(torch.empty(2, 8, device="meta")).dtype == torch.float32


_TRACKED = "data.size=16 train.batch_size=1 train.grad_accum=2 memory.precision=bf16".split()


@pytest.mark.parametrize(
    "overrides, levers",
    [
        ([], {}),  # accumulation, clipping, foreach AdamW, EMA on the GPU, autocast
        (  # Stage A; AdamW's states in 8 bits (on the GPU), chunked and pooled attention
            ["train.unfreeze=[]"],
            {"frozen_lowp": True, "grad_ckpt": True, "optim_8bit": True, "q_chunk_v": 64}
            | {"q_chunk_a": 64, "kv_downsample": 2},
        ),
        (  # host-side EMA and AdamW, the step fused into backward, LoRA, fewer frames
            [],
            {"optim_on_cpu": True, "ema_on_cpu": True, "fused_step": True, "lora_rank": 4}
            | {"max_t": 4, "grad_ckpt": True},
        ),
    ],
)
def test_planner_counts_what_torchs_memtracker_counts(overrides, levers):
    """Stage B (reduced): the expert's middle block trains beside the joint parts."""
    stage = ["train.freeze_experts=true", "train.unfreeze=[video_expert.unet.mid_block]"]
    cfg = load_config(DEMO, [*_TRACKED, *stage, *overrides], env={})
    planner, tracker = memory.tracker_check(cfg, {**memory.base_levers(cfg), **levers}, 1)
    assert abs(planner / tracker - 1) < 0.05, (planner, tracker)


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
    assert "set memory.frozen_lowp=true (exact" in memory.next_knob(levers)
    activation_only = set(memory.PLANNED)  # training code without the state levers
    assert "JOINTDIT_GRAD_CKPT=1" in memory.next_knob(levers, known=activation_only)
    levers.update(frozen_lowp=True, ema_on_cpu=True, grad_ckpt=True)
    assert "memory.optim_on_cpu=true" in memory.next_knob(levers)
    levers["optim_on_cpu"] = True
    knob = memory.next_knob(levers)
    assert "memory.fused_step=true train.grad_accum=1 train.max_grad_norm=0 (exact" in knob
    levers.update(fused_step=True)
    assert "JOINTDIT_Q_CHUNK_V=1024 JOINTDIT_Q_CHUNK_A=1024 (exact" in memory.next_knob(levers)
    levers.update(q_chunk_v=32, q_chunk_a=32)
    assert "train.lora_rank=64 (other method" in memory.next_knob(levers)
    levers.update(lora_rank=64, kv_downsample=2)
    assert "JOINTDIT_KV_DOWNSAMPLE=4 (lossy" in memory.next_knob(levers)
    levers.update(kv_downsample=8, max_t=2)
    assert "batch_size" in memory.next_knob(levers)


def test_force_keep_user_envs_keeps_user_knobs(cfg):
    env = {"JOINTDIT_KV_DOWNSAMPLE": "2", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}
    user_cfg = load_config(DEMO, env=env)
    planned = {**memory.base_levers(cfg), "grad_ckpt": True, "kv_downsample": 8, "max_t": 4}

    assert launch.pinned_levers(user_cfg, [], env, keep_user_envs=True) == {"kv_downsample": 2}
    kept = launch.child_env(env, planned, keep_user_envs=True)
    assert kept["JOINTDIT_KV_DOWNSAMPLE"] == "2"
    assert kept["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64"
    assert kept["JOINTDIT_GRAD_CKPT"] == "1" and kept["JOINTDIT_MAX_T"] == "4"

    assert launch.pinned_levers(user_cfg, [], env, keep_user_envs=False) == {}
    replaced = launch.child_env(env, planned, keep_user_envs=False)
    assert replaced["JOINTDIT_KV_DOWNSAMPLE"] == "8"
    assert replaced["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    # A command-line override wins in the child, so the planner plans around it regardless.
    over = ["memory.max_t=6"]
    pinned = launch.pinned_levers(load_config(DEMO, over, env={}), over, {}, keep_user_envs=False)
    assert pinned == {"max_t": 6}


def test_launch_command_for_gpus_and_accelerate_config():
    one = launch.launch_command("c.yaml", ["train.lr=1"], launch.launch_settings({}), "bf16")
    assert "--multi_gpu" not in one and one[one.index("--num_processes") + 1] == "1"
    assert one[one.index("--mixed_precision") + 1] == "bf16"
    assert one[-4:] == [str(launch.TRAIN_SCRIPT), "--config", "c.yaml", "train.lr=1"]
    two = launch.launch_command("c.yaml", [], launch.launch_settings({"NUM_GPUS": "2"}), "no")
    assert "--multi_gpu" in two and two[two.index("--num_processes") + 1] == "2"
    acc = launch.launch_settings({"ACCELERATE_CONFIG": "configs/accelerate/ddp.yaml"})
    cmd = launch.launch_command("c.yaml", [], acc, "no")
    assert cmd[cmd.index("--config_file") + 1] == "configs/accelerate/ddp.yaml"


@pytest.mark.parametrize(
    "var, value",
    [
        ("NUM_GPUS", "two"),
        ("NUM_GPUS", "0"),
        ("GPU_GB", "-3"),
        ("GPU_GB", "x"),
        ("GPU_GB", "nan"),
        ("GPU_GB", "inf"),
    ],
)
def test_bad_launch_variables_name_the_variable(var, value):
    with pytest.raises(UserError, match=var):
        launch.launch_settings({var: value})


def test_wrapper_prints_plan_and_next_knob_after_oom(cfg, bumpy_predictor, monkeypatch, capfd):
    # The child stands in for scripts/train.py hitting CUDA OOM: it reports the knobs it got.
    fake_train = (
        "import os, sys; print('child', os.environ['JOINTDIT_GRAD_CKPT'], "
        "os.environ['PYTORCH_CUDA_ALLOC_CONF']); print('out of memory'); sys.exit(3)"
    )
    monkeypatch.setattr(launch, "launch_command", lambda *a: [sys.executable, "-c", fake_train])
    gpus = [("Fake GPU", 185 * 2**20, 48 * GIB)]  # 185 MiB free: rung 4 is the first to fit
    code = launch.final_train(DEMO, [], env={}, gpus=gpus)
    out, err = capfd.readouterr()
    assert code == launch.OOM_EXIT
    assert "chosen: rung 4 (exact)" in out and "predicted peak" in out
    assert "child 1 expandable_segments:True" in out
    assert out.count("  rung ") == 5  # what each rung up to the chosen one saves
    # The next knob is the next rung's move among the levers this training code reads.
    cfg = load_config(DEMO, env={})
    known = memory.known_levers(cfg)
    off = {k: memory.OFF[k] for k in memory.LEVERS if k not in known}
    rungs = memory.ladder(cfg, off)
    assert f"out of memory; next: {memory.next_knob(rungs[4], 14, known)}" in err
    nxt = {k: v for k, v in rungs[5].items() if v != rungs[4][k]}
    assert memory.next_knob(rungs[4], 14, known).startswith(f"set {memory._describe(nxt)} (")


def test_exit_code_survives_the_accelerate_launcher(tmp_path, monkeypatch, capfd):
    # `accelerate launch` exits 1 whatever its child's code; the wrapper reads the child's own
    # (here: the out-of-memory code, the one its advice depends on)
    child = tmp_path / "train.py"
    child.write_text(
        "import torch\nfrom jointdit.cli import run\n"
        "def main():\n    raise torch.OutOfMemoryError('CUDA out of memory (fake)')\n"
        "run(main)\n"
    )
    monkeypatch.setattr(launch, "TRAIN_SCRIPT", child)
    code = launch.final_train(DEMO, [], env={**os.environ, "PYTHONPATH": str(REPO)}, gpus=[])
    _, err = capfd.readouterr()
    assert code == launch.OOM_EXIT
    assert "out of memory; next:" in err


def test_final_train_script_rejects_bad_num_gpus():
    proc = run_script("final_train.py", "--config", DEMO, NUM_GPUS="many")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "NUM_GPUS='many'" in proc.stderr


def test_plan_memory_prints_the_table(monkeypatch, capsys):
    # Pinned levers shorten the ladder (each row runs the real tiny model on meta).
    pins = ["memory.q_chunk_v=32", "memory.q_chunk_a=32", "memory.kv_downsample=8"]
    pins += ["memory.max_t=4", "train.freeze_experts=true"]
    monkeypatch.setattr(sys, "argv", ["plan_memory.py", "--config", DEMO, *pins])
    monkeypatch.setenv("GPU_GB", "1")
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import plan_memory
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert plan_memory.main() == 0
    lines = capsys.readouterr().out.splitlines()
    assert "clip 64x64 (WxH), 14 frames at 7 fps" in lines[0]
    header = next(line.split() for line in lines if line.split()[:1] == ["rung"])
    assert header[1:3] == ["ckpt", "q_chunk"] and header[-1] == "kind"
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == [str(i) for i in range(len(rows))] and len(rows) >= 4
    assert all(r[2] == "32/32" and r[3] == "8" and r[4] == "4" for r in rows)  # pinned
    assert all(r[-2] in ("yes", "no") and r[-1] == "lossy" for r in rows)  # max_t 4 < 14
    assert lines[-1].startswith("chosen: rung 0 (lossy)")  # the tiny model fits 1 GiB as is


def test_apply_lora_adapts_linear_and_plain_convolutions():
    import torch
    from torch import nn

    from jointdit.model.lora import apply_lora

    def build():
        torch.manual_seed(0)
        return nn.ModuleDict(
            {
                "part": nn.Sequential(
                    nn.Linear(6, 5),
                    nn.Conv1d(3, 4, 3),
                    nn.Conv2d(4, 8, (3, 1), padding=1),
                    nn.Conv3d(2, 3, (3, 1, 1)),
                    nn.Conv2d(4, 4, 3, groups=2),  # grouped: no adapter
                    nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),  # no adapter
                    nn.GroupNorm(2, 4),
                ),
                "other": nn.Linear(7, 7),
            }
        )

    model = build()
    before = sum(p.numel() for p in model.parameters())
    assert apply_lora(model, ["part"], rank=3) == 4
    added = sum(p.numel() for p in model.parameters()) - before
    # Linear 3*(6+5), Conv1d 3*(3*3+4), Conv2d 3*(4*3+8), Conv3d 3*(2*3+3)
    assert added == 33 + 39 + 60 + 27


_TARGETS = [
    ("single", 1),
    ("ddp", 2),
    ("ddp", 8),
    ("fsdp", 1),
    ("fsdp", 8),
]


@pytest.mark.parametrize("engine, n", _TARGETS)
def test_planner_never_turns_a_lever_the_trainer_refuses(engine, n):
    """Every engine x lever: the table refuses what the training code refuses (the same call),
    the ladder never turns a refused lever, and turns every allowed one."""
    stage = ["train.freeze_experts=true", "train.unfreeze=[video_expert.unet.mid_block]"]
    stage_b = load_config(DEMO, stage, env={})

    def rungs(target):  # 8-bit AdamW is on the ladder when AdamW's state stays on the GPU
        return [*memory.ladder(stage_b, None, target), *memory.ladder(stage_b, _GPU_ADAMW, target)]

    value = {}
    for r in rungs(memory.Target()):
        value.update({k: v for k, v in r.items() if k in memory.LEVERS and v != memory.OFF[k]})
    assert set(value) == set(memory.LEVERS)
    on = {
        k for r in rungs(memory.Target(engine, n)) for k in memory.LEVERS if r[k] != memory.OFF[k]
    }
    for lever in memory.LEVERS:
        refusal = memory.lever_refusal(lever, engine, n)
        if refusal is None:
            assert lever in on, f"{lever} is allowed under {engine} x{n} but never turned"
            memory.check_levers({lever: value[lever]}, engine, n)  # accepted
        else:
            assert lever not in on, f"the ladder turns {lever}, which {engine} x{n} refuses"
            assert f"memory.{lever}" in refusal and "\n" not in refusal
            with pytest.raises(UserError, match=f"memory.{lever}"):
                memory.check_levers({lever: value[lever]}, engine, n)
    assert memory.lever_refusal("fused_step", "ddp", 2) and not memory.lever_refusal(
        "fused_step", "single", 1
    )
    assert memory.lever_refusal("ema_on_cpu", "fsdp", 1)


_GPU_ADAMW = {"optim_on_cpu": False}


@pytest.mark.parametrize("engine, lever", [("fsdp", "ema_on_cpu"), ("ddp", "fused_step")])
def test_training_refuses_with_the_planners_table(cfg, engine, lever, monkeypatch):
    """train() stops with the table's line, before anything is written (2 processes)."""
    from types import SimpleNamespace

    from jointdit import train as train_mod

    class FakeAccelerator:  # data parallel to accelerate: the repo shards the model itself
        def __init__(self, **_):
            self.process_index, self.num_processes = 0, 2
            self.distributed_type = SimpleNamespace(value="MULTI_CPU")

    monkeypatch.setattr("accelerate.Accelerator", FakeAccelerator)
    monkeypatch.setenv("WORLD_SIZE", "2")
    if engine == "fsdp":  # what `accelerate launch` sets for configs/accelerate/fsdp.yaml
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setattr(train_mod, "LatentDataset", lambda *a, **k: [None] * 8)
    over = [f"memory.{lever}=true", "train.grad_accum=1", "train.max_grad_norm=0"]
    with pytest.raises(UserError) as e:
        train_mod.train(load_config(DEMO, over, env={}))
    assert str(e.value) == memory.lever_refusal(lever, engine, 2)


def test_footprint_per_engine_process_count_and_host(cfg, monkeypatch):
    """DDP adds its gradient buckets; FSDP divides the state by the process count; the host
    holds each process's fp32 model while it loads and the host levers' state after."""
    monkeypatch.setattr(memory, "predict_peak", lambda *a: 100 * GIB)
    levers = memory.base_levers(cfg)
    trainable, total, largest = memory._model_sizes(cfg, levers)
    state = memory.state_bytes(cfg, levers)
    sharded = sum(state[k] for k in ("weights", "grads", "optimizer", "ema"))
    one = memory.footprint(cfg, levers, 1, memory.Target())
    assert one == (100 * GIB, 4 * total)
    assert memory.footprint(cfg, levers, 1, memory.Target("ddp", 8)) == (
        100 * GIB + 4 * trainable,
        8 * 4 * total,
    )
    fsdp, _ = memory.footprint(cfg, levers, 1, memory.Target("fsdp", 8))
    assert fsdp == 100 * GIB - sharded + sharded // 8 + 2 * 4 * largest  # fp32 run
    host_levers = {**levers, "ema_on_cpu": True, "optim_on_cpu": True}
    _, host = memory.footprint(cfg, host_levers, 1, memory.Target("ddp", 8))
    assert host == 8 * max(4 * total, 12 * trainable)
    # A host too small for the levers' state: no rung fits, and the table says so.
    small = memory.Target("ddp", 8, host_bytes=1)
    rows = memory.plan_walk(cfg, 200 * GIB, target=small)
    assert not any(r.fits for r in rows) and "host RAM" in memory.chosen_line(rows)


def test_plan_settings_read_engine_processes_and_host():
    fsdp = launch.launch_settings(
        {"ACCELERATE_CONFIG": "configs/accelerate/fsdp.yaml", "NUM_GPUS": "8", "HOST_GB": "64"}
    )
    assert fsdp.target() == memory.Target("fsdp", 8, 64 * GIB)
    assert launch.launch_settings({}).target() == memory.Target("single", 1, memory.machine_ram())
    assert launch.launch_settings({"NUM_GPUS": "2"}).target().engine == "ddp"
    with pytest.raises(UserError, match="HOST_GB"):
        launch.launch_settings({"HOST_GB": "lots"})


def test_without_gpus_an_accelerate_config_runs_one_process_unless_num_gpus(monkeypatch):
    """ddp.yaml holds num_processes 8 for a GPU machine; on a CPU machine NUM_GPUS decides."""
    seen = []
    monkeypatch.setattr(launch, "_run_training", lambda cmd, *a: seen.append(cmd) or 0)
    ddp = {"ACCELERATE_CONFIG": "configs/accelerate/ddp.yaml"}
    assert launch.final_train(DEMO, [], env=ddp, gpus=[]) == 0
    assert launch.final_train(DEMO, [], env={**ddp, "NUM_GPUS": "2"}, gpus=[]) == 0
    assert [cmd[cmd.index("--num_processes") + 1] for cmd in seen] == ["1", "2"]
