"""One LoRA adapter in canonical form, and the checks that it fits a UNet.

Whatever layout a file uses (realcustom/lora/formats.py), an adapter becomes one `LoRAModule` per
targeted UNet module, named by its diffusers module path (`down_blocks.1.attentions.0.proj_in`):
`down` (A, [r, in] or a conv kernel [r, in, kh, kw]), `up` (B, [out, r] or [out, r, 1, 1]) and
`scale` (alpha / r, or alpha / √r for rank-stabilised LoRA), so the module's output gains
`scale · B(A(x))` at adapter scale 1. A module's weight delta is `scale · B @ A`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

# Dtypes an adapter file may store its weights in (they are cast to the model's dtype when used).
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LoRAError(ValueError):
    """An adapter that cannot be used; the message names the file, the key or module and what is wrong."""


@dataclass(frozen=True)
class LoRAModule:
    down: torch.Tensor  # A: [r, in] (linear) or [r, in, kh, kw] (conv)
    up: torch.Tensor  # B: [out, r] (linear) or [out, r, 1, 1] (conv)
    scale: float  # alpha / r

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The weight delta scale · B @ A in the layout of the module's weight (float32)."""
        down, up = self.down.float(), self.up.float()
        product = up.flatten(1) @ down.flatten(1)  # [out, in·kh·kw]
        return self.scale * product.view(up.shape[0], *down.shape[1:])


@dataclass
class LoRAAdapter:
    """A LoRA adapter of a UNet: per targeted module, its A, B and alpha/rank scale."""

    name: str
    modules: dict[str, LoRAModule]
    source: str = ""
    layout: str = ""  # the file's key layout: peft, diffusers-legacy, kohya
    skipped: dict[str, int] = field(default_factory=dict)  # keys deliberately not loaded, by reason

    @property
    def rank(self) -> int:
        return max(module.rank for module in self.modules.values())

    @property
    def targets(self) -> list[str]:
        return sorted(self.modules)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "rank": self.rank,
            "modules": len(self.modules),
            "targets": self.targets,
            "layout": self.layout,
            "source": self.source,
        }


def check_adapter(adapter: LoRAAdapter, unet: nn.Module, max_rank: int | None = None) -> None:
    """Every module exists in `unet` (a diffusers UNet2DConditionModel) as a Linear or Conv2d whose
    shapes match A and B; weights are floating point and finite; ranks are within `max_rank`."""
    where = f"LoRA {adapter.name!r} ({adapter.source or 'in memory'})"
    if not adapter.modules:
        raise LoRAError(f"{where} has no UNet weights")
    modules = dict(unet.named_modules())
    for name, lora in adapter.modules.items():
        target = modules.get(name)
        if target is None:
            raise LoRAError(f"{where} targets {name!r}, which this UNet does not have (another base model?)")
        for part, tensor in (("down", lora.down), ("up", lora.up)):
            if tensor.dtype not in WEIGHT_DTYPES:
                raise LoRAError(
                    f"{where}: {name} {part} weights are {tensor.dtype}; use float32/16 or bfloat16"
                )
            if not torch.isfinite(tensor).all():
                raise LoRAError(f"{where}: {name} {part} weights hold NaN or infinite values")
        if not math.isfinite(lora.scale):
            raise LoRAError(f"{where}: {name} has a non-finite alpha/rank scale {lora.scale}")
        rank = lora.rank
        if rank < 1 or lora.up.shape[1] != rank:
            raise LoRAError(
                f"{where}: {name} A has rank {rank} but B {tuple(lora.up.shape)} expects {lora.up.shape[1]}"
            )
        if max_rank is not None and rank > max_rank:
            raise LoRAError(f"{where}: {name} has rank {rank}, above the largest served rank {max_rank}")
        _check_shapes(where, name, target, lora)


def _check_shapes(where: str, name: str, target: nn.Module, lora: LoRAModule) -> None:
    if isinstance(target, nn.Linear):
        expected_down = (lora.rank, target.in_features)
        expected_up = (target.out_features, lora.rank)
    elif isinstance(target, nn.Conv2d):
        if target.groups != 1:
            raise LoRAError(f"{where}: {name} is a grouped convolution, which LoRA cannot target here")
        expected_down = (lora.rank, target.in_channels, *target.kernel_size)
        expected_up = (target.out_channels, lora.rank, 1, 1)
    else:
        raise LoRAError(f"{where}: {name} is a {type(target).__name__}, not a Linear or Conv2d layer")
    if tuple(lora.down.shape) != expected_down or tuple(lora.up.shape) != expected_up:
        raise LoRAError(
            f"{where}: {name} shapes A {tuple(lora.down.shape)}, B {tuple(lora.up.shape)} do not fit the "
            f"layer (expected A {expected_down}, B {expected_up}): an adapter of another base model?"
        )
