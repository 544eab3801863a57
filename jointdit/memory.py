"""Memory levers, the peak-memory predictor and the planner that picks levers for a GPU budget.

The levers (DESIGN section 4; `jointdit/defaults/memory.yaml`, env knobs `JOINTDIT_*`):
gradient checkpointing and query chunking are exact; KV downsampling and fewer frames are lossy.

Prediction runs one real training step of the real model on the `meta` device (no memory, no
GPU): a dispatch mode follows every tensor storage from allocation to release and records the
peak, forward and backward alike, so activations saved for backward, checkpoint recomputation
and transient workspaces (e.g. one query chunk's attention) are all counted as the code
allocates them. Weights, AdamW states and the EMA copy, which live outside that step, are added
from the parameter counts. Two assumptions, both checked by a GPU calibration (docs/memory.md):
attention runs a fused kernel (what CUDA's scaled_dot_product_attention picks for these
shapes), and `CALIBRATION` scales the result to `torch.cuda.max_memory_allocated`.

The planner walks a fixed ladder, least lossy first, and takes the first rung that fits; so a
larger budget can never pick a lossier rung.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from omegaconf import DictConfig, OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from jointdit.config import KNOBS, REPO_ROOT, load_config
from jointdit.errors import UserError

GIB = 2**30

# Measured peak / predicted peak. 1.0 = uncalibrated: no GPU run has fitted it yet
# (docs/memory.md says how to measure it and where to write the number).
CALIBRATION = 1.0
# Memory a CUDA context takes before the first tensor (not in max_memory_allocated).
CUDA_CONTEXT_BYTES = GIB // 2
# Allocator fragmentation and cuDNN/cuBLAS workspaces: plan against this share of free memory.
USABLE_FRACTION = 0.95

# CLIP's context length: captions are padded to it.
TEXT_TOKENS = 77

# The levers the planner sets (precision is the config's choice, not a planner lever).
PLANNED = ("grad_ckpt", "q_chunk_v", "q_chunk_a", "kv_downsample", "max_t")
ENV_OF = {k.key.split(".", 1)[1]: k.env for k in KNOBS if k.key.startswith("memory.")}

# The ladder's moves, in the order they are turned. Exact levers first.
Q_CHUNKS = (1024, 256, 64, 32)
KV_FACTORS = (2, 4, 8)
MAX_TS = (16, 12, 8, 6, 4, 2)


def _moves(frames: int) -> list[dict]:
    moves: list[dict] = [{"grad_ckpt": True}]
    moves += [{"q_chunk_v": c, "q_chunk_a": c} for c in Q_CHUNKS]
    moves += [{"kv_downsample": f} for f in KV_FACTORS]
    moves += [{"max_t": t} for t in MAX_TS if t < frames]
    return moves


def _tighter(key: str, new, old) -> bool:
    """True when `new` saves more memory than `old` for lever `key` (0 = off for chunks/max_t)."""
    if key == "grad_ckpt":
        return bool(new) and not bool(old)
    if key == "kv_downsample":
        return new > old
    return new > 0 and (old == 0 or new < old)  # q_chunk_*, max_t


def is_lossy(levers: Mapping, frames: int) -> bool:
    """KV downsampling and fewer frames than the clip has change what the model sees."""
    return levers["kv_downsample"] > 1 or 0 < levers["max_t"] < frames


def base_levers(cfg: DictConfig) -> dict:
    """All levers off, precision as the config says."""
    return {
        "max_t": 0,
        "q_chunk_v": 0,
        "q_chunk_a": 0,
        "kv_downsample": 1,
        "grad_ckpt": False,
        "precision": cfg.memory.precision,
    }


def ladder(cfg: DictConfig, user_levers: Mapping | None = None) -> list[dict]:
    """The rungs, least lossy first; levers in `user_levers` stay as given on every rung."""
    user = dict(user_levers or {})
    frames = clip_frames(cfg)
    rung = {**base_levers(cfg), **user}
    rungs = [dict(rung)]
    for move in _moves(frames):
        move = {k: v for k, v in move.items() if k not in user}
        if any(_tighter(k, v, rung[k]) for k, v in move.items()):
            rung.update({k: v for k, v in move.items() if _tighter(k, v, rung[k])})
            rungs.append(dict(rung))
    return rungs


def next_knob(levers: Mapping, frames: int | None = None) -> str:
    """What to turn after an out-of-memory error at `levers`: env variables and values."""
    frames = 1 << 30 if frames is None else frames
    for move in _moves(frames):
        change = {k: v for k, v in move.items() if _tighter(k, v, levers.get(k))}
        if change:
            kind = "lossy" if {"kv_downsample", "max_t"} & set(change) else "exact"
            sets = " ".join(f"{ENV_OF[k]}={int(v)}" for k, v in change.items())
            return f"set {sets} ({kind}; FORCE_KEEP_USER_ENVS=1 keeps it)"
    return (
        "every memory lever is at its tightest: lower train.batch_size (raise train.grad_accum "
        "to keep the effective batch) or train on more GPUs (NUM_GPUS=n)"
    )


# ---------------------------------------------------------------------------------------------
# shapes


def clip_frames(cfg: DictConfig) -> int:
    """Video frames per training clip at the data's fps and duration."""
    return max(1, round(cfg.data.fps * cfg.data.duration))


def batch_shapes(cfg: DictConfig, levers: Mapping, batch_size: int) -> dict[str, tuple]:
    """Shapes of one training batch as the latent cache delivers it (cache record contract)."""
    frames = clip_frames(cfg)
    if levers["max_t"] > 0:
        frames = min(frames, levers["max_t"])
    side = cfg.data.size // 8  # the SVD VAE's spatial factor
    mel_frames = round(frames / cfg.data.fps * cfg.data.sample_rate / 160)  # AudioLDM2 hop
    m = cfg.model
    return {
        "video": (batch_size, frames, 4, side, side),
        "audio": (batch_size, 8, mel_frames // 4, 16),
        "first_frame": (batch_size, 4, side, side),
        "image_emb": (batch_size, m.image_emb_dim),
        "text_emb": (batch_size, TEXT_TOKENS, m.text_emb_dim),
        "text_mask": (batch_size, TEXT_TOKENS),
    }


# ---------------------------------------------------------------------------------------------
# prediction


class _PeakTracker(TorchDispatchMode):
    """Follows every storage the step allocates until it is released; records the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.now += self.live[key]
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            # .item() has no value on meta; logging and guards get a harmless zero.
            dtype = args[0].dtype
            return 0.0 if dtype.is_floating_point else (False if dtype == torch.bool else 0)
        with torch._C._DisablePythonDispatcher():  # the C++ meta kernels: ~10x faster
            out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """scaled_dot_product_attention as CUDA's memory-efficient kernel allocates (O(tokens))."""
    lead, n, m = q.shape[:-2], q.shape[-2], k.shape[-2]
    q4, k4, v4 = (x.reshape(-1, 1, *x.shape[-2:]) for x in (q, k, v))
    bias = attn_mask
    if bias is not None:
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~bias, float("-inf")
            )
        bias = bias.expand(*lead, n, m).reshape(-1, 1, n, m)
    grad = q.requires_grad or k.requires_grad or v.requires_grad
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        q4, k4, v4, bias, grad, is_causal=is_causal, scale=scale
    )[0]
    return out.reshape(*lead, n, v.shape[-1])


@contextmanager
def _fused_attention() -> Iterator[None]:
    """On meta, SDPA takes the math path and materialises every score matrix; a CUDA GPU runs
    a fused kernel. Swap the function for the step (also for checkpoint recomputation, which
    runs in autograd's engine where a TorchFunctionMode would not reach)."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _with_levers(cfg: DictConfig, levers: Mapping) -> DictConfig:
    out = copy.deepcopy(cfg)
    OmegaConf.set_struct(out, False)
    out.memory.update(dict(levers))
    if "random_init" in out.model:
        out.model.random_init = True  # the architecture is enough; never read weights here
    OmegaConf.set_struct(out, True)
    return out


def _meta_batch(shapes: Mapping[str, tuple], dtype: torch.dtype) -> dict:
    batch = {k: torch.randn(s, device="meta", dtype=dtype) for k, s in shapes.items()}
    batch["text_mask"] = torch.ones(shapes["text_mask"], device="meta", dtype=torch.int64)
    batch["clip_id"] = [f"clip{i}" for i in range(shapes["video"][0])]
    return batch


def predict_peak(cfg: DictConfig, levers: Mapping, batch_size: int) -> int:
    """Predicted peak GPU memory (bytes) of one training step of `cfg` with `levers`."""
    from jointdit.diffusion import JointDiffusion
    from jointdit.model import build_model

    levers = {**base_levers(cfg), **dict(levers)}
    run_cfg = _with_levers(cfg, levers)
    # Mixed precision runs the step in half precision on fp32 master weights.
    half = levers["precision"] in ("bf16", "fp16")
    step_dtype = torch.bfloat16 if half else torch.float32
    # Parameters go straight to meta; small construction-time tensors stay real.
    with init_empty_weights():
        model = build_model(run_cfg)
    model.to("meta")
    model.set_memory(**{k: levers[k] for k in PLANNED})
    if cfg.train.freeze_experts:
        model.freeze_experts(list(cfg.train.unfreeze))
    model.to(step_dtype).train()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    tracker = _PeakTracker()
    batch = _meta_batch(batch_shapes(cfg, levers, batch_size), step_dtype)
    with _fused_attention(), tracker:
        loss, _ = JointDiffusion(cfg.diffusion).loss(model, batch)
        loss.backward()  # grads of trainable params are allocated here, in step_dtype
    step_peak = tracker.peak

    grad_fix = trainable * (4 - step_dtype.itemsize)  # real grads are fp32, like the weights
    cast_cache = trainable * step_dtype.itemsize if half else 0  # autocast's weight copies
    resident = params * 4 + trainable * (8 + 4)  # fp32 weights; AdamW m, v; EMA copy
    return int(CALIBRATION * (resident + step_peak + grad_fix + cast_cache))


# ---------------------------------------------------------------------------------------------
# planning


@dataclass(frozen=True)
class Plan:
    levers: dict
    predicted_peak: int
    ladder_position: int
    lossy: bool
    fits: bool


def plan_table(
    cfg: DictConfig, budget_bytes: int, user_levers: Mapping | None = None
) -> list[Plan]:
    """Every rung of the ladder with its prediction (what `make plan-memory` prints)."""
    frames, batch = clip_frames(cfg), cfg.train.batch_size
    rows = []
    for i, levers in enumerate(ladder(cfg, user_levers)):
        peak = predict_peak(cfg, levers, batch)
        rows.append(Plan(levers, peak, i, is_lossy(levers, frames), peak <= budget_bytes))
    return rows


def plan(cfg: DictConfig, budget_bytes: int, user_levers: Mapping | None = None) -> Plan:
    """The least lossy rung predicted to fit `budget_bytes` (the last rung when none fits)."""
    frames, batch = clip_frames(cfg), cfg.train.batch_size
    rungs = ladder(cfg, user_levers)
    for i, levers in enumerate(rungs):
        peak = predict_peak(cfg, levers, batch)
        if peak <= budget_bytes or i == len(rungs) - 1:
            return Plan(levers, peak, i, is_lossy(levers, frames), peak <= budget_bytes)
    raise AssertionError("a ladder always has a rung")


def format_levers(levers: Mapping) -> str:
    return " ".join(f"{ENV_OF[k]}={int(levers[k])}" for k in PLANNED)


def format_table(rows: list[Plan], budget_bytes: int) -> str:
    width = max(len(format_levers(r.levers)) for r in rows)
    lines = [
        f"budget {budget_bytes / GIB:.1f} GiB (calibration {CALIBRATION:g})",
        f"{'rung':>4}  {'levers':<{width}} {'peak GiB':>8}  fits  lossy",
    ]
    for r in rows:
        lines.append(
            f"{r.ladder_position:>4}  {format_levers(r.levers):<{width}} "
            f"{r.predicted_peak / GIB:>8.2f}  {'yes' if r.fits else 'no':<4}  "
            f"{'yes' if r.lossy else 'no'}"
        )
    chosen = next((r for r in rows if r.fits), None)
    if chosen is None:
        lines.append("chosen: none fits; lower train.batch_size or use more GPUs")
    else:
        lines.append(f"chosen: rung {chosen.ladder_position}: {format_levers(chosen.levers)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the memory-aware training launcher (make final-train-a | final-train-b)

TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train.py"
OOM_EXIT = 3  # scripts/train.py exits with this after printing "out of memory"
_PROBE = (
    "import json, torch\n"
    "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
    "print(json.dumps([[torch.cuda.get_device_name(i), *torch.cuda.mem_get_info(i)]"
    " for i in range(n)]))"
)


@dataclass(frozen=True)
class LaunchSettings:
    """The wrapper's Make/environment variables, checked."""

    num_gpus: int  # 0 = not given
    gpu_gb: float  # 0 = not given: use the detected free memory
    accelerate_config: str
    keep_user_envs: bool


def launch_settings(env: Mapping[str, str]) -> LaunchSettings:
    def number(var: str, kind, low) -> float:
        text = env.get(var, "")
        if text == "":
            return 0
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise UserError(f"{var}={text!r} is malformed; accepted: {kind.__name__} >= {low}")
        return value

    keep = env.get("FORCE_KEEP_USER_ENVS", "")
    if keep not in ("", "0", "1"):
        raise UserError(f"FORCE_KEEP_USER_ENVS={keep!r} is malformed; accepted: 0 | 1")
    acc = env.get("ACCELERATE_CONFIG", "")
    if acc and not (REPO_ROOT / acc).is_file() and not Path(acc).is_file():
        raise UserError(
            f"ACCELERATE_CONFIG={acc!r}: no such file; configs/accelerate/ holds ddp.yaml, "
            "fsdp.yaml, deepspeed.yaml"
        )
    return LaunchSettings(
        num_gpus=int(number("NUM_GPUS", int, 1)),
        gpu_gb=float(number("GPU_GB", float, 1)),
        accelerate_config=acc,
        keep_user_envs=keep == "1",
    )


def probe_gpus(python: str = sys.executable) -> list[tuple[str, int, int]]:
    """(name, free bytes, total bytes) per visible CUDA GPU, [] without one.

    Asked in a child process so that this one holds no CUDA context while training runs.
    """
    out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return []
    return [(name, int(free), int(total)) for name, free, total in json.loads(out.stdout)]


def pinned_levers(
    cfg: DictConfig, overrides: list[str], env: Mapping[str, str], keep_user_envs: bool
) -> dict:
    """Levers the planner must not change: command-line `memory.*` overrides (they win in the
    child anyway) and, with FORCE_KEEP_USER_ENVS=1, every JOINTDIT_* lever the user set."""
    pinned = {}
    for key in PLANNED:
        on_command_line = any(o.split("=", 1)[0].strip() == f"memory.{key}" for o in overrides)
        if on_command_line or (keep_user_envs and env.get(ENV_OF[key], "") != ""):
            pinned[key] = cfg.memory[key]
    return pinned


def child_env(env: Mapping[str, str], levers: Mapping, keep_user_envs: bool) -> dict[str, str]:
    """The training process's environment: planned knobs set, the user's kept where asked."""
    out = dict(env)
    for key in PLANNED:
        if keep_user_envs and env.get(ENV_OF[key], "") != "":
            continue
        out[ENV_OF[key]] = str(int(levers[key]))
    if not (keep_user_envs and env.get("PYTORCH_CUDA_ALLOC_CONF")):
        out["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # less fragmentation
    return out


def launch_command(
    config_path: str, overrides: list[str], settings: LaunchSettings, precision: str
) -> list[str]:
    """`accelerate launch scripts/train.py --config ... overrides...` for the settings."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if settings.accelerate_config:
        cmd += ["--config_file", settings.accelerate_config]
        if settings.num_gpus:
            cmd += ["--num_processes", str(settings.num_gpus)]
    else:
        n = settings.num_gpus or 1
        if n > 1:
            cmd += ["--multi_gpu"]
        cmd += ["--num_processes", str(n), "--num_machines", "1"]
        cmd += ["--mixed_precision", precision, "--dynamo_backend", "no"]
    return [*cmd, str(TRAIN_SCRIPT), "--config", str(config_path), *overrides]


def final_train(
    config_path: str,
    overrides: list[str],
    env: Mapping[str, str] | None = None,
    gpus: list[tuple[str, int, int]] | None = None,
) -> int:
    """Plan memory for the GPUs found, print the plan, run training as a child; its exit code.

    `gpus` defaults to what `probe_gpus()` finds.
    """
    env = dict(os.environ if env is None else env)
    settings = launch_settings(env)
    cfg = load_config(config_path, overrides, env=env)
    gpus = probe_gpus() if gpus is None else gpus
    if gpus and settings.num_gpus > len(gpus):
        raise UserError(f"NUM_GPUS={settings.num_gpus} but {len(gpus)} CUDA GPU(s) are visible")
    if not gpus:
        print("no CUDA GPU found: training on CPU with the config as is (no memory planning)")
        # NUM_GPUS=n without GPUs runs n CPU processes (gloo), as accelerate does.
        cmd = launch_command(config_path, overrides, settings, "no")
        return _run_training(cmd, env, None, cfg)

    used = gpus[: settings.num_gpus or 1]
    free = min(f for _, f, _ in used)
    budget = budget_for_gb(settings.gpu_gb) if settings.gpu_gb else int(free * USABLE_FRACTION)
    user = pinned_levers(cfg, overrides, env, settings.keep_user_envs)
    chosen = plan(cfg, budget, user)
    print(
        f"GPU: {used[0][0]} x{len(used)}, free {free / GIB:.1f} GiB, planning for "
        f"{budget / GIB:.1f} GiB at batch {cfg.train.batch_size} per GPU"
    )
    if user:
        print("kept as given: " + " ".join(f"memory.{k}={v}" for k, v in user.items()))
    overridden = [
        f"{ENV_OF[k]}={env[ENV_OF[k]]}"
        for k in PLANNED
        if env.get(ENV_OF[k]) and not settings.keep_user_envs
    ]
    if overridden:
        print(f"planner replaces {' '.join(overridden)} (FORCE_KEEP_USER_ENVS=1 keeps them)")
    print(
        f"chosen (rung {chosen.ladder_position}{', lossy' if chosen.lossy else ''}): "
        f"{format_levers(chosen.levers)} PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    )
    print(f"predicted peak {chosen.predicted_peak / GIB:.1f} GiB (calibration {CALIBRATION:g})")
    if not chosen.fits:
        print("warning: no rung is predicted to fit; trying the tightest one anyway")
    cmd = launch_command(config_path, overrides, settings, cfg.memory.precision)
    return _run_training(cmd, child_env(env, chosen.levers, settings.keep_user_envs), chosen, cfg)


def budget_for_gb(gpu_gb: float) -> int:
    """Bytes to plan for on a card of `gpu_gb` GiB: less the CUDA context and a margin."""
    return int((gpu_gb * GIB - CUDA_CONTEXT_BYTES) * USABLE_FRACTION)


def plan_report(cfg: DictConfig, overrides: list[str], env: Mapping[str, str]) -> str:
    """The planner's table for GPU_GB (default 48) as `make plan-memory` prints it."""
    settings = launch_settings(env)
    budget = budget_for_gb(settings.gpu_gb or 48)
    user = pinned_levers(cfg, overrides, env, settings.keep_user_envs)
    head = (
        f"memory plan for model.size={cfg.model.size}, {clip_frames(cfg)} frames, "
        f"batch {cfg.train.batch_size} per GPU, precision {cfg.memory.precision}"
    )
    return head + "\n" + format_table(plan_table(cfg, budget, user), budget)


def _run_training(cmd: list[str], env: dict, chosen: Plan | None, cfg: DictConfig) -> int:
    print("running: " + " ".join(cmd), flush=True)
    code = subprocess.run(cmd, env=env, check=False).returncode
    if code == OOM_EXIT:
        levers = chosen.levers if chosen else {**base_levers(cfg), **dict(cfg.memory)}
        print(f"out of memory; next: {next_knob(levers, clip_frames(cfg))}", file=sys.stderr)
    return code
