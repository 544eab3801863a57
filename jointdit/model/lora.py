"""LoRA adapters on Linear / Conv modules (`train.lora_rank`): a different method than full
fine-tuning, used by the Stage B variant `configs/stage_b_lora.yaml`.

The adapted module keeps its own (frozen) parameters under their original names; it gains
`lora_down` / `lora_up` children and a forward hook that adds `scale * up(down(x))` to its
output. `lora_up` starts at zero, so a freshly adapted model computes what it did before, and
checkpoints of the base model (pretrained experts, Stage A) load into it unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def adaptable(module: nn.Module) -> bool:
    """Whether `apply_lora` gives this module an adapter: every Linear, and every ungrouped
    zero-padded Conv (a grouped or circular-padded one stays frozen without one)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, _CONVS) and module.groups == 1 and module.padding_mode == "zeros"


def adapter_params(module: nn.Module, rank: int) -> int:
    """Parameters of the rank-`rank` adapter `apply_lora` gives `module` (0 if none); works
    on meta modules (the memory planner counts with it)."""
    if not adaptable(module):
        return 0
    if isinstance(module, nn.Linear):
        return rank * (module.in_features + module.out_features)
    return rank * (module.in_channels * math.prod(module.kernel_size) + module.out_channels)


def _adapter(module: nn.Module, rank: int) -> tuple[nn.Module, nn.Module] | None:
    if not adaptable(module):
        return None
    if isinstance(module, nn.Linear):
        return (
            nn.Linear(module.in_features, rank, bias=False),
            nn.Linear(rank, module.out_features, bias=False),
        )
    conv = type(module)
    down = conv(
        module.in_channels,
        rank,
        module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        bias=False,
    )
    return down, conv(rank, module.out_channels, 1, bias=False)


def _add_lora(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.lora_up(module.lora_down(args[0])) * module.lora_scale


def apply_lora(model: nn.Module, prefixes: list[str], rank: int, alpha: float = 0.0) -> int:
    """Freeze every parameter under `prefixes` and give each Linear / Conv there a rank-`rank`
    adapter (trainable, scale alpha / rank; alpha 0 means alpha = rank). Returns the number
    of adapted modules."""
    scale = (alpha or rank) / rank
    prefixes = tuple(prefixes)
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if name.startswith(prefixes) and isinstance(m, (nn.Linear, *_CONVS))
    ]
    for _, m in targets:
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
        pair = _adapter(m, rank)
        if pair is None:
            continue
        down, up = pair
        nn.init.zeros_(up.weight)
        ref = next(m.parameters())
        m.lora_down = down.to(ref.device)
        m.lora_up = up.to(ref.device)
        m.lora_scale = scale
        m.register_forward_hook(_add_lora)
    for name, p in model.named_parameters():  # non-Linear/Conv parameters there too
        if name.startswith(prefixes) and ".lora_" not in name:
            p.requires_grad_(False)
    return sum(1 for _, m in targets if hasattr(m, "lora_down"))
