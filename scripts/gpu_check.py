"""`make gpu-check`: the published architectures, random weights, one GPU, measured.

Builds SVD-XT + AudioLDM2 JointDiT from the configs shipped in jointdit/assets/real_configs/
(no download) and, under a memory cap (`torch.cuda.set_per_process_memory_fraction`, 48 GiB
by default), measures at the paper's clip (configs/stage_a.yaml, stage_b.yaml):
- a Stage A and a Stage B training step with the planner's levers for the cap, run through
  `jointdit.train.train` on a few random cached latents (so every lever the training code reads
  from the config is used): peak `torch.cuda.max_memory_allocated` per step vs the planner's
  prediction, samples/s, model FLOP utilisation;
- one JointCFG sample (25 steps) and its chunked video decode (chunk 2): time and peak.
It prints one table, the CALIBRATION the measurements fit, and writes JSON (OUT=..., default
outputs/gpu_check.json). `--cpu-smoke` runs the same code on the tiny embedded size on CPU
(no GPU figures: it shows the script runs). About 3-6 minutes on an H100/H200.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from jointdit import memory
from jointdit.cli import run
from jointdit.config import frame_hw, load_config, repo_path
from jointdit.data.cache import CACHE_VERSION
from jointdit.errors import UserError
from jointdit.model.sizes import SVD_REPO, get_size

# Dense bf16 tensor-core peaks (spec sheets, no sparsity); MFU is left out for other GPUs.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
TRAIN_STEPS = 4  # the first one allocates AdamW's state; steps 2.. are the steady state
# The tiny size on CPU: small non-square frames, the paper's 14 frames at 7 fps, batch 1.
SMOKE = ["data.size=[16,32]", "train.batch_size=1"]


class _Stop(Exception):
    """Raised from the per-step callback after the last measured step: no checkpoint written."""


def _configs(smoke: bool) -> dict[str, tuple[Path, list[str]]]:
    if smoke:
        demo = repo_path("configs/demo")
        return {"A": (demo / "stage_a.yaml", SMOKE), "B": (demo / "stage_b.yaml", SMOKE)}
    shipped = [
        "model.random_init=true",  # the architecture from config.json, random weights
        f"model.video_unet={get_size('svd+audioldm2').video_shipped}",
        f"model.audio_unet={get_size('svd+audioldm2').audio_shipped}",
    ]
    configs = repo_path("configs")
    return {"A": (configs / "stage_a.yaml", shipped), "B": (configs / "stage_b.yaml", shipped)}


def _fake_cache(cfg, root: Path, clips: int = 2) -> None:
    """Random latents in the cache format at the config's clip shape (train split)."""
    shapes = memory.batch_shapes(cfg, memory.base_levers(cfg), 1)
    tensors = {
        "video_mean": torch.randn(shapes["video"][1:]),
        "video_std": torch.full(shapes["video"][1:], 0.1),
        "audio_mean": torch.randn(shapes["audio"][1:]),
        "audio_std": torch.full(shapes["audio"][1:], 0.1),
        "first_frame": torch.randn(2, *shapes["first_frame"][1:]),  # two augmented draws
    }
    for key, shape in shapes.items():  # conditions, AudioLDM2's prompt encoding included
        if key not in ("video", "audio", "first_frame"):
            mask = key.endswith("_mask")
            tensors[key] = (
                torch.ones(shape[1:], dtype=torch.int64) if mask else torch.randn(shape[1:])
            )
    (root / "train").mkdir(parents=True)
    (root / "meta" / "train").mkdir(parents=True)
    for i in range(clips):
        save_file(tensors, str(root / "train" / f"clip{i}.safetensors"))
        meta = {
            "clip_id": f"clip{i}",
            "cache_version": CACHE_VERSION,
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
        }
        (root / "meta" / "train" / f"clip{i}.json").write_text(json.dumps(meta))


def _lever_overrides(levers: dict, known: set[str]) -> list[str]:
    """The chosen rung as config overrides (what the wrapper passes as env knobs + overrides)."""

    def text(v) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    planned = [f"memory.{k}={text(levers[k])}" for k in memory.PLANNED]
    return planned + memory.child_overrides(levers, known)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def _reset(device: torch.device) -> None:
    gc.collect()  # a finished stage's model and optimizer, held by reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train_step(
    stage: str, path: Path, base: list[str], cap: int, device, work: Path, steps: int
) -> dict:
    """Plan for `cap`, run `steps` training steps through jointdit.train, measure."""
    from jointdit.train import train

    cfg = load_config(path, base, env={})
    known = memory.known_levers(cfg)
    unknown = {k: memory.OFF[k] for k in memory.LEVERS if k not in known}
    walk = memory.plan_walk(cfg, memory.budget_for_gb(cap / memory.GIB), unknown)
    chosen = walk[-1]
    cache = work / f"cache_{stage}"
    _fake_cache(cfg, cache, clips=max(2, cfg.train.batch_size))
    overrides = [
        *base,
        *_lever_overrides(chosen.levers, known),
        f"cache.dir={cache}",
        f"train.out_dir={work / 'runs'}",
        f"run.name=gpu_check_{stage}",
        "train.init_from=",
        "train.grad_accum=1",  # one step = one batch; memory does not depend on it
        f"train.max_steps={steps + 1}",
        "train.save_every=1000000",
        "train.log_every=1000000",
        "train.tensorboard=false",
        "train.preview_every=1",
    ]
    run_cfg = load_config(path, overrides, env={})
    marks: list[tuple[float, int | None]] = []

    def after_step(model, cfg, out_dir, step):  # train's preview hook: once per step
        _sync(device)
        marks.append((time.perf_counter(), _peak(device)))
        _reset(device)
        if step == steps:
            raise _Stop

    _reset(device)
    t0 = time.perf_counter()
    try:
        train(run_cfg, preview=after_step)
    except _Stop:
        pass
    times = [b[0] - a[0] for a, b in zip(marks, marks[1:])]  # steps 2..TRAIN_STEPS
    peaks = [p for _, p in marks[1:] if p is not None]
    batch = run_cfg.train.batch_size
    samples_s = batch / statistics.mean(times) if times else None
    flops = memory.step_flops(cfg, batch)
    peak_flops = next(
        (v for k, v in PEAK_BF16_FLOPS.items() if device.type == "cuda" and k in _gpu_name()),
        None,
    )
    predicted_raw = chosen.predicted_peak / memory.CALIBRATION
    measured = max(peaks) if peaks else None
    return {
        "stage": stage,
        "config": str(path.relative_to(repo_path("."))),
        "clip": memory.clip_text(cfg),
        "rung": chosen.ladder_position,
        "kind": chosen.kind,
        "levers": memory.format_levers(chosen.levers),
        "predicted_peak_gib": chosen.predicted_peak / memory.GIB,
        "measured_peak_gib": None if measured is None else measured / memory.GIB,
        "measured_over_raw_prediction": None if measured is None else measured / predicted_raw,
        "first_step_peak_gib": None if marks[0][1] is None else marks[0][1] / memory.GIB,
        "setup_and_first_step_s": marks[0][0] - t0,
        "step_s": statistics.mean(times) if times else None,
        "samples_per_s": samples_s,
        "model_tflop_per_step": flops / 1e12,
        "mfu": None if not (peak_flops and samples_s) else flops / batch * samples_s / peak_flops,
    }


def sample_and_decode(path: Path, base: list[str], steps: int, device, smoke: bool) -> dict:
    """One JointCFG sample of Stage B's model (random weights) and its video decode at chunk 2."""
    from diffusers import AutoencoderKLTemporalDecoder

    from jointdit.codecs.tiny import VIDEO_VAE
    from jointdit.codecs.video import VideoCodec
    from jointdit.diffusion import GuidanceWeights, JointDiffusion
    from jointdit.model import build_model

    cfg = load_config(path, base, env={})
    half = cfg.memory.precision in ("bf16", "fp16") and device.type == "cuda"
    dtype = torch.bfloat16 if half else torch.float32
    _reset(device)
    with torch.device(device):  # initialise the random weights where they will run
        model = build_model(cfg).to(dtype).eval()
    shapes = memory.batch_shapes(cfg, memory.base_levers(cfg), 1)
    g = torch.Generator(device).manual_seed(0)
    cond = {
        k: torch.ones(s, device=device, dtype=torch.int64)
        if k.endswith("_mask")
        else torch.randn(s, generator=g, device=device, dtype=dtype)
        for k, s in shapes.items()
        if k not in ("video", "audio")
    }
    inf = cfg.infer
    weights = GuidanceWeights(
        wv=inf.wv, wa=inf.wa, wi=inf.wi, wt=inf.wt, wnt=0.0, wi_first=inf.wi_first
    )
    _reset(device)
    _sync(device)
    t0 = time.perf_counter()
    video, _ = JointDiffusion(cfg.diffusion).sample(
        model, cond, shapes["video"][1], shapes["audio"][2], steps, weights, generator=g
    )
    _sync(device)
    sample_s, sample_peak = time.perf_counter() - t0, _peak(device)
    del model
    if smoke:
        vae = AutoencoderKLTemporalDecoder(**VIDEO_VAE)
    else:
        vae = AutoencoderKLTemporalDecoder.from_config(
            AutoencoderKLTemporalDecoder.load_config(SVD_REPO / "vae")
        )
    codec = VideoCodec(vae.to(device) if dtype == torch.float32 else vae.to(device, dtype))
    _reset(device)
    base_bytes = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    t0 = time.perf_counter()
    frames = codec.decode(video[0], chunk=2)
    _sync(device)
    decode_s, decode_peak = time.perf_counter() - t0, _peak(device)
    h, w = frame_hw(cfg)
    if tuple(frames.shape) != (shapes["video"][1], 3, h, w):
        raise RuntimeError(f"decoded frames {tuple(frames.shape)}, expected {(h, w)} frames")
    gib = memory.GIB
    return {
        "sample_steps": steps,
        "guidance": f"wv={inf.wv} wa={inf.wa} wi={inf.wi}",
        "sample_s": sample_s,
        "sample_peak_gib": None if sample_peak is None else sample_peak / gib,
        "decode_chunk": 2,
        "decode_s": decode_s,
        "decode_peak_gib": None if decode_peak is None else (decode_peak - base_bytes) / gib,
    }


def _gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def report(result: dict) -> str:
    lines = [f"gpu-check on {result['device']} (cap {_fmt(result['cap_gib'], '.0f')} GiB)"]
    lines.append(
        f"{'stage':<5} {'rung':>4} {'kind':<12} {'predicted':>9} {'measured':>9} {'ratio':>6} "
        f"{'step s':>7} {'samples/s':>9} {'TFLOP':>6} {'MFU':>6}"
    )
    for r in result["train"]:
        lines.append(
            f"{r['stage']:<5} {r['rung']:>4} {r['kind']:<12} {r['predicted_peak_gib']:>9.2f} "
            f"{_fmt(r['measured_peak_gib']):>9} {_fmt(r['measured_over_raw_prediction']):>6} "
            f"{_fmt(r['step_s']):>7} {_fmt(r['samples_per_s']):>9} "
            f"{r['model_tflop_per_step']:>6.1f} {_fmt(r['mfu'], '.1%'):>6}"
        )
    s = result["sample"]
    lines.append(
        f"sample: {s['sample_steps']} steps JointCFG ({s['guidance']}) {s['sample_s']:.1f} s, "
        f"peak {_fmt(s['sample_peak_gib'])} GiB; video decode chunk {s['decode_chunk']} "
        f"{s['decode_s']:.1f} s, peak {_fmt(s['decode_peak_gib'])} GiB"
    )
    fit = result["calibration_fit"]
    lines.append(
        "calibration: no GPU figures (CPU smoke run)"
        if fit is None
        else f"calibration: measured/predicted median {fit:.3f}; set CALIBRATION = {fit:.3f} "
        "in jointdit/memory.py (docs/memory.md)"
    )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny size on CPU: does it run?")
    p.add_argument("--cap-gb", type=float, default=48.0, help="GPU memory cap in GiB")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--out", default=os.environ.get("OUT") or "outputs/gpu_check.json")
    args = p.parse_args()
    if args.steps < 1 or args.cap_gb <= 0:
        raise UserError("--steps must be >= 1 and --cap-gb > 0")
    if args.cpu_smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny ops: threads only add contention
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        total = torch.cuda.get_device_properties(0).total_memory
        if args.cap_gb * memory.GIB > total:
            raise UserError(f"--cap-gb {args.cap_gb} exceeds the GPU's {total / memory.GIB:.0f}")
        torch.cuda.set_per_process_memory_fraction(args.cap_gb * memory.GIB / total)
    else:
        raise UserError("no CUDA GPU visible; `--cpu-smoke` runs the tiny size on CPU instead")
    cap = int(args.cap_gb * memory.GIB)
    configs = _configs(args.cpu_smoke)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        rows = [
            train_step(s, p, base, cap, device, Path(tmp), 2 if args.cpu_smoke else TRAIN_STEPS)
            for s, (p, base) in configs.items()
        ]
    _reset(device)
    sample = sample_and_decode(*configs["B"], args.steps, device, args.cpu_smoke)
    ratios = [r["measured_over_raw_prediction"] for r in rows if r["measured_over_raw_prediction"]]
    result = {
        "device": _gpu_name() if device.type == "cuda" else "cpu (smoke run: no GPU figures)",
        "torch": torch.__version__,
        "cap_gib": args.cap_gb,
        "calibration_in_use": memory.CALIBRATION,
        "calibration_fit": statistics.median(ratios) if ratios else None,
        "train": rows,
        "sample": sample,
    }
    print(report(result))
    out = repo_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run(main)
