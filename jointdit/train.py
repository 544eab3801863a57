"""The training loop (DESIGN section 6): accelerate, EMA, atomic checkpoints, automatic resume.

Stage A and Stage B are configs (`train.freeze_experts`, `train.unfreeze`, `train.init_from`),
not code paths. Progress is counted in samples. A re-run of the same command resumes from the
run's latest checkpoint; a changed config fingerprint stops unless `force_resume` is set.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from jointdit import checkpoint as ckpt_io
from jointdit.config import fingerprint, repo_path, save_resolved
from jointdit.data.cache import LatentDataset
from jointdit.diffusion import JointDiffusion
from jointdit.engine import (
    asked_engine,
    fsdp_offload,
    fsdp_reshard,
    gather_to_host,
    optimizer_state_for,
    optimizer_state_to_host,
    shard_like,
    shard_model,
)
from jointdit.errors import UserError
from jointdit.memory import check_levers
from jointdit.optim import (
    EMA,
    LeverAdamW,
    check_fused_step,
    fuse_step_into_backward,
    store_frozen_lowp,
)
from jointdit.processes import die_with_launcher, run_lock

# Keys that may change between a run and its resume without changing what is being trained.
_RESUMABLE_KEYS = {
    "max_steps",
    "save_every",
    "keep_last",
    "log_every",
    "preview_every",
    "tensorboard",
    "out_dir",  # where the run lives, not what it trains: a copied or moved run resumes
}
# Memory levers that change where state lives, not what is computed (exact): a resume may
# switch them, e.g. when the planner picks other levers on another GPU.
_EXACT_STATE_LEVERS = {"ema_on_cpu", "optim_on_cpu", "fused_step", "frozen_lowp"}


class NonFiniteLoss(UserError):
    """The loss became NaN or inf; the run stops and the last good checkpoint stays."""


def run_fingerprint(cfg: DictConfig) -> str:
    """Fingerprint of what defines the training trajectory (not logging or run length)."""
    train = {k: v for k, v in OmegaConf.to_container(cfg.train).items() if k not in _RESUMABLE_KEYS}
    memory = {
        k: v for k, v in OmegaConf.to_container(cfg.memory).items() if k not in _EXACT_STATE_LEVERS
    }
    tree = OmegaConf.create(
        {
            "model": cfg.model,
            "diffusion": cfg.diffusion,
            "train": train,
            "memory": memory,
            "seed": cfg.run.seed,
        }
    )
    return fingerprint(tree)


def check_batch(n_items: int, batch_size: int, world: int) -> None:
    if batch_size * world > n_items:
        raise UserError(
            f"train.batch_size={batch_size} x {world} process(es) exceeds the {n_items} cached "
            "clips; lower train.batch_size or cache more clips"
        )


def batches(
    n_items: int, batch_size: int, seed: int, rank: int, world: int, start_sample: int = 0
) -> Iterator[list[int]]:
    """Endless per-rank batches read from one sample stream: seeded permutations of the cached
    clips, one per epoch, back to back.

    Each step the ranks read consecutive, disjoint slices of the stream; a run resumes at the
    number of samples seen, so it continues the same order whatever its process count.
    """
    check_batch(n_items, batch_size, world)
    return _batches(n_items, batch_size, seed, rank, world, start_sample)


def _batches(n_items, batch_size, seed, rank, world, start_sample) -> Iterator[list[int]]:
    perms: dict[int, list[int]] = {}

    def sample_at(position: int) -> int:
        epoch, within = divmod(position, n_items)
        if epoch not in perms:
            perms.clear()  # a batch spans at most two epochs
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            perms[epoch] = torch.randperm(n_items, generator=g).tolist()
        return perms[epoch][within]

    position = start_sample + rank * batch_size
    while True:
        yield [sample_at(position + i) for i in range(batch_size)]
        position += batch_size * world


def collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if torch.is_tensor(values[0]) else values
    return out


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state()
    plain = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    v, state, gauss = plain["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, *rest = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _check_lora(tc: DictConfig) -> None:
    if tc.lora_rank > 0 and (not tc.freeze_experts or not tc.unfreeze):
        raise UserError(
            f"train.lora_rank={tc.lora_rank} adapts the expert parts named by train.unfreeze "
            "instead of training them; it needs train.freeze_experts: true and a non-empty "
            "train.unfreeze"
        )


def _drop_rows_after(metrics_path: Path, step: int) -> None:
    """Keep only the metrics rows up to the resumed step (a killed run may have logged past its
    last checkpoint; those steps are trained again), rewritten atomically."""
    if not metrics_path.is_file():
        return
    lines = metrics_path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if _row_step(line) <= step]
    if len(keep) == len(lines):
        return
    tmp = metrics_path.with_name(f".{metrics_path.name}.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, metrics_path)


def _row_step(line: str) -> float:
    """A metrics row's step; a line cut short by a kill counts as past every step."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    samples_seen: int
    last_checkpoint: Path | None
    samples_per_s: float
    model: torch.nn.Module  # the trained (unwrapped) model, raw weights (sharded under FSDP)
    rank: int = 0


def levers_text(cfg: DictConfig) -> str:
    """The memory levers a run uses (those not at their off value), as config keys."""
    off = {"max_t": 0, "q_chunk_v": 0, "q_chunk_a": 0, "kv_downsample": 1}
    on = [
        f"memory.{k}={str(v).lower()}"
        for k, v in OmegaConf.to_container(cfg.memory).items()
        if k != "precision" and v != off.get(k, False)
    ]
    if cfg.train.lora_rank > 0:
        on.append(f"train.lora_rank={cfg.train.lora_rank}")
    return " ".join(on) or "none"


def _agree(accelerator, message: str | None) -> None:
    """Raise on every rank the UserError rank 0 found (None: no error), so all stop alike."""
    if accelerator.num_processes > 1:
        box = [message]
        torch.distributed.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise UserError(message)


def _hold_run_lock(stack: contextlib.ExitStack, accelerator, run_dir: Path) -> None:
    """Rank 0 takes the run folder's lock (jointdit/processes.py) until `stack` closes; when
    another run holds it, every rank stops with its one line."""
    error = None
    if accelerator.is_main_process:
        try:
            stack.enter_context(run_lock(run_dir))
        except UserError as e:
            error = str(e)
    _agree(accelerator, error)


def train(
    cfg: DictConfig,
    force_resume: bool = False,
    preview: Callable[[object, DictConfig, Path, int], None] | None = None,
) -> TrainResult:
    """Train (or resume) the run described by `cfg`. `preview(model, cfg, dir, step)` is called
    on the main process every `train.preview_every` steps when given."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    die_with_launcher()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    engine = asked_engine(os.environ, world)
    tc = cfg.train
    run_dir = repo_path(tc.out_dir) / cfg.run.name
    # This repo shards the model itself (jointdit/engine.py); accelerate, told of FSDP, would
    # shard it again on a GPU (and ignore the request on CPU). To accelerate it is plain data
    # parallel: processes, devices, autocast, reductions, gradient accumulation.
    asked_fsdp = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=cfg.memory.precision,
            gradient_accumulation_steps=tc.grad_accum,
            log_with="tensorboard" if tc.tensorboard else None,
            project_dir=str(run_dir),
        )
    finally:
        if asked_fsdp is not None:
            os.environ["ACCELERATE_USE_FSDP"] = asked_fsdp
    world = accelerator.num_processes
    if accelerator.distributed_type.value not in ("NO", "MULTI_CPU", "MULTI_GPU"):
        raise UserError(
            f"accelerate runs {accelerator.distributed_type.value}, which this training code "
            f"does not drive (asked: {engine}); use configs/accelerate/ddp.yaml or fsdp.yaml"
        )
    set_seed(cfg.run.seed, device_specific=False)

    dataset = LatentDataset(
        repo_path(cfg.cache.dir), tc.split, max_t=cfg.memory.max_t, latents=tc.latents
    )
    # checked before anything is written, so a bad batch size leaves no run folder behind
    check_batch(len(dataset), tc.batch_size, world)
    mem = cfg.memory
    check_fused_step(mem, tc)
    check_levers(mem, engine, world)
    _check_lora(tc)
    if engine == "fsdp" and tc.preview_every:
        raise UserError(
            f"train.preview_every={tc.preview_every}: previews sample on one process, which "
            "under FSDP holds only a shard of the model; set train.preview_every=0 and sample "
            "a checkpoint with `make infer`"
        )
    accelerator.print(
        f"engine {engine}, {world} process(es) on {accelerator.device.type}, precision "
        f"{mem.precision}, levers: {levers_text(cfg)}"
        + (
            ", FSDP parameter offload to CPU"
            if engine == "fsdp" and fsdp_offload(os.environ)
            else ""
        )
    )
    with contextlib.ExitStack() as stack:
        return _train(cfg, accelerator, engine, dataset, run_dir, force_resume, preview, stack)


def _train(cfg, accelerator, engine, dataset, run_dir, force_resume, preview, stack):
    tc, mem = cfg.train, cfg.memory
    rank, world = accelerator.process_index, accelerator.num_processes
    model = ckpt_io.build_trained_model(cfg)
    names = [n for n, _ in model.named_parameters()]
    for prefix in tc.unfreeze:
        if not any(n.startswith(prefix) for n in names):
            raise UserError(
                f"train.unfreeze: {prefix!r} names no parameter of the model "
                f"(names look like {names[0]!r})"
            )
    if tc.freeze_experts:
        if tc.lora_rank > 0:  # the adapters train, the parts they adapt stay frozen
            model.freeze_experts([])
            for n, p in model.named_parameters():
                p.requires_grad_(p.requires_grad or ".lora_" in n)
        else:
            model.freeze_experts(list(tc.unfreeze))
    fp = run_fingerprint(cfg)
    memo_dir = repo_path(tc.out_dir)
    latest = ckpt_io.latest_checkpoint(run_dir)
    if latest is None:
        init = ckpt_io.resolve_checkpoint(repo_path(tc.init_from)) if tc.init_from else None
        if init is not None:
            have = ckpt_io.restore(model, init, memo_dir, partial=True)
            fresh = [k for k in model.state_dict() if k not in have and ".lora_" not in k]
            if fresh:  # only new LoRA adapters may start from scratch
                raise UserError(
                    f"train.init_from: {init} lacks {len(fresh)} tensors of this model, "
                    f"e.g. {fresh[0]!r} (a different model config?)"
                )
            accelerator.print(f"initialised from {init}")
        save_keys, base = ckpt_io.plan_base(model, cfg, init, memo_dir)

    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(
            "nothing to train: every parameter is frozen (check train.freeze_experts "
            "and train.unfreeze)"
        )
    step = samples_seen = 0
    if latest is not None:
        state = ckpt_io.read_state(latest)
        if state.fingerprint != fp and not force_resume:
            raise UserError(
                f"{latest} was written with a different config (fingerprint {state.fingerprint} "
                f"!= {fp}); use a new run.name, or --force-resume to continue anyway"
            )
        ckpt_io.restore(model, latest, memo_dir)
        base = ckpt_io.read_base(latest)
        if base is None:  # an older full checkpoint: from here on, save what training changes
            save_keys, base = ckpt_io.plan_base(model, cfg, None, memo_dir)
        else:
            save_keys = ckpt_io.saved_keys(latest)
    lowp = store_frozen_lowp(model, mem.precision) if mem.frozen_lowp else 0
    if engine == "fsdp":  # sharded before the optimizer is made: it must hold the shards
        model = shard_model(
            model.to(accelerator.device),
            mem.precision,
            accelerator.device,
            offload=fsdp_offload(os.environ),
            reshard=fsdp_reshard(os.environ),
        )

    params = [p for p in model.parameters() if p.requires_grad]
    hyper = {"lr": tc.lr, "betas": tuple(tc.betas), "weight_decay": tc.weight_decay}
    if mem.optim_on_cpu or mem.optim_8bit or mem.fused_step:
        optimizer = LeverAdamW(
            params,
            **hyper,
            state_device="cpu" if mem.optim_on_cpu else None,
            quantize_8bit=mem.optim_8bit,
        )
    else:
        optimizer = torch.optim.AdamW(params, **hyper)
    lever_optimizer = optimizer
    warmup = max(1, tc.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))

    # The optimizer state is loaded after `prepare` places the model, so offloaded state never
    # passes through the GPU; the EMA is made there too, on the parameters' device or the host.
    if engine == "fsdp":  # the model is sharded already; accelerate wraps the optimizer only
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    ema = EMA(
        ((n, p) for n, p in unwrapped.named_parameters() if p.requires_grad),
        device="cpu" if mem.ema_on_cpu else None,
    )
    if latest is not None:
        saved_ema = ckpt_io.load_tensors(latest, "ema.safetensors")
        ema.load(
            {k: shard_like(v, ema.avg[k]) if k in ema.avg else v for k, v in saved_ema.items()}
        )
        opt_state = ckpt_io.load_optimizer_state(latest)
        optimizer.load_state_dict(optimizer_state_for(lever_optimizer, opt_state["optimizer"]))
        scheduler.load_state_dict(opt_state["scheduler"])
        saved_world = int(state.extra.get("world", 1))
        rng = ckpt_io.load_tensors(latest, "rng.safetensors")
        # A rank the checkpoint has no state for (more processes than it was saved with) takes
        # rank 0's: every rank starts from the same seed and draws alike, so that is the state
        # it would have had.
        mine = rank if f"rank{rank}.torch_cpu" in rng else 0
        _set_rng_state(
            {k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{mine}.")},
            state.extra["rng"][str(mine)],
        )
        step, samples_seen = state.step, state.samples_seen
        accelerator.print(f"resuming {run_dir.name} from step {step} ({latest})")
        if saved_world != world:
            accelerator.print(
                f"process count {saved_world} -> {world}: the sample order continues at sample "
                f"{samples_seen}; the global batch goes from {tc.batch_size * saved_world * tc.grad_accum} "
                f"to {tc.batch_size * world * tc.grad_accum} samples per step"
            )
    if mem.fused_step:
        fuse_step_into_backward(lever_optimizer, params)

    feed = batches(
        len(dataset), tc.batch_size, cfg.run.seed, rank, world, start_sample=samples_seen
    )
    # taken before the first write (and after every check of the input, so a bad input leaves
    # no run folder behind)
    _hold_run_lock(stack, accelerator, run_dir)
    if accelerator.is_main_process:
        _drop_rows_after(run_dir / "metrics.jsonl", step)
    diffusion = JointDiffusion(cfg.diffusion)
    if accelerator.is_main_process:
        save_resolved(cfg, run_dir)
        if tc.tensorboard:
            accelerator.init_trackers("tb")
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    metrics_path = run_dir / "metrics.jsonl"
    last_ckpt = latest

    def save(step: int) -> Path | None:
        tensors, plain = _rng_state()
        rng_t = {f"rank{rank}.{k}": v for k, v in tensors.items()}
        rng_plain = {str(rank): plain}
        if world > 1:  # every rank's RNG goes into the one checkpoint the main rank writes
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, (rng_t, rng_plain))
            rng_t, rng_plain = {}, {}
            for t, p in gathered:
                rng_t.update(t)
                rng_plain.update(p)
        # Sharded tensors are gathered whole (every rank takes part), so the files are the
        # ones a single process writes.
        main = accelerator.is_main_process
        full = unwrapped.state_dict()
        model_state = gather_to_host(((k, full[k]) for k in save_keys), main)
        ema_state = gather_to_host(ema.avg.items(), main)
        optimizer_state = optimizer_state_to_host(optimizer.state_dict(), main)
        path = None
        if main:
            path = ckpt_io.save_checkpoint(
                run_dir,
                step,
                model_state=model_state,
                ema_state=ema_state,
                optimizer_state={"optimizer": optimizer_state, "scheduler": scheduler.state_dict()},
                rng_states=rng_t,
                state=ckpt_io.CheckpointState(
                    step, samples_seen, fp, {"rng": rng_plain, "world": world, "engine": engine}
                ),
                config_text=config_text,
                keep_last=tc.keep_last,
                base=base,
            )
        accelerator.wait_for_everyone()
        return path

    global_batch = tc.batch_size * world * tc.grad_accum
    bar = tqdm(
        total=tc.max_steps,
        initial=step,
        desc=f"train {cfg.run.name}",
        unit="step",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    model.train()
    t0, start_step = time.perf_counter(), step
    while step < tc.max_steps:
        logs: dict[str, float] = {}
        for _ in range(tc.grad_accum):
            batch = collate([dataset[i] for i in next(feed)])
            batch = {
                k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()
            }
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss, parts = diffusion.loss(model, batch)
                # every logged loss is the mean over ranks: one reduction for all of them
                named = {"loss": loss.detach(), **parts}
                values = torch.tensor([float(v) for v in named.values()], device=accelerator.device)
                means = accelerator.reduce(values, reduction="mean").tolist()
                mean_loss = means[0]
                if not math.isfinite(mean_loss):
                    where = last_ckpt or "none written yet"
                    raise NonFiniteLoss(
                        f"loss is {mean_loss} at step {step + 1}; stopping. Last good "
                        f"checkpoint: {where}. Lower train.lr or enable train.max_grad_norm"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in zip(named, means):
                logs[k] = logs.get(k, 0.0) + v / tc.grad_accum
        step += 1
        samples_seen += global_batch
        with torch.no_grad():
            decay = min(tc.ema_decay, (1 + step) / (10 + step))  # warm-started EMA
            ema.update(dict(unwrapped.named_parameters()), decay)

        elapsed = time.perf_counter() - t0
        rate = (step - start_step) * global_batch / max(elapsed, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}", samples_s=f"{rate:.1f}")
        if accelerator.is_main_process and (step % tc.log_every == 0 or step == tc.max_steps):
            record = {
                "step": step,
                "samples": samples_seen,
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": rate,
                **logs,
            }
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if tc.tensorboard:
                accelerator.log(record, step=step)
        if step % tc.save_every == 0 or step == tc.max_steps:
            last_ckpt = save(step) or last_ckpt
        if (
            preview is not None
            and tc.preview_every
            and step % tc.preview_every == 0
            and accelerator.is_main_process
        ):
            with accelerator.autocast() if lowp else contextlib.nullcontext():
                preview(unwrapped, cfg, run_dir / "previews", step)
    bar.close()
    if tc.tensorboard:
        accelerator.end_training()
    elapsed = time.perf_counter() - t0
    rate = (step - start_step) * global_batch / elapsed if step > start_step else math.nan
    return TrainResult(
        run_dir,
        step,
        samples_seen,
        ckpt_io.latest_checkpoint(run_dir),
        rate,
        accelerator.unwrap_model(model),
        rank,
    )
