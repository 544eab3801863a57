"""Benchmark one Joint Block's joint attention: time and peak memory vs token count, per lever.

    make bench                                   # CPU (or the GPU when one is visible)
    make bench ARGS="--grids 8,16,32 --dim 1024 --heads 16 --mode infer"

Each row runs a JointBlock (video T x g x g tokens + audio tokens + 17 context tokens) with
no lever, with query chunking (exact), with video KV pooling (lossy), and with both. The
header names the hardware and the SDPA kernel that actually ran. Peak memory: on CUDA the
allocator's peak over a step; on CPU each case runs in a forked child and reports the
resident-set high-water mark of one step above what was resident before it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from jointdit.cli import ArgumentParser, run
from jointdit.errors import UserError
from jointdit.model.joint_block import JointBlock

LEVERS = {
    "none": {},
    "q_chunk": {"q_chunk_v": 1024, "q_chunk_a": 1024},
    "kv_down2": {"kv_downsample": 2},
    "both": {"q_chunk_v": 1024, "q_chunk_a": 1024, "kv_downsample": 2},
}
BACKENDS = {  # --backend: let SDPA choose, or force the MATH path (scores materialised)
    "default": contextlib.nullcontext,
    "math": lambda: sdpa_kernel([SDPBackend.MATH]),
}
KERNELS = {  # aten op name -> readable SDPA backend
    "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU kernel)",
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_cudnn_attention": "cuDNN",
    "_scaled_dot_product_attention_math": "math",
}


def hardware(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    name = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores visible"


def sdpa_backend(device: str, dtype: torch.dtype, masked: bool, backend: str) -> str:
    """Which kernel scaled_dot_product_attention runs for joint-attention-like inputs."""
    from torch.profiler import profile

    q = torch.randn(1, 4, 256, 64, device=device, dtype=dtype)
    mask = torch.ones(1, 1, 1, 256, dtype=torch.bool, device=device) if masked else None
    with profile() as prof, BACKENDS[backend]():
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    names = {e.key.removeprefix("aten::") for e in prof.key_averages()}
    found = [label for op, label in KERNELS.items() if op in names]
    return found[0] if found else "unknown"


def measure(args, grid: int, levers: dict, device: str, dtype: torch.dtype) -> str:
    """Median seconds and peak MiB of one block forward (+ backward in train mode)."""
    torch.manual_seed(0)
    block = JointBlock(args.channels, args.channels, args.dim, args.heads, 64).to(device, dtype)
    b, t = args.batch, args.frames
    video = torch.randn(b * t, args.channels, grid, grid, device=device, dtype=dtype)
    audio = torch.randn(b, args.channels, args.audio_t, args.audio_f, device=device, dtype=dtype)
    emb = torch.randn(b, 64, device=device, dtype=dtype)
    ctx = torch.randn(b, 17, args.dim, device=device, dtype=dtype)
    ctx_mask = torch.ones(b, 17, dtype=torch.bool, device=device)
    train = args.mode == "train"
    if train:
        video.requires_grad_()

    def step():
        with torch.set_grad_enabled(train), BACKENDS[args.backend]():
            out_v, out_a = block(
                video, audio, emb, emb, ctx, ctx_mask, t, 7.0, args.audio_t / 25.0,
                q_chunk_v=levers.get("q_chunk_v", 0), q_chunk_a=levers.get("q_chunk_a", 0),
                kv_downsample=levers.get("kv_downsample", 1),
            )  # fmt: skip
            if train:
                (out_v.float().square().mean() + out_a.float().square().mean()).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident-set high-water mark (VmHWM)
        base = _proc_status("VmRSS")
        step()
        peak = _proc_status("VmHWM") - base
    return f"{statistics.median(times):9.3f} {max(peak, 0) / 2**20:9.1f}"


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _return_freed_memory() -> None:
    """Serve every allocation over 64 KiB with mmap, so freed tensors leave the resident
    set at once and the high-water mark measures this step, not glibc's cache."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD


def in_child(device: str, fn, *args) -> str:
    """On CPU, run fn in a forked child (its own resident-set peak; no OpenMP state shared
    with the parent, which never runs a torch op itself). Returns fn's result as text."""
    if device == "cuda":
        return str(fn(*args))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        _return_freed_memory()
        try:
            os.write(write, str(fn(*args)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return text or "failed"


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mode", default="train", choices=["train", "infer"])
    p.add_argument("--backend", default="default", choices=list(BACKENDS))
    p.add_argument("--grids", default="8,16,24", help="video latent side per frame, e.g. 8,16,32")
    p.add_argument("--frames", type=int, default=14)
    p.add_argument("--audio-t", type=int, default=50, help="audio latent frames (2 s = 50)")
    p.add_argument("--audio-f", type=int, default=16)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--channels", type=int, default=64, help="expert channels entering the block")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--config", default=None, help="not used: make bench takes no config")
    args = p.parse_args(argv)
    if args.config:
        raise UserError(
            f"CFG={args.config}: make bench takes no config; its sizes are arguments "
            '(ARGS="--grids 8,16 --dim 1024 --heads 16 ...", see --help)'
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu")
    try:
        grids = [int(g) for g in args.grids.split(",")]
    except ValueError:
        grids = []
    if not grids or min(grids) < 1:
        raise UserError(f"--grids {args.grids!r}: expected comma-separated integers >= 1")
    small = [
        n
        for n in ("frames", "audio_t", "audio_f", "dim", "heads", "channels", "batch", "repeats")
        if getattr(args, n) < 1
    ]
    if small:
        raise UserError(f"--{small[0].replace('_', '-')} {getattr(args, small[0])}: must be >= 1")
    if args.dim % args.heads:
        raise UserError(f"--dim {args.dim} must be a multiple of --heads {args.heads}")
    dtype = getattr(torch, args.dtype)
    dev = args.device
    print(f"hardware: {hardware(dev)}; torch {torch.__version__}; {args.dtype}; mode {args.mode}")
    plain = in_child(dev, sdpa_backend, dev, dtype, False, args.backend)
    masked = in_child(dev, sdpa_backend, dev, dtype, True, args.backend)
    print(f"SDPA backend: {plain} without mask, {masked} with a key mask (iso rows, padded text)")
    print(
        f"joint block: dim {args.dim}, {args.heads} heads, batch {args.batch}, {args.frames} frames"
    )
    print(f"{'video+audio tokens':>20} {'lever':>9} {'time s':>9} {'peak MiB':>9}")
    for grid in grids:
        tokens = f"{args.frames * grid * grid}+{args.audio_t * args.audio_f}"
        for name, levers in LEVERS.items():
            result = in_child(dev, measure, args, grid, levers, dev, dtype)
            print(f"{tokens:>20} {name:>9} {result}", flush=True)
    return 0


if __name__ == "__main__":
    run(main)
