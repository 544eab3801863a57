"""The memory-aware training launcher (`make final-train-a | final-train-b`) and the table of
`make plan-memory`: the Make variables checked, the GPUs found, the planner asked
(jointdit/memory.py predicts and picks), training started as a child with the levers it picked,
and what to turn next when it runs out of memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from jointdit.cli import EXIT_FILE_VAR, EXIT_OOM
from jointdit.config import REPO_ROOT, load_config
from jointdit.errors import UserError
from jointdit.memory import (
    CALIBRATION,
    ENV_OF,
    GIB,
    LEVERS,
    OFF,
    PLANNED,
    SECTION_OF,
    STATE,
    USABLE_FRACTION,
    Plan,
    Target,
    architecture_source,
    budget_for_gb,
    chosen_line,
    clip_frames,
    clip_text,
    config_levers,
    engine_of,
    format_table,
    known_levers,
    machine_ram,
    next_knob,
    plan_table,
    plan_walk,
    savings_lines,
)

TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train.py"
OOM_EXIT = EXIT_OOM  # scripts/train.py exits with this after printing "out of memory"
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
    host_gb: float = 0  # 0 = not given: this machine's RAM

    def target(self, num_processes: int | None = None) -> Target:
        """The plan's target: the engine of the accelerate config, `num_processes` (default:
        NUM_GPUS, else the config's num_processes, else 1) and the host RAM."""
        path = self.accelerate_config
        if path and not Path(path).is_file():
            path = str(REPO_ROOT / path)
        acc = OmegaConf.load(path) if path else {}
        n = num_processes or self.num_gpus or int(acc.get("num_processes", 1))
        host = int(self.host_gb * GIB) if self.host_gb else machine_ram()
        return Target(engine_of(acc.get("distributed_type", "NO"), n), n, host)


def launch_settings(env: Mapping[str, str]) -> LaunchSettings:
    def number(var: str, kind, low) -> float:
        text = env.get(var, "")
        if text == "":
            return 0
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low:  # nan < low is False
            raise UserError(f"{var}={text!r} is malformed; accepted: {kind.__name__} >= {low}")
        return value

    keep = env.get("FORCE_KEEP_USER_ENVS", "")
    if keep not in ("", "0", "1"):
        raise UserError(f"FORCE_KEEP_USER_ENVS={keep!r} is malformed; accepted: 0 | 1")
    acc = env.get("ACCELERATE_CONFIG", "")
    if acc and not (REPO_ROOT / acc).is_file() and not Path(acc).is_file():
        raise UserError(
            f"ACCELERATE_CONFIG={acc!r}: no such file; configs/accelerate/ holds ddp.yaml and "
            "fsdp.yaml"
        )
    return LaunchSettings(
        num_gpus=int(number("NUM_GPUS", int, 1)),
        gpu_gb=float(number("GPU_GB", float, 1)),
        accelerate_config=acc,
        keep_user_envs=keep == "1",
        host_gb=float(number("HOST_GB", float, 1)),
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
    """Levers the planner must not change: command-line overrides of them (they win in the
    child anyway) and, with FORCE_KEEP_USER_ENVS=1, every JOINTDIT_* lever the user set."""
    given = config_levers(cfg)
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    pinned = {}
    for key in LEVERS:
        on_command_line = f"{SECTION_OF[key]}.{key}" in keys
        from_env = keep_user_envs and key in ENV_OF and env.get(ENV_OF[key], "") != ""
        if on_command_line or from_env:
            pinned[key] = given[key]
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


def child_overrides(levers: Mapping, known: set[str]) -> list[str]:
    """Config overrides that give the child the planned state levers (each known one stated,
    so a YAML value cannot differ from the plan), and what fused_step needs."""
    out = [f"memory.{k}={'true' if levers[k] else 'false'}" for k in STATE if k in known]
    if levers["fused_step"]:
        out += ["train.grad_accum=1", "train.max_grad_norm=0"]
    if "lora_rank" in known:
        out += [f"train.lora_rank={int(levers['lora_rank'])}"]
    return out


def launch_command(
    config_path: str, overrides: list[str], settings: LaunchSettings, precision: str
) -> list[str]:
    """`accelerate launch scripts/train.py --config ... overrides...` for the settings.

    `--quiet`: accelerate's launcher answers a failed run with a CalledProcessError traceback
    after the run's own one-line error; quiet, it leaves that one line alone."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet"]
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
        # NUM_GPUS=n without GPUs runs n CPU processes (gloo); unset, one process, whatever
        # num_processes an accelerate config holds for a GPU machine (8 in ddp.yaml)
        settings = dataclasses.replace(settings, num_gpus=settings.num_gpus or 1)
        print(
            f"no CUDA GPU found: training on CPU in {settings.num_gpus} process(es) with the "
            "config as is (no memory planning; NUM_GPUS=n runs n)"
        )
        cmd = launch_command(config_path, overrides, settings, "no")
        return _run_training(cmd, env, None, cfg, settings.target())

    used = gpus[: settings.num_gpus or 1]
    free = min(f for _, f, _ in used)
    budget = budget_for_gb(settings.gpu_gb) if settings.gpu_gb else int(free * USABLE_FRACTION)
    user = pinned_levers(cfg, overrides, env, settings.keep_user_envs)
    target = settings.target(len(used))
    known = known_levers(cfg)
    unknown = {k: OFF[k] for k in LEVERS if k not in known and k not in user}
    walk = plan_walk(cfg, budget, {**user, **unknown}, target)  # refused levers stay off
    chosen = walk[-1]
    print(
        f"GPU: {used[0][0]} x{len(used)}, free {free / GIB:.1f} GiB, planning for "
        f"{budget / GIB:.1f} GiB at batch {cfg.train.batch_size} per GPU, {clip_text(cfg)}; "
        f"{target.describe()}"
    )
    if user:
        print("kept as given: " + " ".join(f"{SECTION_OF[k]}.{k}={v}" for k, v in user.items()))
    if unknown:
        print("not read by this training code, kept off: " + " ".join(sorted(unknown)))
    overridden = [
        f"{ENV_OF[k]}={env[ENV_OF[k]]}"
        for k in PLANNED
        if env.get(ENV_OF[k]) and not settings.keep_user_envs
    ]
    if overridden:
        print(f"planner replaces {' '.join(overridden)} (FORCE_KEEP_USER_ENVS=1 keeps them)")
    print("what each lever saves (predicted peak per rung, docs/memory.md):")
    print("\n".join(savings_lines(walk)))
    print(chosen_line(walk) + " PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    print(
        f"predicted peak {chosen.predicted_peak / GIB:.1f} GiB per GPU, host "
        f"{chosen.host_peak / GIB:.1f} GiB (calibration {CALIBRATION:g})"
    )
    if not chosen.fits:
        print("warning: no rung is predicted to fit; trying the tightest one anyway")
    extra = child_overrides(chosen.levers, known)
    cmd = launch_command(config_path, [*overrides, *extra], settings, cfg.memory.precision)
    child = child_env(env, chosen.levers, settings.keep_user_envs)
    return _run_training(cmd, child, chosen, cfg, target)


def plan_report(cfg: DictConfig, overrides: list[str], env: Mapping[str, str]) -> str:
    """The planner's table for GPU_GB (default 48) as `make plan-memory` prints it."""
    settings = launch_settings(env)
    budget = budget_for_gb(settings.gpu_gb or 48)
    user = pinned_levers(cfg, overrides, env, settings.keep_user_envs)
    target = settings.target()
    head = [
        f"memory plan for model.size={cfg.model.size}, {clip_text(cfg)}, "
        f"batch {cfg.train.batch_size} per GPU, precision {cfg.memory.precision}",
        f"architecture: {architecture_source(cfg)}",
    ]
    missing = [k for k in LEVERS if k not in known_levers(cfg)]
    if missing:
        head.append(
            "not read by this training code yet (make final-train-* keeps them off): "
            + " ".join(missing)
        )
    refused = sorted({k for k in LEVERS if target.refusal(k)})
    if refused:
        head.append(
            f"refused by {target.engine} with {target.num_processes} process(es): "
            + " ".join(refused)
        )
    rows = plan_table(cfg, budget, user, target)
    return "\n".join(head) + "\n" + format_table(rows, budget, target)


def _run_training(
    cmd: list[str], env: dict, chosen: Plan | None, cfg: DictConfig, target: Target
) -> int:
    print("running: " + " ".join(cmd), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        codes_file = Path(tmp) / "exit_codes"
        code = subprocess.run(cmd, env={**env, EXIT_FILE_VAR: str(codes_file)}).returncode
        codes = [int(c) for c in codes_file.read_text().split()] if codes_file.is_file() else []
    if code != 0:  # the launcher says 1; what the processes said (out of memory first)
        failed = [c for c in codes if c != 0]
        code = OOM_EXIT if OOM_EXIT in failed else (failed[0] if failed else code)
    if code == OOM_EXIT:
        levers = chosen.levers if chosen else config_levers(cfg)
        allowed = {k for k in known_levers(cfg) if not target.refusal(k)}
        knob = next_knob(levers, clip_frames(cfg), allowed)
        print(f"out of memory; next: {knob}", file=sys.stderr)
    return code
