"""Memory levers, the peak-memory predictor and the planner that picks levers for a GPU budget.

The levers (DESIGN section 4; `jointdit/defaults/memory.yaml`, env knobs `JOINTDIT_*`), by kind:
- exact: frozen parameters in the compute dtype (`memory.frozen_lowp`), the EMA on CPU
  (`memory.ema_on_cpu`), gradient checkpointing, query chunking, AdamW's state and update on CPU
  (`memory.optim_on_cpu`), the optimizer step fused into backward (`memory.fused_step`; needs
  `train.grad_accum=1` and `train.max_grad_norm=0`, which the planner sets on that rung);
- approximation: 8-bit AdamW states (`memory.optim_8bit`);
- other method: LoRA adapters on the unfrozen expert parts instead of training them
  (`train.lora_rank`);
- lossy: KV downsampling and fewer frames.

Prediction runs one optimizer step of `train.py` on the `meta` device (no memory, no GPU):
fp32 weights under CUDA's autocast casts, `min(grad_accum, 2)` micro-batches of forward and
backward, clipping, the optimizer step and the EMA update, with the optimizer state and EMA
alive from the start (`simulate_step`). A dispatch mode follows every storage from allocation
to release and records the peak, so weights, gradients, optimizer state, activations saved for
backward, autocast's weight copies, checkpoint recomputation and transient workspaces are all
counted as the code allocates them; torch's MemTracker follows the same step as the check
(`tracker_check`, `make bench-planner`). Work the state levers move to the host is not run and
is counted per parameter (`state_bytes`). Assumptions, checked by `make gpu-check`
(docs/memory.md): attention runs a fused kernel (what CUDA's scaled_dot_product_attention picks
for these shapes), and `CALIBRATION` scales the result to `torch.cuda.max_memory_allocated`.

Plans are for a `Target`: the engine (single, ddp, fsdp), the process count and the
machine's host RAM; `lever_refusal` is the one table of levers an engine or a process count
refuses, which the ladder walks by and `train.py` checks with (`check_levers`).

The planner walks a fixed ladder, exact levers first, then approximations, other methods and
lossy levers, and takes the first rung that fits; so a larger budget can never pick a lossier
rung. State levers the training code does not know yet (absent from the config schema) are
left off by the wrapper, which must not start a run its training cannot honour.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from tqdm import tqdm

from jointdit.config import KNOBS, REPO_ROOT, frame_hw
from jointdit.engine import shard_units
from jointdit.errors import UserError
from jointdit.optim import EMA, LeverAdamW, fuse_step_into_backward, store_frozen_lowp

GIB = 2**30

# Measured peak / predicted peak. 1.0 = uncalibrated: no GPU run has fitted it yet
# (`make gpu-check` measures it; docs/memory.md says where to write the number).
CALIBRATION = 1.0
# Memory a CUDA context takes before the first tensor (not in max_memory_allocated).
CUDA_CONTEXT_BYTES = GIB // 2
# Allocator fragmentation and cuDNN/cuBLAS workspaces: plan against this share of free memory.
USABLE_FRACTION = 0.95

# CLIP's context length: captions are padded to it.
TEXT_TOKENS = 77
# AudioLDM2's prompt encoding: GPT-2 generates 8 tokens; FLAN-T5 states are padded to the 128
# tokens its tokenizer truncates to.
AUDIO_PROMPT_TOKENS = 8
AUDIO_PROMPT_STATES = 128

# Activation levers, set in the child through their JOINTDIT_* env knobs.
PLANNED = ("grad_ckpt", "q_chunk_v", "q_chunk_a", "kv_downsample", "max_t")
ENV_OF = {k.key.split(".", 1)[1]: k.env for k in KNOBS if k.key.startswith("memory.")}
# State levers (memory.*) and the LoRA rank (train.lora_rank), set through config overrides.
# Until the training code has a key in its schema, it reads as off and the wrapper keeps it off.
STATE = ("frozen_lowp", "ema_on_cpu", "optim_on_cpu", "fused_step", "optim_8bit")
LEVERS = (*PLANNED, *STATE, "lora_rank")
SECTION_OF = {**{k: "memory" for k in (*PLANNED, *STATE)}, "lora_rank": "train"}

# The ladder's moves, in the order they are turned. Exact levers first.
Q_CHUNKS = (1024, 256, 64, 32)
KV_FACTORS = (2, 4, 8)
MAX_TS = (16, 12, 8, 6, 4, 2)
LORA_RANK = 64
KINDS = ("exact", "approximation", "other method", "lossy")  # in ladder order


def _moves(frames: int, trains_experts: bool = True) -> list[dict]:
    # State first: at the real size it is most of the memory, and with a fused attention kernel
    # query chunks lower a training step's peak little (docs/memory.md), at a cost in speed.
    moves: list[dict] = [{"frozen_lowp": True}, {"ema_on_cpu": True}, {"grad_ckpt": True}]
    moves += [{"optim_on_cpu": True}, {"fused_step": True}]
    moves += [{"q_chunk_v": c, "q_chunk_a": c} for c in Q_CHUNKS]
    moves += [{"optim_8bit": True}]
    if trains_experts:  # LoRA replaces full training of the unfrozen expert parts
        moves += [{"lora_rank": LORA_RANK}]
    moves += [{"kv_downsample": f} for f in KV_FACTORS]
    moves += [{"max_t": t} for t in MAX_TS if t < frames]
    return moves


def _tighter(key: str, new, old) -> bool:
    """True when `new` saves more memory than `old` for lever `key` (0 = off for chunks/max_t)."""
    if isinstance(new, bool):
        return new and not bool(old)
    if key == "kv_downsample":
        return new > old
    return new > 0 and (old == 0 or new < old)  # q_chunk_*, max_t, lora_rank


def is_lossy(levers: Mapping, frames: int) -> bool:
    """KV downsampling and fewer frames than the clip has change what the model sees."""
    return levers["kv_downsample"] > 1 or 0 < levers["max_t"] < frames


def lever_kind(levers: Mapping, frames: int) -> str:
    """exact | approximation | other method | lossy: the least faithful lever on the rung."""
    if is_lossy(levers, frames):
        return "lossy"
    if levers.get("lora_rank", 0) > 0:
        return "other method"
    if levers.get("optim_8bit"):
        return "approximation"
    return "exact"


# Every lever off.
OFF = {
    "max_t": 0,
    "q_chunk_v": 0,
    "q_chunk_a": 0,
    "kv_downsample": 1,
    "grad_ckpt": False,
    **{k: False for k in STATE},
    "lora_rank": 0,
}


def base_levers(cfg: DictConfig) -> dict:
    """All levers off, precision as the config says."""
    return {**OFF, "precision": cfg.memory.precision}


def config_levers(cfg: DictConfig) -> dict:
    """The levers as the config sets them (a state lever missing from the schema reads off)."""
    out = base_levers(cfg)
    for key in LEVERS:
        out[key] = cfg[SECTION_OF[key]].get(key, out[key])
    return out


def known_levers(cfg: DictConfig) -> set[str]:
    """Levers the training code reads: those with a key in the config schema."""
    return {k for k in LEVERS if k in cfg[SECTION_OF[k]]}


def trains_experts(cfg: DictConfig) -> bool:
    """Whether the config trains expert parts (`train.unfreeze`): what LoRA would adapt."""
    return cfg.train.freeze_experts and bool(list(cfg.train.unfreeze))


def ladder(
    cfg: DictConfig, user_levers: Mapping | None = None, target: Target | None = None
) -> list[dict]:
    """The rungs, least lossy first; levers in `user_levers` stay as given on every rung, and
    a lever the target's engine and process count refuse (`lever_refusal`) is never turned."""
    user = dict(user_levers or {})
    target = target or Target()
    frames = clip_frames(cfg)
    rung = {**base_levers(cfg), **user}
    rungs = [dict(rung)]
    for move in _moves(frames, trains_experts(cfg)):
        move = {k: v for k, v in move.items() if k not in user}
        if any(target.refusal(k) for k in move):
            continue
        if move.get("optim_8bit") and rung["optim_on_cpu"]:
            continue  # AdamW's state is already off the GPU: 8 bits would save none of it
        if any(_tighter(k, v, rung[k]) for k, v in move.items()):
            rung.update({k: v for k, v in move.items() if _tighter(k, v, rung[k])})
            rungs.append(dict(rung))
    return rungs


def lever_overrides(levers: Mapping) -> list[str]:
    """Config overrides that put the state levers on (and what fused_step needs)."""
    out = [f"memory.{k}=true" for k in STATE if levers.get(k)]
    if levers.get("fused_step"):
        out += ["train.grad_accum=1", "train.max_grad_norm=0"]
    if levers.get("lora_rank", 0) > 0:
        out += [f"train.lora_rank={int(levers['lora_rank'])}"]
    return out


def _describe(change: Mapping) -> str:
    words = [f"{ENV_OF[k]}={int(v)}" for k, v in change.items() if k in PLANNED]
    return " ".join(words + lever_overrides(change))


def next_knob(levers: Mapping, frames: int | None = None, known: set[str] | None = None) -> str:
    """What to turn after an out-of-memory error at `levers`: env variables / overrides.
    Only levers in `known` (default: all) are suggested."""
    frames = 1 << 30 if frames is None else frames
    for move in _moves(frames):
        if known is not None and not set(move) <= known:
            continue
        change = {k: v for k, v in move.items() if _tighter(k, v, levers.get(k))}
        if change.get("optim_8bit") and levers.get("optim_on_cpu"):
            continue
        if change:
            kind = lever_kind({**OFF, **change}, frames)
            return f"set {_describe(change)} ({kind}; FORCE_KEEP_USER_ENVS=1 keeps env knobs)"
    return (
        "every memory lever is at its tightest: lower train.batch_size (raise train.grad_accum "
        "to keep the effective batch) or train on more GPUs (NUM_GPUS=n)"
    )


# ---------------------------------------------------------------------------------------------
# engines: which levers go with which engine and process count (train.py refuses the same)

# "single": one process; "ddp": data parallel (every process holds the whole model); "fsdp":
# torch's FSDP2 (parameters, gradients, optimizer state and EMA sharded across processes;
# jointdit/engine.py). The training code runs no other engine.
ENGINES = ("single", "ddp", "fsdp")
# The repo's own optimizer and EMA levers (jointdit/optim.py): they assume every process holds
# whole parameters and gradients.
_OWN_STATE_LEVERS = ("ema_on_cpu", "optim_on_cpu", "fused_step", "optim_8bit")


def lever_refusal(lever: str, engine: str, num_processes: int) -> str | None:
    """Why `lever` cannot run under `engine` with `num_processes` processes, or None. The one
    table the planner walks by and the training code checks with."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    key = f"{SECTION_OF.get(lever, 'memory')}.{lever}"
    if lever in _OWN_STATE_LEVERS and engine == "fsdp":
        return (
            f"{key} is this repo's own state lever (whole parameters on every process); "
            f"under {engine} use its offload settings instead"
        )
    if lever == "frozen_lowp" and engine == "fsdp":
        return (
            f"{key}: FSDP2 needs one parameter dtype per sharded unit (its mixed precision "
            "already gathers weights in the compute dtype)"
        )
    if lever == "fused_step" and num_processes > 1:
        return (
            f"{key} (JOINTDIT_FUSED_STEP) steps parameters before data parallel averages their "
            f"gradients; it runs on one process only (got {num_processes})"
        )
    return None


def check_levers(memory_cfg: Mapping, engine: str, num_processes: int) -> None:
    """Stop with one line when a memory lever the config turns on is refused (`lever_refusal`)."""
    for lever in (*PLANNED, *STATE):
        if memory_cfg.get(lever, OFF[lever]) != OFF[lever]:
            refusal = lever_refusal(lever, engine, num_processes)
            if refusal:
                raise UserError(refusal)


def engine_of(distributed_type: str, num_processes: int) -> str:
    """The engine of an accelerate config's `distributed_type`; one line for one the training
    code does not run (jointdit/engine.py refuses the same)."""
    kind = str(distributed_type).upper()
    if kind == "FSDP":
        return "fsdp"
    if kind in ("NO", "MULTI_GPU", "MULTI_CPU"):
        return "ddp" if num_processes > 1 else "single"
    raise UserError(
        f"the accelerate config's distributed_type is {distributed_type}, which the training "
        "code does not run; use configs/accelerate/ddp.yaml or fsdp.yaml"
    )


def machine_ram() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Target:
    """What a plan is for: the engine, the processes on the machine (one GPU each), and the
    machine's host RAM in bytes (0: not checked)."""

    engine: str = "single"
    num_processes: int = 1
    host_bytes: int = 0

    def refusal(self, lever: str) -> str | None:
        return lever_refusal(lever, self.engine, self.num_processes)

    def describe(self) -> str:
        host = f", host RAM {self.host_bytes / GIB:.0f} GiB" if self.host_bytes else ""
        return f"engine {self.engine}, {self.num_processes} process(es){host}"


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
    h, w = (n // 8 for n in frame_hw(cfg))  # the SVD VAE's spatial factor
    mel_frames = round(frames / cfg.data.fps * cfg.data.sample_rate / 160)  # AudioLDM2 hop
    m = cfg.model
    shapes = {
        "video": (batch_size, frames, 4, h, w),
        "audio": (batch_size, 8, mel_frames // 4, 16),
        "first_frame": (batch_size, 4, h, w),
        "image_emb": (batch_size, m.image_emb_dim),
        "text_emb": (batch_size, TEXT_TOKENS, m.text_emb_dim),
        "text_mask": (batch_size, TEXT_TOKENS),
    }
    from jointdit.model import audio_prompt_widths

    widths = audio_prompt_widths(cfg)
    if widths is not None:
        for prefix in ("", "null_"):
            shapes[f"{prefix}audio_cond"] = (batch_size, AUDIO_PROMPT_TOKENS, widths[0])
            shapes[f"{prefix}audio_cond_1"] = (batch_size, AUDIO_PROMPT_STATES, widths[1])
            shapes[f"{prefix}audio_cond_1_mask"] = (batch_size, AUDIO_PROMPT_STATES)
    return shapes


# ---------------------------------------------------------------------------------------------
# prediction


# The simulated step runs on the `meta` device (shapes and dtypes, no memory, C++ kernels). On
# a GPU the step runs under autocast, which torch implements per device; meta has none, so
# `_cuda_autocast` applies CUDA's policy to the functions the model calls.

# Ops CUDA autocast runs in the compute dtype (its "lower precision" list) and in fp32 (its
# "float32" list: norms run in fp32 and return fp32 activations, as on the GPU).
_LOWP_FUNCTIONS = (
    (F, ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
         "conv_transpose3d", "scaled_dot_product_attention")),
    (torch, ("matmul", "bmm", "baddbmm", "addmm", "mm")),
    (torch.Tensor, ("__matmul__",)),
)  # fmt: skip
_FP32_FUNCTIONS = ((F, ("group_norm", "layer_norm", "softmax", "log_softmax")),)


class _Autocast:
    """CUDA autocast's casts for meta tensors, as torch's own autocast makes them: floating
    inputs of a compute-dtype op are cast to the compute dtype, those of an fp32 op to fp32;
    the compute-dtype cast of a trainable fp32 leaf (a weight) is cached until the forward
    pass ends (torch's autocast cache); a frozen weight is cast on every call (autograd keeps
    the cast where backward needs it)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.cache: dict[int, torch.Tensor] = {}
        self.caching = False

    def _low(self, t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == self.dtype:
            return t
        cacheable = self.caching and t.is_leaf and t.requires_grad and t.dtype == torch.float32
        if not cacheable:
            return t.to(self.dtype)
        if id(t) not in self.cache:
            self.cache[id(t)] = t.to(self.dtype)
        return self.cache[id(t)]

    @staticmethod
    def _fp32(t):
        low = isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16)
        return t.float() if low else t

    def wrap(self, fn, cast):
        def cast_call(*args, **kwargs):
            args = [cast(a) for a in args]
            return fn(*args, **{k: cast(v) for k, v in kwargs.items()})

        return cast_call

    @contextmanager
    def forward(self) -> Iterator[None]:
        """One autocast region: the weight cache lives until it ends."""
        self.caching = True
        try:
            yield
        finally:
            self.caching = False
            self.cache.clear()


@contextmanager
def _cuda_autocast(precision: str) -> Iterator[_Autocast | None]:
    """Patch the model's compute functions with CUDA autocast's casts for a simulated step
    (forward and backward: checkpoint recomputation runs under autocast too, as on the GPU);
    yields the `_Autocast` whose `forward()` marks an autocast region, None without mixed
    precision."""
    if precision not in ("bf16", "fp16"):
        yield None
        return
    amp = _Autocast(torch.bfloat16 if precision == "bf16" else torch.float16)
    saved = []
    for groups, cast in ((_LOWP_FUNCTIONS, amp._low), (_FP32_FUNCTIONS, amp._fp32)):
        for owner, names in groups:
            for name in names:
                saved.append((owner, name, getattr(owner, name)))
                setattr(owner, name, amp.wrap(getattr(owner, name), cast))
    try:
        yield amp
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


class _NoValues(TorchDispatchMode):
    """Meta tensors hold no values: `.item()` reads a harmless one (a float 1: AdamW's step
    count in its bias correction; logged losses) or zero (an int; False for a bool guard).
    Every op runs its C++ meta kernel (~10x faster than torch's Python meta registrations)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            dtype = args[0].dtype
            return 1.0 if dtype.is_floating_point else (False if dtype == torch.bool else 0)
        with torch._C._DisablePythonDispatcher():
            return func(*args, **(kwargs or {}))


class _Counter(TorchDispatchMode):
    """Bytes alive, storage by storage from allocation to release, and their peak. Tensors
    alive before the step (`hold`) are counted once by their storage, so a view of a weight
    (F.linear's transpose) adds nothing."""

    def __init__(self, hold: Iterator[torch.Tensor]) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0
        for t in hold:
            self._track(t)

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

    def device_peak(self) -> int:
        return self.peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
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
    for key, value in levers.items():
        out[SECTION_OF.get(key, "memory")][key] = value
    if levers.get("fused_step"):  # what the planner sets with it (lever_overrides)
        out.train.grad_accum, out.train.max_grad_norm = 1, 0
    if "random_init" in out.model:
        out.model.random_init = True  # the architecture is enough; never read weights here
    OmegaConf.set_struct(out, True)
    return out


def build_for_prediction(cfg: DictConfig, levers: Mapping) -> tuple[nn.Module, DictConfig]:
    """The model `train.py` trains, on meta, with `levers` applied: LoRA adapters where
    `lora_rank` says, the stage's parameters frozen, frozen Linear/Conv weights in the compute
    dtype with `frozen_lowp`; also the config with the levers set."""
    from jointdit.model import build_model
    from jointdit.model.lora import apply_lora

    run_cfg = _with_levers(cfg, levers)
    tc = run_cfg.train
    with init_empty_weights():  # parameters straight to meta; small buffers stay real
        model = build_model(run_cfg)
        if tc.lora_rank > 0:
            apply_lora(model, list(tc.unfreeze), tc.lora_rank, tc.lora_alpha)
    model.to("meta")
    model.set_memory(**{k: levers[k] for k in PLANNED})
    if tc.freeze_experts:  # as train.py freezes
        if tc.lora_rank > 0:
            model.freeze_experts([])
            for n, p in model.named_parameters():
                p.requires_grad_(p.requires_grad or ".lora_" in n)
        else:
            model.freeze_experts(list(tc.unfreeze))
    if levers["frozen_lowp"]:
        store_frozen_lowp(model, levers["precision"])
    return model, run_cfg


def _state_bytes(model: nn.Module, levers: Mapping) -> dict[str, int]:
    """Bytes of the training state on one device (one process, no sharding): weights (as
    stored), fp32 gradients, AdamW's moments, the EMA; and host bytes of the state levers."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    moments = trainable * (2 + 2 * 4 / 256 if levers["optim_8bit"] else 8)  # codes + scales
    return {
        "weights": trainable * 4 + frozen,
        "grads": 0 if levers["fused_step"] else trainable * 4,  # fused: one at a time
        "optimizer": 0 if levers["optim_on_cpu"] else int(moments),
        "ema": 0 if levers["ema_on_cpu"] else trainable * 4,
        "host": (trainable * 4 if levers["ema_on_cpu"] else 0)
        + (int(moments) if levers["optim_on_cpu"] else 0),
    }


def state_bytes(cfg: DictConfig, levers: Mapping) -> dict[str, int]:
    """The state part of `breakdown`, counted per parameter (no step is run)."""
    levers = {**base_levers(cfg), **dict(levers)}
    return _state_bytes(build_for_prediction(cfg, levers)[0], levers)


def _meta_batch(shapes: Mapping[str, tuple]) -> dict:
    """A training batch as the latent cache delivers it (fp32 latents, int64 masks)."""
    batch = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    for key in (k for k in shapes if k.endswith("_mask")):
        batch[key] = torch.ones(shapes[key], device="meta", dtype=torch.int64)
    batch["clip_id"] = [f"clip{i}" for i in range(shapes["video"][0])]
    return batch


def _optimizer(params: list, mem: DictConfig, hyper: dict) -> torch.optim.Optimizer | None:
    """The optimizer train.py makes, as far as it uses the GPU: none with `optim_on_cpu` (its
    state and update live on the host); torch's AdamW as CUDA runs it by default (foreach: a
    temporary the size of the updated parameters)."""
    if mem.optim_on_cpu:
        return None
    if mem.optim_8bit or mem.fused_step:
        return LeverAdamW(params, **hyper, quantize_8bit=mem.optim_8bit)
    return torch.optim.AdamW(params, **hyper, foreach=True)


@dataclass
class _Step:
    """One simulated optimizer step's model, optimizer and EMA as far as they are on the GPU
    (None where a lever keeps them on the host), and its batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    ema: EMA | None
    batch: dict

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor on the GPU before the step starts."""
        yield from self.model.parameters()
        yield from self.model.buffers()
        for state in self.optimizer.state.values() if self.optimizer else ():
            yield from (t for t in state.values() if isinstance(t, torch.Tensor))
        yield from self.ema.avg.values() if self.ema else ()
        yield from (t for t in self.batch.values() if isinstance(t, torch.Tensor))


def simulate_step(cfg: DictConfig, levers: Mapping, batch_size: int, count) -> object:
    """Run one optimizer step of `train.py` for `cfg` with `levers` on the meta device and
    return what `count(step)` measured: a TorchDispatchMode made once the optimizer state and
    the EMA exist (as from the second step on) and entered for the whole step, which is
    `min(grad_accum, 2)` micro-batches (the second runs with the first one's fp32 gradients
    alive, as every later one does) of autocast forward and backward, gradient clipping, the
    optimizer step and the EMA update. Work a lever moves to the host (`ema_on_cpu`,
    `optim_on_cpu`) leaves no bytes on the GPU and is not run; `state_bytes` counts it."""
    from jointdit.diffusion import JointDiffusion

    levers = {**base_levers(cfg), **dict(levers)}
    model, run_cfg = build_for_prediction(cfg, levers)
    tc, mem = run_cfg.train, run_cfg.memory
    named = [(n, p) for n, p in model.train().named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    hyper = {"lr": tc.lr, "betas": tuple(tc.betas), "weight_decay": tc.weight_decay}
    optimizer = _optimizer(params, mem, hyper)
    with _NoValues():
        if optimizer is not None:  # a first step creates AdamW's state
            for p in params:
                p.grad = torch.zeros_like(p)
            optimizer.step()
        for p in params:
            p.grad = None
        ema = None if mem.ema_on_cpu else EMA(named)
        step = _Step(model, optimizer, ema, _meta_batch(batch_shapes(cfg, levers, batch_size)))
    if mem.fused_step and optimizer is not None:
        fuse_step_into_backward(optimizer, params)
    elif mem.fused_step:  # the update runs on the host; the GPU frees each gradient at once
        for p in params:
            p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
    diffusion = JointDiffusion(cfg.diffusion)
    counter = count(step)
    with (
        warnings.catch_warnings(),
        _fused_attention(),
        _cuda_autocast(mem.precision) as amp,
        counter,
        _NoValues(),
    ):
        warnings.simplefilter("ignore")  # e.g. rms_norm's note on mixed input/weight dtypes
        for _ in range(min(tc.grad_accum, 2)):
            with amp.forward() if amp else contextlib.nullcontext():
                loss, _ = diffusion.loss(model, step.batch)
            (loss / tc.grad_accum).backward()  # accelerate scales the loss so
        if tc.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)  # scalars, in place
        if optimizer is not None:
            optimizer.step()
        for p in params:
            p.grad = None
        if ema is not None:
            ema.update(dict(model.named_parameters()), tc.ema_decay)
    return counter


class _MemTracker:
    """torch's own `MemTracker` (torch.distributed._tools.mem_tracker), the planner's
    independent check, counting totals only: its per-module statistics refuse a module called
    twice in a step (the model is, once per micro-batch) and install gradient hooks that torch
    refuses on frozen parameters, so its module hooks are off. Every storage still goes
    through its own dispatch tracking, the step's state as external tensors."""

    def __new__(cls, step: _Step):
        from torch.distributed._tools.mem_tracker import MemTracker

        class Tracker(MemTracker):
            def _pre_fw_hook(self, *args) -> None:
                pass

            _post_fw_hook = _pre_bw_hook = _post_bw_hook = _pre_fw_hook

            def device_peak(self) -> int:
                peak = self.get_tracker_snapshot("peak")
                return peak.get(torch.device("meta"), {}).get("Total", 0)

        tracker = Tracker()
        tracker.track_external(*step.tensors())
        return tracker


class _Both:
    """Two dispatch modes following the same step."""

    def __init__(self, outer, inner) -> None:
        self.outer, self.inner = outer, inner

    def __enter__(self):
        self.outer.__enter__()
        self.inner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.inner.__exit__(*exc)
        self.outer.__exit__(*exc)


def tracker_check(cfg: DictConfig, levers: Mapping, batch_size: int) -> tuple[int, int]:
    """Peak GPU bytes of one simulated step as the planner counts them and as torch's
    MemTracker counts them, both following the same step (before CALIBRATION)."""
    both = simulate_step(
        cfg, levers, batch_size, lambda s: _Both(_MemTracker(s), _Counter(s.tensors()))
    )
    return both.inner.device_peak(), both.outer.device_peak()


def breakdown(cfg: DictConfig, levers: Mapping, batch_size: int) -> dict[str, int]:
    """Predicted peak GPU bytes of one training step of `cfg` with `levers` (before
    CALIBRATION), by what holds them: the state (weights, grads, optimizer, ema; per
    parameter) and `step`, the rest of the counted peak (activations, autocast's copies of
    weights, workspaces, the optimizer's temporaries)."""
    levers = {**base_levers(cfg), **dict(levers)}
    state: dict[str, int] = {}

    def count(step: _Step) -> _Counter:
        state.update(_state_bytes(step.model, levers))
        return _Counter(step.tensors())

    peak = simulate_step(cfg, levers, batch_size, count).device_peak()
    state.pop("host")
    return {**state, "step": peak - sum(state.values())}


def step_flops(cfg: DictConfig, batch_size: int) -> int:
    """Model FLOPs of one training micro-batch (forward + backward, no checkpoint
    recomputation), counted on meta as the step's matmuls, convolutions and attention run."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    simulate_step(cfg, base_levers(cfg), batch_size, lambda s: counter)
    return int(counter.get_total_flops()) // min(cfg.train.grad_accum, 2)


def predict_peak(cfg: DictConfig, levers: Mapping, batch_size: int) -> int:
    """Predicted peak GPU memory (bytes) of one training step of `cfg` with `levers`."""
    return int(CALIBRATION * sum(breakdown(cfg, levers, batch_size).values()))


# ---------------------------------------------------------------------------------------------
# planning


@dataclass(frozen=True)
class Plan:
    levers: dict
    predicted_peak: int  # GPU bytes per process
    ladder_position: int
    lossy: bool
    fits: bool  # GPU and host
    kind: str = "exact"  # exact | approximation | other method | lossy
    host_peak: int = 0  # host bytes of the whole machine (all processes)
    fits_gpu: bool = True


def _model_sizes(cfg: DictConfig, levers: Mapping) -> tuple[int, int, int]:
    """(trainable parameters, all parameters, the largest FSDP unit's parameters) of the model
    `train.py` builds with `levers` (FSDP units: each expert UNet block and Joint Block)."""
    model, _ = build_for_prediction(cfg, {**base_levers(cfg), **dict(levers)})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max(sum(p.numel() for p in u.parameters()) for u in shard_units(model))
    return trainable, sum(p.numel() for p in model.parameters()), largest


def footprint(cfg: DictConfig, levers: Mapping, batch_size: int, target: Target) -> tuple[int, int]:
    """(GPU bytes per process, host bytes of the machine) of training `cfg` with `levers`.

    One process: the counted step (`predict_peak`). DDP adds its gradient buckets (accelerate's
    default keeps them beside the gradients: 4 bytes per trainable parameter). FSDP divides
    weights, gradients, AdamW's state and the EMA by the process count and adds two gathered
    units (the largest, in the compute dtype: the one computing and the one prefetched); the
    activations stay as one process counts them, with autocast's copies of the weights, which
    FSDP's gathered compute-dtype weights replace (an estimate: no tracker follows FSDP here).
    Host: each process first builds the model in fp32 on the host, then holds what the host
    levers keep there (EMA 4, AdamW 8 or 2.03 bytes per trainable parameter)."""
    levers = {**base_levers(cfg), **dict(levers)}
    gpu = predict_peak(cfg, levers, batch_size)
    state = state_bytes(cfg, levers)
    trainable, total, largest = _model_sizes(cfg, levers)
    n = target.num_processes
    if target.engine == "fsdp":
        sharded = state["weights"] + state["grads"] + state["optimizer"] + state["ema"]
        half = levers["precision"] in ("bf16", "fp16")
        gpu += int(CALIBRATION * (sharded / n - sharded + 2 * largest * (2 if half else 4)))
    elif n > 1:
        gpu += int(CALIBRATION * 4 * trainable)
    return gpu, n * max(4 * total, state["host"])


def _row(cfg: DictConfig, levers: dict, i: int, budget_bytes: int, target: Target) -> Plan:
    frames, batch = clip_frames(cfg), cfg.train.batch_size
    if target == Target():  # one process, host unchecked: the counted step alone
        peak, host = predict_peak(cfg, levers, batch), 0
    else:
        peak, host = footprint(cfg, levers, batch, target)
    fits_gpu = peak <= budget_bytes
    fits = fits_gpu and (not target.host_bytes or host <= target.host_bytes)
    kind = lever_kind(levers, frames)
    return Plan(levers, peak, i, is_lossy(levers, frames), fits, kind, host, fits_gpu)


def plan_table(
    cfg: DictConfig,
    budget_bytes: int,
    user_levers: Mapping | None = None,
    target: Target | None = None,
) -> list[Plan]:
    """Every rung of the ladder with its prediction (what `make plan-memory` prints)."""
    target = target or Target()
    rungs = ladder(cfg, user_levers, target)
    # one simulated step a rung: minutes each at the published size on a small CPU
    bar = tqdm(rungs, desc="counting each rung's step", unit="rung", leave=False)
    return [_row(cfg, lv, i, budget_bytes, target) for i, lv in enumerate(bar)]


def plan_walk(
    cfg: DictConfig,
    budget_bytes: int,
    user_levers: Mapping | None = None,
    target: Target | None = None,
) -> list[Plan]:
    """The rungs up to the least lossy one predicted to fit (all of them when none fits)."""
    target = target or Target()
    rows = []
    for i, levers in enumerate(ladder(cfg, user_levers, target)):
        rows.append(_row(cfg, levers, i, budget_bytes, target))
        if rows[-1].fits:
            break
    return rows


def plan(
    cfg: DictConfig,
    budget_bytes: int,
    user_levers: Mapping | None = None,
    target: Target | None = None,
) -> Plan:
    """The least lossy rung predicted to fit `budget_bytes` (the last rung when none fits)."""
    return plan_walk(cfg, budget_bytes, user_levers, target)[-1]


def format_levers(levers: Mapping) -> str:
    """The levers as the child gets them: JOINTDIT_* knobs, then config overrides."""
    env = " ".join(f"{ENV_OF[k]}={int(levers[k])}" for k in PLANNED)
    return " ".join([env, *lever_overrides(levers)])


# Table columns: header, lever, width.
_COLUMNS = (
    ("ckpt", "grad_ckpt", 4),
    ("q_chunk", "q_chunk_v", 9),
    ("kv", "kv_downsample", 2),
    ("max_t", "max_t", 5),
    ("frz_lowp", "frozen_lowp", 8),
    ("ema_cpu", "ema_on_cpu", 7),
    ("opt_cpu", "optim_on_cpu", 7),
    ("fused", "fused_step", 5),
    ("8bit", "optim_8bit", 4),
    ("lora", "lora_rank", 4),
)


def _cell(levers: Mapping, key: str) -> str:
    value = levers[key]
    if key == "q_chunk_v":
        return "-" if not (value or levers["q_chunk_a"]) else f"{value}/{levers['q_chunk_a']}"
    if isinstance(value, bool):
        return "on" if value else "-"
    return str(value) if value != OFF[key] else "-"


def _moved(rows: list[Plan], i: int) -> str:
    """What rung i turned relative to rung i - 1."""
    if i == 0:
        return "all off"
    return _moved_levers(rows[i - 1].levers, rows[i].levers)


def _moved_levers(a: Mapping, b: Mapping) -> str:
    return " ".join(f"{k}={b[k]}" for k in LEVERS if a[k] != b[k] and k != "q_chunk_a")


def format_table(rows: list[Plan], budget_bytes: int, target: Target | None = None) -> str:
    """The plan table; with a target, per-process GPU and whole-machine host figures."""
    head = " ".join(f"{h:>{w}}" for h, _, w in _COLUMNS)
    budget = f"budget {budget_bytes / GIB:.1f} GiB per GPU (calibration {CALIBRATION:g})"
    host = "" if target is None else f"  {'host GiB':>8}"
    lines = [
        budget if target is None else f"{budget}; {target.describe()}",
        f"{'rung':>4}  {head}  {'peak GiB':>8}{host}  fits  kind",
    ]
    for r in rows:
        cells = " ".join(f"{_cell(r.levers, k):>{w}}" for _, k, w in _COLUMNS)
        host = "" if target is None else f"  {r.host_peak / GIB:>8.1f}"
        lines.append(
            f"{r.ladder_position:>4}  {cells}  {r.predicted_peak / GIB:>8.2f}{host}  "
            f"{'yes' if r.fits else 'no':<4}  {r.kind}"
        )
    lines.append(chosen_line(rows))
    return "\n".join(lines)


def chosen_line(rows: list[Plan]) -> str:
    chosen = next((r for r in rows if r.fits), None)
    if chosen is None:
        host_bound = next((r for r in rows if r.fits_gpu), None)
        if host_bound is not None:
            return (
                f"chosen: none fits: rung {host_bound.ladder_position} fits the GPU but needs "
                f"{host_bound.host_peak / GIB:.1f} GiB of host RAM (HOST_GB is the machine's)"
            )
        return "chosen: none fits; lower train.batch_size or use more GPUs"
    note = ""
    if chosen.levers["fused_step"]:
        note = " (fused_step sets train.grad_accum=1 and train.max_grad_norm=0: no clipping)"
    return (
        f"chosen: rung {chosen.ladder_position} ({chosen.kind}), "
        f"{chosen.predicted_peak / GIB:.1f} GiB: {format_levers(chosen.levers)}{note}"
    )


def savings_lines(rows: list[Plan]) -> list[str]:
    """What each rung up to the chosen one saves, in short (the wrappers print this)."""
    out = []
    for i, r in enumerate(rows):
        delta = "" if i == 0 else f"{(r.predicted_peak - rows[i - 1].predicted_peak) / GIB:+.1f}"
        out.append(
            f"  rung {i:>2}  {_moved(rows, i):<28} {r.predicted_peak / GIB:6.1f} GiB "
            f"{delta:>6}  {r.kind}"
        )
    return out


@dataclass(frozen=True)
class TrackerRow:
    """One rung counted by the planner and by torch's MemTracker (bytes, calibration 1)."""

    rung: int
    moved: str
    planner: int
    tracker: int

    @property
    def error(self) -> float:
        """(planner - tracker) / tracker."""
        return self.planner / self.tracker - 1


def tracker_table(
    cfg: DictConfig, stop_bytes: int = 0, user_levers: Mapping | None = None
) -> list[TrackerRow]:
    """The ladder's rungs counted both ways, up to the first the planner fits in `stop_bytes`
    (every rung with 0)."""
    rungs, rows = ladder(cfg, user_levers), []
    for i, levers in enumerate(rungs):
        planner, tracker = tracker_check(cfg, levers, cfg.train.batch_size)
        moved = "all off" if i == 0 else _moved_levers(rungs[i - 1], levers)
        rows.append(TrackerRow(i, moved, planner, tracker))
        if planner <= stop_bytes:
            break
    return rows


def format_tracker_table(name: str, rows: list[TrackerRow], picks: Mapping[str, int]) -> str:
    """A markdown table of `tracker_table` rows; `picks` names the budgets each rung is the
    planner's first fit for (label -> bytes)."""
    lines = [
        f"| {name} rung | lever added | planner GiB | MemTracker GiB | error | planner's pick for |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        first = [
            k for k, b in picks.items() if next((x for x in rows if x.planner <= b), None) is r
        ]
        lines.append(
            f"| {r.rung} | {r.moved} | {r.planner / GIB:.2f} | {r.tracker / GIB:.2f} | "
            f"{100 * r.error:+.1f} % | {', '.join(first)} |"
        )
    return "\n".join(lines)


def budget_for_gb(gpu_gb: float) -> int:
    """Bytes to plan for on a card of `gpu_gb` GiB: less the CUDA context and a margin."""
    return int((gpu_gb * GIB - CUDA_CONTEXT_BYTES) * USABLE_FRACTION)


def clip_text(cfg: DictConfig) -> str:
    h, w = frame_hw(cfg)
    return f"clip {w}x{h} (WxH), {clip_frames(cfg)} frames at {cfg.data.fps:g} fps"


def architecture_source(cfg: DictConfig) -> str:
    """Where the experts' architecture comes from: a downloaded config.json or the shipped one."""
    from jointdit.config import repo_path
    from jointdit.model.sizes import REAL_CONFIGS, get_size

    size = get_size(cfg.model.size)
    if size.video_unet is not None:
        return "built from scratch (embedded size)"
    if (repo_path(cfg.model.video_unet) / "config.json").is_file():
        return f"config.json under {cfg.model.video_unet} / {cfg.model.audio_unet}"
    return f"the published configs shipped in {REAL_CONFIGS.relative_to(REPO_ROOT)}/"
