"""`make gpu-check`: the published architectures, random weights, one GPU, measured.

Builds SVD-XT + AudioLDM2 JointDiT from the configs shipped in jointdit/assets/real_configs/
(no download) and, under a memory cap (`torch.cuda.set_per_process_memory_fraction`, 48 GiB
by default), measures at the paper's clip (configs/stage_a.yaml, stage_b.yaml):
- a Stage A and a Stage B training step with the planner's levers for the cap, run through
  `jointdit.train.train` on a few random cached latents (so every lever the training code reads
  from the config is used): peak `torch.cuda.max_memory_allocated` per step vs the planner's
  prediction, samples/s, model FLOP utilisation;
- one JointCFG sample (25 steps) and its chunked video decode (chunk 2): time and peak;
- expert parity (`expert_parity`, JSON key "parity"): a fresh JointDiT against diffusers'
  StableVideoDiffusionPipeline and AudioLDM2Pipeline on the same random-weight experts at the
  published size (jointdit/random_experts.py), in bf16, at the paper's clip with the
  experts' default guidance, 25 steps: relative L2 of the final video and audio latents, joint
  and iso, beside how far the pipelines' own bf16 run lands from their float32 run. bf16 does
  not reach the tests' 1e-4 bar: in float32 on CPU (tests/test_expert_parity.py; `--cpu-smoke`)
  the figures are ~4e-6 (video) and ~1e-6 (audio) at 4 steps; narrowed in bf16 on CPU they
  were 4.0e-2 and 1.1e-2, the pipelines' own bf16 vs float32 3.2e-2 and 1.6e-2.
It prints one table, the CALIBRATION the measurements fit, and writes JSON (OUT=..., default
outputs/gpu_check.json). `--cpu-smoke` runs the same code on the tiny embedded size on CPU
(narrowed experts for the parity; no GPU figures: it shows the script runs). About 3-6 minutes
on an H100/H200, plus an estimated 1 minute for the parity.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from jointdit import launch, memory
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


# Expert parity: tests/test_expert_parity.py's clip in smoke mode ((H, W), fps, seconds: 7
# frames of 8x12 latents, 25 audio latent frames); on a GPU the paper's, from stage_a.yaml.
PARITY_SMOKE_CLIP = ((64, 96), 7, 1.0)
PARITY_SMOKE_STEPS = 4
PARITY_PROMPT, PARITY_SEED = "a dog barks", 0
# The experts' defaults as JointCFG weights are configs/infer.yaml's: SVD's image guidance 1 -> 3
# across the frames, AudioLDM2's text guidance 3.5; the joint-vs-iso terms vanish at init.


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
    return planned + launch.child_overrides(levers, known)


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
    from jointdit.diffusion import JointDiffusion
    from jointdit.model import build_model
    from jointdit.pipeline import weights_from_config

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
    weights = dataclasses.replace(weights_from_config(inf), wnt=0.0)
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


def _timed(device: torch.device, fn, *args):
    """(fn(*args), seconds) with the device's queue drained on both sides."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return out, time.perf_counter() - t0


@contextlib.contextmanager
def _full_float32():
    """Float32 matmuls and convolutions without TF32 (cuDNN allows it by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def expert_parity(
    steps: int, device: torch.device, smoke: bool, dtype: torch.dtype | None = None
) -> dict:
    """A fresh JointDiT against diffusers' StableVideoDiffusionPipeline and AudioLDM2Pipeline
    on the same random-weight experts (jointdit/random_experts.py), as
    tests/test_expert_parity.py compares them, at the published size and the paper's clip
    (configs/stage_a.yaml) in bf16, or narrowed on a tiny clip in float32 with `smoke`.

    One set of modules serves both sides: the project's Generator gets them as in-memory codecs
    and its JointDiT takes the UNets' tensors (`load_state_dict(assign=True)`: no copy). The
    pipelines run in bf16 as diffusers runs them; the project's sampler keeps float32 latents
    and conditions (its Generator has no precision switch), so it runs under bf16 autocast.
    Relative L2 of the final video and audio latents, joint and iso (no decode), and as the
    yardstick the pipelines' bf16 run against their run on the same weights cast up to float32.
    `dtype` (default: bf16 on a GPU, else float32) also takes bf16 on the CPU, which runs this
    code's bf16 path without a GPU.
    """
    import warnings

    import numpy as np
    from PIL import Image

    from jointdit import media
    from jointdit.model import build_model
    from jointdit.pipeline import Generator, Request, weights_from_config
    from jointdit.random_experts import (
        audioldm2_pipeline,
        build_experts,
        experts_codecs,
        svd_pipeline,
    )

    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" and not smoke else torch.float32
    half = dtype != torch.float32
    _reset(device)
    t_start = time.perf_counter()
    weights = weights_from_config(load_config(repo_path("configs/infer.yaml"), env={}).infer)
    experts = build_experts(narrow=smoke, seed=PARITY_SEED, device=device, dtype=dtype)
    codecs = experts_codecs(experts)
    with tempfile.TemporaryDirectory(prefix="gpu_check_parity_") as tmp:
        tmp = Path(tmp)
        units = {"video": experts["svd"]["unet"], "audio": experts["audioldm2"]["unet"]}
        for name, unet in units.items():
            unet.save_config(tmp / f"{name}_unet")  # the architecture build_model reads
        overrides = [
            "model.random_init=true",
            *(f"model.{name}_unet={tmp / f'{name}_unet'}" for name in units),
            f"model.image_emb_dim={codecs.cond.image_dim}",
            f"model.text_emb_dim={codecs.cond.text_dim}",
        ]
        if smoke:  # tests/test_expert_parity.py's clip and joint width
            (h, w), fps, seconds = PARITY_SMOKE_CLIP
            overrides += [f"data.size=[{h},{w}]", f"data.fps={fps}", f"data.duration={seconds}"]
            overrides += [f"model.video_fps={fps}", "model.joint_dim=32", "model.joint_heads=2"]
        cfg = load_config(repo_path("configs/stage_a.yaml"), overrides, env={})
        (h, w), fps, seconds = frame_hw(cfg), float(cfg.data.fps), float(cfg.data.duration)
        frames = media.frame_count(seconds, fps)
        torch.manual_seed(PARITY_SEED)
        with torch.device(device):
            model = build_model(cfg)
        model.video_expert.unet.load_state_dict(units["video"].state_dict(), assign=True)
        model.audio_expert.unet.load_state_dict(units["audio"].state_dict(), assign=True)
        gen = Generator.for_model(model.to(dtype).eval(), cfg, "random experts", codecs)
        picture = np.random.default_rng(PARITY_SEED).integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = tmp / "picture.png"
        Image.fromarray(picture).save(image)
        svd, aldm = svd_pipeline(experts), audioldm2_pipeline(experts)
        for pipe in (svd, aldm):
            pipe.set_progress_bar_config(disable=True)
        build_s = time.perf_counter() - t_start

        def seeded():
            return torch.Generator(device).manual_seed(PARITY_SEED)

        def run_svd():  # SVD's defaults, spelled out: image guidance 1 -> 3, noise_aug 0.02
            return svd(
                Image.open(image),
                height=h,
                width=w,
                num_frames=frames,
                num_inference_steps=steps,
                min_guidance_scale=1.0,
                max_guidance_scale=3.0,
                fps=round(fps),
                motion_bucket_id=127,
                noise_aug_strength=0.02,
                generator=seeded(),
                output_type="latent",
            ).frames[0]

        def run_audioldm2():  # AudioLDM2's default text guidance
            with warnings.catch_warnings():  # diffusers' loop still passes past_key_values
                warnings.filterwarnings("ignore", ".*past_key_values", FutureWarning)
                return aldm(
                    PARITY_PROMPT,
                    audio_length_in_s=seconds,
                    num_inference_steps=steps,
                    guidance_scale=3.5,
                    generator=seeded(),
                    output_type="latent",
                ).audios[0]

        def run_ours(gen: Generator, iso: bool):
            req = Request(
                tmp,
                image=str(image),
                prompt=PARITY_PROMPT,
                steps=steps,
                seed=PARITY_SEED,
                weights=weights,
                iso=iso,
            )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
                video, audio, _, _ = gen.sample(req)
            return video, audio

        ref_video, svd_s = _timed(device, run_svd)
        ref_audio, audioldm2_s = _timed(device, run_audioldm2)
        errors, ours_s = {"video": {}, "audio": {}}, {}
        for mode in ("joint", "iso"):
            (video, audio), ours_s[mode] = _timed(device, run_ours, gen, mode == "iso")
            errors["video"][mode] = _rel(video, ref_video)
            errors["audio"][mode] = _rel(audio, ref_audio)

        # The yardstick: the pipelines again on the same weights cast up to float32 (exact;
        # TF32 off), against their `dtype` run: what `dtype` alone moves them by (0 in float32).
        del gen, model  # the model still holds the UNets' `dtype` tensors
        gc.collect()
        for part in (p for parts in experts.values() for p in parts.values()):
            if isinstance(part, torch.nn.Module):
                torch.nn.Module.to(part, dtype=torch.float32)
        with _full_float32():
            (video32, audio32), floor_s = _timed(device, lambda: (run_svd(), run_audioldm2()))
        floor = {"video": _rel(ref_video, video32), "audio": _rel(ref_audio, audio32)}
    peak = _peak(device)
    return {
        "size": "narrowed" if smoke else "published",
        "dtype": str(dtype).removeprefix("torch."),
        "clip": f"{frames} frames {w}x{h} (WxH) at {fps:g} fps, {seconds:g} s of 16 kHz audio",
        "steps": steps,
        "seed": PARITY_SEED,
        "guidance": "SVD image 1 -> 3, noise_aug 0.02; AudioLDM2 text 3.5; ours "
        + " ".join(f"{k}={v:g}" for k, v in dataclasses.asdict(weights).items()),
        "video_latents_rel_l2": errors["video"],
        "audio_latents_rel_l2": errors["audio"],
        "build_s": build_s,
        "svd_pipeline_s": svd_s,
        "audioldm2_pipeline_s": audioldm2_s,
        "ours_s": ours_s,
        "pipelines_in_dtype_vs_float32_rel_l2": floor,
        "float32_pipelines_s": floor_s,
        "total_s": time.perf_counter() - t_start,
        "peak_gib": None if peak is None else peak / memory.GIB,
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
    p = result["parity"]
    v, a = p["video_latents_rel_l2"], p["audio_latents_rel_l2"]
    floor = p["pipelines_in_dtype_vs_float32_rel_l2"]
    lines += [
        f"parity vs diffusers' SVD / AudioLDM2 pipelines ({p['size']} experts, {p['dtype']}, "
        f"{p['steps']} steps, {p['clip']}):",
        f"  relative L2 of the final latents: video {v['joint']:.1e} (iso {v['iso']:.1e}), "
        f"audio {a['joint']:.1e} (iso {a['iso']:.1e}); the pipelines in {p['dtype']} vs in "
        f"float32: video {floor['video']:.1e}, audio {floor['audio']:.1e}",
        f"  {p['total_s']:.1f} s (build {p['build_s']:.1f} s, SVD {p['svd_pipeline_s']:.1f} s, "
        f"AudioLDM2 {p['audioldm2_pipeline_s']:.1f} s, ours {p['ours_s']['joint']:.1f} s + iso "
        f"{p['ours_s']['iso']:.1f} s, float32 pipelines {p['float32_pipelines_s']:.1f} s), "
        f"peak {_fmt(p['peak_gib'])} GiB",
    ]
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
    p.add_argument(
        "--parity-steps",
        type=int,
        help=f"expert parity's sampling steps (default: --steps; {PARITY_SMOKE_STEPS} with "
        "--cpu-smoke: with 1 or 2, the first Euler step falls from sigma 700 to about 0, and "
        "the float32 rounding of that alone is ~5e-5)",
    )
    p.add_argument("--out", default=os.environ.get("OUT") or "outputs/gpu_check.json")
    args = p.parse_args()
    if args.parity_steps is None:
        args.parity_steps = PARITY_SMOKE_STEPS if args.cpu_smoke else args.steps
    if min(args.steps, args.parity_steps) < 1 or args.cap_gb <= 0:
        raise UserError("--steps and --parity-steps must be >= 1 and --cap-gb > 0")
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
    _reset(device)
    parity = expert_parity(args.parity_steps, device, args.cpu_smoke)
    _reset(device)
    ratios = [r["measured_over_raw_prediction"] for r in rows if r["measured_over_raw_prediction"]]
    result = {
        "device": _gpu_name() if device.type == "cuda" else "cpu (smoke run: no GPU figures)",
        "torch": torch.__version__,
        "cap_gib": args.cap_gb,
        "calibration_in_use": memory.CALIBRATION,
        "calibration_fit": statistics.median(ratios) if ratios else None,
        "train": rows,
        "sample": sample,
        "parity": parity,
    }
    print(report(result))
    out = repo_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run(main)
