"""Benchmark: a fresh JointDiT against the experts' own diffusers pipelines (`make bench-parity`).

    PYTHONPATH=. .venv/bin/python scripts/bench_parity.py        # 6 min on 2 shared cores (4 of them
                                                                 # the published-size VAE timing)
    PYTHONPATH=. .venv/bin/python scripts/bench_parity.py --steps 4 --seeds 1 --no-published-vae

Tiny random-weight SVD and AudioLDM2 (jointdit/random_experts.py: the published configs,
narrowed), saved in the `make fetch-models` layout in a temporary folder and loaded by the real
loaders on both sides (configs/stage_a.yaml with the overrides of tests/test_expert_parity.py).
Prints plain-text tables, every figure measured in this run:

  parity       relative L2, per step count and seed, joint and iso (the experts' defaults:
               image guidance 1 -> 3 across the frames, text guidance 3.5): final video latents
               and decoded frames vs `StableVideoDiffusionPipeline`, final audio latents and
               waveform vs `AudioLDM2Pipeline` (the same steps and seed)
  sampler      the data variance the audio sampler keeps with the exact denoiser on Gaussian
               data (no network) vs diffusers' DDIM with AudioLDM2's scheduler config, at 25 /
               50 / 200 steps; the last sigma the video sampler evaluates
  preprocess   `svd_resize` vs diffusers' `_resize_with_antialiasing` (a picture -> 224x224)
  decode       a chunked decode (8 frames of 14, the tiny VAE at 64x96) vs the whole clip
  first frame  CPU seconds to encode a 14-frame clip vs 4 extra single first-frame encodes
               (cache.first_frame_draws) with the SVD VAE at its published size (random
               weights, 320x576, float32); --no-published-vae skips it
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from jointdit.cli import ArgumentParser, run  # noqa: E402
from jointdit.errors import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
H, W, FPS, SECONDS = 64, 96, 7, 1.0  # tests/test_expert_parity.py's clip: 7 frames, 25 audio
FRAMES = round(FPS * SECONDS)
PROMPT = "a dog barks"
AUDIO_GUIDANCE = 3.5  # AudioLDM2Pipeline's default guidance_scale


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


def hardware() -> str:
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(x for x in f if x.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{name}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores visible, "
        f"load average {load:.1f}; torch {torch.__version__}; float32 CPU"
    )


# --- parity ------------------------------------------------------------------------------


def build_world(root: Path):
    """Tiny experts under `root`, a fresh JointDiT Generator on them and a picture."""
    from jointdit.config import load_config
    from jointdit.model import build_model
    from jointdit.pipeline import Generator
    from jointdit.random_experts import config_overrides, write_experts

    write_experts(root)
    cfg = load_config(
        REPO / "configs" / "stage_a.yaml",
        [
            *config_overrides(root),
            "model.joint_dim=32",
            "model.joint_heads=2",
            f"model.video_fps={FPS}",
            f"data.size=[{H},{W}]",
            f"data.fps={FPS}",
            f"data.duration={SECONDS}",
            "memory.precision=no",
        ],
        env={},
    )
    torch.manual_seed(0)
    gen = Generator.for_model(build_model(cfg).eval(), cfg)
    picture = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    image = root / "picture.png"
    Image.fromarray(picture).save(image)
    return gen, image


@torch.no_grad()
def svd_reference(pipe, image: Path, steps: int, seed: int):
    latents = pipe(
        Image.open(image),
        height=H,
        width=W,
        num_frames=FRAMES,
        num_inference_steps=steps,
        fps=FPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    ).frames
    frames = pipe.decode_latents(latents, FRAMES, decode_chunk_size=FRAMES)
    return latents[0], frames[0].transpose(0, 1).clamp(-1, 1)


@torch.no_grad()
def audioldm2_reference(pipe, steps: int, seed: int):
    latents = pipe(
        PROMPT,
        audio_length_in_s=SECONDS,
        num_inference_steps=steps,
        guidance_scale=AUDIO_GUIDANCE,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    ).audios
    mel = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    wave = pipe.mel_spectrogram_to_waveform(mel)[:, : round(SECONDS * 16000)]
    return latents[0], wave[0]


@torch.no_grad()
def ours(gen, image: Path, out: Path, steps: int, seed: int, iso: bool):
    from jointdit.diffusion import GuidanceWeights
    from jointdit.pipeline import Request

    # The experts' defaults as JointCFG weights (configs/infer.yaml); wv / wa vanish at init.
    weights = GuidanceWeights(wv=1.5, wa=1.5, wi=2.0, wi_first=0.0, wt=AUDIO_GUIDANCE - 1, wnt=0.0)
    req = Request(
        out, image=str(image), prompt=PROMPT, steps=steps, seed=seed, weights=weights, iso=iso
    )
    t0 = time.perf_counter()
    video, audio, info, _ = gen.sample(req)
    frames, wave = gen.decode(video, audio, info)
    return video, audio, frames, wave, time.perf_counter() - t0


def parity(args, gen, image: Path, root: Path) -> None:
    from diffusers.utils import logging as diffusers_logging

    from jointdit.random_experts import audioldm2_pipeline, svd_pipeline

    diffusers_logging.disable_progress_bar()
    svd, aldm = svd_pipeline(root), audioldm2_pipeline(root)
    svd.set_progress_bar_config(disable=True)
    aldm.set_progress_bar_config(disable=True)
    print(
        f"\nparity: relative L2 vs the pipelines ({FRAMES} frames {H}x{W}, "
        f"{round(SECONDS * 25)} audio latent frames, prompt {PROMPT!r}, float32)"
    )
    head = ("steps", "seed", "mode", "video lat", "frames", "audio lat", "wave", "ours s")
    print(f"{head[0]:>5} {head[1]:>4} {head[2]:>5}" + "".join(f" {h:>10}" for h in head[3:]))
    worst = 0.0
    for steps in args.steps:
        for seed in args.seeds:
            ref_v = svd_reference(svd, image, steps, seed)
            ref_a = audioldm2_reference(aldm, steps, seed)
            for iso in (False, True):
                video, audio, frames, wave, secs = ours(gen, image, root, steps, seed, iso)
                errs = (
                    rel(video, ref_v[0]),
                    rel(frames, ref_v[1]),
                    rel(audio, ref_a[0]),
                    rel(wave, ref_a[1]),
                )
                worst = max(worst, *errs)
                mode = "iso" if iso else "joint"
                cells = "".join(f" {e:10.2e}" for e in errs)
                print(f"{steps:>5} {seed:>4} {mode:>5}{cells} {secs:10.1f}", flush=True)
    print(f"worst relative L2: {worst:.2e} (the parity test's bar: 1e-4)")


# --- sampler -----------------------------------------------------------------------------


class GaussianDenoiser(torch.nn.Module):
    """The exact audio denoiser for Gaussian data x0 ~ N(0, diag(std^2)); the video's is 0
    (tests/test_diffusion.py)."""

    def __init__(self, alphas_cumprod, std):
        super().__init__()
        self.ab, self.std = alphas_cumprod.double(), std.double()

    def eps(self, x, index):
        ab = self.ab[index].reshape(-1, *[1] * (x.dim() - 1))
        x0 = ab.sqrt() * self.std**2 / (ab * self.std**2 + 1 - ab) * x  # E[x0 | x]
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    def forward(self, video, audio, audio_timestep, **_):
        return torch.zeros_like(video), self.eps(audio, audio_timestep)


def sampler() -> None:
    from diffusers import DDIMScheduler

    from jointdit.config import load_config
    from jointdit.diffusion import GuidanceWeights, JointDiffusion
    from jointdit.model.sizes import AUDIOLDM2_REPO

    diff = JointDiffusion(load_config().diffusion)
    frames = 256  # samples per channel; one data std per channel, from 0.02 to 3
    std = torch.logspace(-1.7, 0.48, 8, dtype=torch.float64).reshape(8, 1, 1)
    model = GaussianDenoiser(diff.time.alphas_cumprod, std)
    g = torch.Generator().manual_seed(0)
    cond = {
        "first_frame": torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64),
        "image_emb": torch.randn(1, 32, generator=g, dtype=torch.float64),
        "text_emb": torch.randn(1, 16, 32, generator=g, dtype=torch.float64),
        "text_mask": torch.ones(1, 16, dtype=torch.long),
    }
    kept = lambda x: x.pow(2).mean((0, 2, 3)) / std.flatten() ** 2  # noqa: E731
    total = lambda x: float(x.pow(2).mean() / (std**2).mean())  # noqa: E731
    print(
        "\naudio sampler, exact denoiser on Gaussian data (8 channels, std 0.02 to 3, "
        f"{frames} x 16 samples each): the data variance kept, ours vs diffusers' DDIM"
    )
    print("  total: of the summed variance; per component: the mean over the 8 channels' fractions")
    head = ("total ours", "total DDIM", "per comp. ours", "per comp. DDIM", "max |ours/DDIM - 1|")
    print(f"{'steps':>5}" + "".join(f" {h:>{max(len(h), 10)}}" for h in head))
    for steps in (25, 50, 200):
        gens = (torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
        _, x = diff.sample(model, cond, 2, frames, steps, GuidanceWeights(), gens)
        ddim = DDIMScheduler.from_pretrained(AUDIOLDM2_REPO / "scheduler")
        ddim.set_timesteps(steps)
        ref = torch.empty_like(x).normal_(generator=torch.Generator().manual_seed(1))
        for t in ddim.timesteps:
            ref = ddim.step(model.eps(ref, t.reshape(1)), t, ref).prev_sample
        ratio = float((kept(x) / kept(ref) - 1).abs().max())
        cells = (total(x), total(ref), float(kept(x).mean()), float(kept(ref).mean()))
        print(f"{steps:>5}" + "".join(f" {c:>10.1%}" for c in cells) + f" {ratio:>19.1e}")
    for steps in (25, 30):
        t_video = diff.time.ladders(steps)[0]
        last = float(diff.time.video_sigma(t_video[-1]))
        print(f"video sampler at {steps} steps: last sigma evaluated {last:.4g} (then Euler to 0)")


# --- preprocessing and decode -----------------------------------------------------------


def preprocess() -> None:
    import torch.nn.functional as F
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        _resize_with_antialiasing,
    )

    from jointdit.codecs.conditions import svd_resize

    g = torch.Generator().manual_seed(0)
    print("\nCLIP resize: svd_resize vs diffusers' _resize_with_antialiasing, -> 224x224")
    print(f"{'picture':>28} {'relative L2':>12}")
    for h, w in ((320, 576), (480, 640)):
        noise = torch.rand(1, 3, h, w, generator=g) * 2 - 1
        smooth = F.interpolate(
            torch.rand(1, 3, h // 16, w // 16, generator=g) * 2 - 1,
            size=(h, w),
            mode="bicubic",
            align_corners=False,
        ).clamp(-1, 1)
        for name, x in ((f"{h}x{w} uniform noise", noise), (f"{h}x{w} smooth", smooth)):
            d = rel(svd_resize(x, (224, 224)), _resize_with_antialiasing(x, (224, 224)))
            print(f"{name:>28} {d:12.2e}")


@torch.no_grad()
def decode(root: Path) -> None:
    from jointdit.codecs.video import VideoCodec

    codec = VideoCodec.from_pretrained(root / "svd" / "vae")
    z = torch.randn(14, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(0))
    whole = codec.decode(z, chunk=14)
    default = codec.decode(z)
    chunked = codec.decode(z, chunk=8)
    print(f"\nvideo decode, tiny SVD VAE, 14 frames {H}x{W}, random latents: relative L2 vs whole")
    print(f"  default (decode_chunk {codec.decode_chunk}): {rel(default, whole):.2e}")
    print(
        f"  chunks of 8: {rel(chunked, whole):.3f} overall, "
        f"{rel(chunked[7:9], whole[7:9]):.3f} at the seam frames 7/8"
    )


@torch.no_grad()
def first_frame_cost(repeats: int) -> None:
    from diffusers import AutoencoderKLTemporalDecoder

    from jointdit.codecs.video import VideoCodec
    from jointdit.model.sizes import SVD_REPO

    folder = SVD_REPO / "vae"
    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder.from_config(AutoencoderKLTemporalDecoder.load_config(folder))
    codec = VideoCodec(vae.eval())
    frames = torch.rand(14, 3, 320, 576, generator=torch.Generator().manual_seed(0)) * 2 - 1
    draws = 4  # jointdit/defaults/cache.yaml first_frame_draws
    clip_s, first_s = [], []
    g = torch.Generator().manual_seed(0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        codec.encode(frames)
        clip_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(draws):
            codec.encode_first_frame(frames[0], 0.02, g)
        first_s.append(time.perf_counter() - t0)
    clip, first = statistics.median(clip_s), statistics.median(first_s)
    print(
        f"\nfirst-frame draws, SVD VAE at its published size (random weights), 320x576 float32, "
        f"{torch.get_num_threads()} torch threads, median of {repeats}:"
    )
    print(f"  encode 14 frames (the clip): {clip:.1f} s")
    print(
        f"  {draws} single first-frame encodes (pixel noise 0.02): {first:.1f} s, "
        f"{first / clip:.0%} on top of the clip's encode"
    )


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="4,25", help="sampling steps, comma-separated")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per step count")
    p.add_argument(
        "--published-vae",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the first-frame draws with the published-size VAE (default: on)",
    )
    p.add_argument("--repeats", type=int, default=1, help="repetitions of that timing")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the tiny models (default 1: on a busy CPU, more threads on "
        "tensors this small mostly wait for each other); the published-size VAE uses all cores",
    )
    args = p.parse_args(argv)
    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise UserError(f"--steps {args.steps!r}: expected comma-separated integers >= 1")
    args.steps = steps
    if min(args.seeds, args.repeats, args.threads) < 1:
        raise UserError("--seeds, --repeats and --threads must be >= 1")
    args.seeds = list(range(args.seeds))

    cores = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    print(f"hardware: {hardware()}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gen, image = build_world(root)
        parity(args, gen, image, root)
        sampler()
        preprocess()
        decode(root)
    if args.published_vae:
        torch.set_num_threads(cores)
        first_frame_cost(args.repeats)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    run(main)
