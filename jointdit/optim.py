"""Levers for the training state that is not activations (DESIGN section 4, docs/memory.md).

- `LeverAdamW`: AdamW whose state may live on another device (`memory.optim_on_cpu`), be
  stored block-wise in 8 bits (`memory.optim_8bit`, an approximation), and be stepped one
  parameter at a time (`step_param`, what `memory.fused_step` calls from a gradient hook).
  The arithmetic is torch's own single-tensor AdamW (`torch.optim.adamw.adamw`,
  foreach=False), so with full-precision state it equals `torch.optim.AdamW` on the device
  where the state lives, bit for bit.
- `EMA`: fp32 average of the trainable parameters, on the parameters' device or on the host
  (`memory.ema_on_cpu`).
- `fuse_step_into_backward`: the optimizer step runs per parameter as soon as its gradient is
  complete, and the gradient is freed at once.
- `store_frozen_lowp`: frozen Linear / Conv weights in the compute dtype (`memory.frozen_lowp`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.adamw import adamw as _adamw

from jointdit.errors import UserError

BLOCK = 256  # elements per quantisation block of the 8-bit states
_FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
_CODES = {"exp_avg": "int8", "exp_avg_sqrt": "float8"}  # 8-bit state -> its code


def quantize_blockwise(x: torch.Tensor, code: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape) -> (codes uint8 (n_blocks, BLOCK), scales fp32 (n_blocks,)).

    Each block of BLOCK elements is scaled by its largest magnitude, then rounded to 8 bits:
    code "int8": 255 evenly spaced levels (zero stays exactly zero: exp_avg, whose small
    values only make small updates); code "float8": float8 e4m3 (exponent-spaced levels, 3
    mantissa bits: sqrt(exp_avg_sq), the update's denominator, whose small values must not
    round to zero and blow the update up - they do only below 4e-6 of the block's maximum)."""
    flat = x.detach().reshape(-1).float()
    blocks = torch.nn.functional.pad(flat, (0, (-flat.numel()) % BLOCK)).view(-1, BLOCK)
    top = _FP8_MAX if code == "float8" else 127.0
    scale = blocks.abs().amax(dim=1).clamp_min(1e-30) / top
    scaled = blocks / scale[:, None]
    codes = scaled.to(_FP8) if code == "float8" else scaled.round().to(torch.int8)
    return codes.view(torch.uint8), scale


def dequantize_blockwise(codes: torch.Tensor, scale: torch.Tensor, code: str, like: torch.Tensor):
    """Inverse of `quantize_blockwise`, shaped like `like` (fp32)."""
    values = codes.view(_FP8 if code == "float8" else torch.int8).float() * scale[:, None]
    return values.view(-1)[: like.numel()].view(like.shape)


class LeverAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch's arithmetic) with the state levers.

    state_device: where exp_avg / exp_avg_sq / step live and where the update is computed
    (None = each parameter's own device). When it differs, the gradient and the weight are
    copied there, updated, and the weight copied back, so the GPU holds no optimizer state.
    quantize_8bit: exp_avg and sqrt(exp_avg_sq) are kept as block-wise 8-bit codes between
    steps (1 byte each + one fp32 scale per BLOCK elements; see `quantize_blockwise`); each
    step dequantises, updates in fp32 and quantises again: an APPROXIMATION of AdamW.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        state_device: str | torch.device | None = None,
        quantize_8bit: bool = False,
    ):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.state_device = None if state_device is None else torch.device(state_device)
        self.quantize_8bit = quantize_8bit
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}

    def _home(self, p: torch.Tensor) -> torch.device:
        return p.device if self.state_device is None else self.state_device

    def _moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(exp_avg, exp_avg_sq, step) as fp32 tensors on the state device."""
        state, home = self.state[p], self._home(p)
        if not state:
            state["step"] = torch.tensor(0.0)  # on the host, as torch's AdamW keeps it
            if self.quantize_8bit:
                zero = torch.zeros(p.shape, dtype=torch.float32, device=home)
                for key, code in _CODES.items():
                    state[f"{key}_codes"], state[f"{key}_scale"] = quantize_blockwise(zero, code)
            else:
                state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=home)
                state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=home)
        if not self.quantize_8bit:
            return state["exp_avg"], state["exp_avg_sq"], state["step"]
        like = torch.empty(p.shape, device="meta")
        m, r = (
            dequantize_blockwise(state[f"{key}_codes"], state[f"{key}_scale"], code, like)
            for key, code in _CODES.items()
        )
        return m, r * r, state["step"]

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """One AdamW update of parameter `p` from its current gradient (no-op without one)."""
        if p.grad is None:
            return
        group, home = self._group_of[p], self._home(p)
        m, v, step = self._moments(p)
        moved = self.state_device is not None  # copy even host->host, so CPU tests run it
        weight = p.detach().to(home, copy=True) if moved else p
        grad = p.grad.to(home, torch.float32) if moved else p.grad
        beta1, beta2 = group["betas"]
        _adamw(
            [weight],
            [grad],
            [m],
            [v],
            [],
            [step],
            foreach=False,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
        if moved:
            p.copy_(weight)
        if self.quantize_8bit:
            state = self.state[p]
            for key, value in (("exp_avg", m), ("exp_avg_sqrt", v.sqrt())):
                codes, scale = quantize_blockwise(value, _CODES[key])
                state[f"{key}_codes"], state[f"{key}_scale"] = codes, scale

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            raise ValueError("LeverAdamW does not take a closure")
        for group in self.param_groups:
            for p in group["params"]:
                self.step_param(p)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore state onto the state device, dtypes as saved (torch's default loader would
        cast the state to each parameter's device and dtype)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError("optimizer state has a different number of parameter groups")
        index = {}
        for mine, saved in zip(self.param_groups, groups):
            if len(mine["params"]) != len(saved["params"]):
                raise ValueError("optimizer state has a different number of parameters")
            index.update(zip(saved["params"], mine["params"]))
            mine.update({k: v for k, v in saved.items() if k != "params"})
        self.state.clear()
        for i, values in state_dict["state"].items():
            p = index[int(i)]
            self.state[p] = {
                k: v.to("cpu" if k == "step" else self._home(p), copy=True)
                for k, v in values.items()
            }


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of optimizer state per trainable element (measured from the state tensors)."""
    n = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    total = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    return total / max(n, 1)


class EMA:
    """fp32 exponential moving average of named parameters, kept on `device`
    (None = each parameter's own device; "cpu" = host memory, `memory.ema_on_cpu`)."""

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]], device=None):
        self.device = None if device is None else torch.device(device)
        self.avg = {
            n: p.detach().to(self.device or p.device, torch.float32, copy=True) for n, p in named
        }

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], decay: float) -> None:
        for name, avg in self.avg.items():
            avg.lerp_(params[name].detach().to(avg.device, torch.float32), 1 - decay)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.avg.keys() - state.keys()
        if missing:
            raise UserError(
                f"EMA state lacks {len(missing)} trainable tensors, e.g. {min(missing)}"
            )
        for name, avg in self.avg.items():
            avg.copy_(state[name])


def fuse_step_into_backward(optimizer: LeverAdamW, params: Iterable[torch.Tensor]) -> list:
    """Step each parameter inside backward, as soon as its gradient is accumulated, and free
    that gradient (torch's post-accumulate-grad hook). Exact only when every backward is an
    optimizer step (grad_accum 1) and no global gradient statistic (clipping) is needed."""

    def hook(p: torch.Tensor) -> None:
        optimizer.step_param(p)
        p.grad = None

    return [p.register_post_accumulate_grad_hook(hook) for p in params]


def check_fused_step(memory, train) -> None:
    """memory.fused_step needs grad_accum 1, no clipping, no fp16 loss scaling; say which key
    breaks it."""
    if not memory.fused_step:
        return
    bad = []
    if train.grad_accum != 1:
        bad.append(f"train.grad_accum={train.grad_accum} (needs 1)")
    if train.max_grad_norm != 0:
        bad.append(f"train.max_grad_norm={train.max_grad_norm} (needs 0)")
    if memory.precision == "fp16":
        bad.append("memory.precision=fp16 (its loss scaler must see every gradient first)")
    if bad:
        raise UserError(
            "memory.fused_step (JOINTDIT_FUSED_STEP) steps each parameter during backward, "
            f"exact only without accumulation or global clipping: {', '.join(bad)}"
        )


_LOWP = {"bf16": torch.bfloat16, "fp16": torch.float16}
LOWP_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def store_frozen_lowp(model: nn.Module, precision: str) -> int:
    """Store the frozen weight and bias of every Linear / Conv in the compute dtype; returns
    the number of elements converted (0 under precision "no").

    Exact under autocast: autocast casts these modules' fp32 weights to the compute dtype on
    every call with the same rounding, so storing them rounded changes no result. Everything
    else (norm scales, embeddings, free parameters) stays fp32, since autocast would run those
    ops in fp32 and a rounded copy would change them. A module outside autocast would see a
    dtype mismatch, so this is for training steps only."""
    dtype = _LOWP.get(precision)
    if dtype is None:
        return 0
    converted = 0
    for module in model.modules():
        if not isinstance(module, LOWP_MODULES):
            continue
        for param in module.parameters(recurse=False):
            if param.requires_grad or param.dtype == dtype:
                continue
            param.data = param.data.to(dtype)
            converted += param.numel()
    return converted
