"""Which distributed engine a training run uses, and FSDP's sharding and gathering.

Engines (docs/multi-gpu.md):
- "single": one process.
- "ddp": data parallel through accelerate (every process holds the whole model; gradients are
  averaged). Runs on CUDA (nccl) and on CPU (gloo).
- "fsdp": torch's FSDP2 (`fully_shard`) applied by this repo: each Joint Block and each block of
  the two expert UNets is a unit, the rest of the model the root unit; parameters, gradients,
  AdamW state and the EMA live sharded across the processes. Runs on CUDA and on CPU (gloo).

The engine is asked through the accelerate config the launcher reads (ACCELERATE_CONFIG, whose
`distributed_type` accelerate passes on as ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED). This
repo shards the model itself rather than through accelerate's FSDP plugin, because accelerate
turns FSDP on only for GPUs (on CPU it would silently run DDP); one code path then serves CUDA
and the CPU tests alike. Checkpoints are gathered into the same files a single process writes,
so any process count (and `make infer`) reads them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from jointdit.errors import UserError

ENGINES = ("single", "ddp", "fsdp")  # what `asked_engine` answers
_LOWP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "false").strip().lower() == "true"


def asked_engine(env: Mapping[str, str], world: int) -> str:
    """The engine the launch asks for; one line naming the setting when this code cannot run it."""
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        raise UserError(
            "the accelerate config asks for DeepSpeed (distributed_type: DEEPSPEED), which this "
            "training code does not run; use ACCELERATE_CONFIG=configs/accelerate/fsdp.yaml "
            "(sharded) or configs/accelerate/ddp.yaml"
        )
    if _flag(env, "ACCELERATE_USE_MEGATRON_LM"):
        raise UserError(
            "the accelerate config asks for Megatron-LM, which this training code does not run; "
            "use configs/accelerate/fsdp.yaml or ddp.yaml"
        )
    if _flag(env, "ACCELERATE_USE_FSDP"):
        version = env.get("FSDP_VERSION", "1")
        if version != "2":
            raise UserError(
                f"the accelerate config asks for fsdp_version {version}; this training code runs "
                "FSDP2 only: set fsdp_version: 2 (as configs/accelerate/fsdp.yaml does)"
            )
        if _flag(env, "FSDP_ACTIVATION_CHECKPOINTING"):
            raise UserError(
                "fsdp_activation_checkpointing: true in the accelerate config; this repo's "
                "checkpointing is memory.grad_ckpt (JOINTDIT_GRAD_CKPT=1): set that instead"
            )
        if world < 2:
            raise UserError(
                "the accelerate config asks for FSDP, which shards over several processes, but "
                "this run has 1: set NUM_GPUS=n (n > 1), or leave ACCELERATE_CONFIG unset"
            )
        return "fsdp"
    return "ddp" if world > 1 else "single"


# Of accelerate's FSDP settings (fsdp_config, passed on as FSDP_* variables) this repo reads
# FSDP_VERSION (above), FSDP_OFFLOAD_PARAMS and FSDP_RESHARD_AFTER_FORWARD; it decides the rest
# itself: the wrap units, full state dicts.


def fsdp_offload(env: Mapping[str, str]) -> bool:
    return _flag(env, "FSDP_OFFLOAD_PARAMS")


def fsdp_reshard(env: Mapping[str, str]) -> bool:
    return env.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower() == "true"


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP makes units of, innermost first: every block of both expert UNets and
    every Joint Block (the model itself becomes the root unit)."""
    units: list[nn.Module] = []
    for expert in (model.video_expert, model.audio_expert):
        unet = expert.unet
        units += [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [*units, *model.joint_blocks]


def shard_model(
    model: nn.Module, precision: str, device: torch.device, offload: bool, reshard: bool
) -> nn.Module:
    """Apply FSDP2 to `model` in place (it becomes an FSDPModule) and return it.

    Mixed precision follows `memory.precision`: weights gathered for compute in bf16/fp16,
    gradients reduced in fp32 and kept sharded in fp32 beside the fp32 master shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    options = {
        "mesh": mesh,
        "reshard_after_forward": reshard,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=_LOWP.get(precision), reduce_dtype=torch.float32
        ),
    }
    if offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    # FSDP2 warns that a unit returning a view would lose its hook to an in-place op on that
    # view; no caller here changes a block's output in place (the FSDP test holds its losses to
    # data parallel's), so the warning, once per unit and rank, is noise.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for unit in shard_units(model):
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return model


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def gather_to_host(
    tensors: Iterable[tuple[str, torch.Tensor]], keep: bool, bucket_bytes: int = 256 << 20
) -> dict:
    """Full host copies of (possibly sharded) tensors. Every rank must call it with the same
    names in the same order (the gathers are collectives); only ranks with `keep` get the
    copies ({} on the others). Shards travel in buckets of about `bucket_bytes`, one collective
    per bucket: a rank's device never holds more than a bucket of gathered tensors, and a
    thousand small tensors cost a few collectives, not a thousand."""
    out: dict[str, torch.Tensor] = {}
    bucket: list[tuple[str, torch.Tensor]] = []
    names, size = [], 0
    for name, t in tensors:
        names.append(name)
        if not is_sharded(t):
            if keep:
                out[name] = t.detach().to("cpu", copy=True)
            continue
        if bucket and (t.dtype != bucket[0][1].dtype or size > bucket_bytes):
            out.update(_gather_bucket(bucket, keep))
            bucket, size = [], 0
        bucket.append((name, t))
        size += t.numel() * t.element_size()
    if bucket:
        out.update(_gather_bucket(bucket, keep))
    return {name: out[name] for name in names if name in out}


def _rows(size0: int, world: int) -> list[int]:
    """Rows of dim 0 each rank holds under Shard(0) (torch.chunk's split, as DTensor uses)."""
    chunk = -(-size0 // world)
    return [max(0, min(chunk, size0 - r * chunk)) for r in range(world)]


def _gather_bucket(bucket: list[tuple[str, torch.Tensor]], keep: bool) -> dict:
    """One all-gather for DTensors of one dtype, each sharded on dim 0 of a 1-D mesh."""
    from torch.distributed.tensor import Shard

    mesh = bucket[0][1].device_mesh
    if mesh.ndim != 1 or any(t.ndim == 0 or t.placements != (Shard(0),) for _, t in bucket):
        full = {n: t.full_tensor() for n, t in bucket}  # a layout FSDP2 does not make here
        return {n: v.to("cpu", copy=True) for n, v in full.items()} if keep else {}
    world, rank = mesh.size(), mesh.get_local_rank()
    rows = [_rows(t.shape[0], world) for _, t in bucket]
    per_row = [math.prod(t.shape[1:]) for _, t in bucket]  # elements in one row
    lengths = [sum(r[k] * n for r, n in zip(rows, per_row)) for k in range(world)]
    longest = max(lengths)
    local = [t.to_local().reshape(-1) for _, t in bucket]
    send = torch.cat([*local, local[0].new_zeros(longest - lengths[rank])])
    recv = send.new_empty(world * longest)
    torch.distributed.all_gather_single(recv, send, group=mesh.get_group())
    if not keep:
        return {}
    regions = recv.view(world, longest).cpu()
    out, offsets = {}, [0] * world
    for (name, t), r, n in zip(bucket, rows, per_row):
        pieces = []
        for k in range(world):
            pieces.append(regions[k, offsets[k] : offsets[k] + r[k] * n])
            offsets[k] += r[k] * n
        out[name] = torch.cat(pieces).view(t.shape).clone()
    return out


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (as read from a checkpoint) laid out like `like`: this rank's shard of it when
    `like` is sharded (no communication: every rank read the same file), else `full` itself."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    value = full.to(like.device, like.dtype)
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)


def optimizer_state_to_host(state: dict, keep: bool) -> dict:
    """An optimizer's `state_dict()` with every sharded tensor gathered (see `gather_to_host`):
    the same layout one process saves (parameter indices, plain tensors)."""
    flat = [
        ((index, k), v)
        for index, values in state["state"].items()
        for k, v in values.items()
        if torch.is_tensor(v) and is_sharded(v)
    ]
    full = gather_to_host(flat, keep)
    return {
        "param_groups": state["param_groups"],
        "state": {
            index: {k: full.get((index, k), v) for k, v in values.items()}
            for index, values in state["state"].items()
        },
    }


def optimizer_state_for(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A full optimizer state (as saved) with each parameter's tensors cut to its shard."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        p = params[int(index)]
        out["state"][index] = {
            k: shard_like(v, p) if torch.is_tensor(v) and v.dim() > 0 else v
            for k, v in values.items()
        }
    return out
