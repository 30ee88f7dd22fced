"""Per-row LoRA deltas on a UNet's Linear and Conv2d layers (Punica-style batched gather).

A targeted layer keeps its weights and gains two non-persistent buffers (so state dicts, names and
types stay those of the stock layer) with one entry per slot of the adapter bank: `lora_down`
[slots, R, in(, kh, kw)] (A) and `lora_up` [slots, R, out] (Bᵀ with the adapter's alpha/rank scale
folded in; ranks below R are zero-padded, which adds exact zeros). A forward hook adds the delta.
For a call on n rows, `RowSelection` holds `index` [n, K] (the slot of each of a row's K adapter
positions) and `scale` [n, K] (its user scale; 0 leaves a position unused):

    y_b = layer(x_b) + Σ_k scale[b, k] · B_{index[b, k]} A_{index[b, k]} x_b

as two batched matmuls over the K·R gathered ranks of each row (a grouped convolution with the
layer's kernel, stride and padding for a conv layer's A). Nothing depends on the host: the gather
reads device tensors, so a captured graph serves any mix of adapters, and loading an adapter only
rewrites one slot of the buffers in place.

The row of every targeted layer's input is the UNet call's batch index (true of every Linear and
Conv2d of a diffusers UNet: attention projections see [n, tokens, C], convolutions [n, C, h, w],
embeddings [n, C]); a mismatch is an error, never a silent broadcast.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RowSelection:
    """The adapters of each row of the UNet call in progress (None: no adapters in this call)."""

    index: torch.Tensor | None = None  # [n, K] int64 slots
    scale: torch.Tensor | None = None  # [n, K] float32 user scales

    @contextmanager
    def selected(self, index: torch.Tensor | None, scale: torch.Tensor | None) -> Iterator[None]:
        self.index, self.scale = index, scale
        try:
            yield
        finally:
            self.index = self.scale = None


def add_slots(layer: nn.Module, slots: int, rank: int, dtype: torch.dtype | None = None) -> None:
    """Give a Linear or Conv2d layer its zeroed slot buffers (in the layer's dtype by default)."""
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        down_shape, out = (layer.in_features,), layer.out_features
    elif isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise ValueError("row LoRA takes plain convolutions only (groups 1, zero padding)")
        down_shape, out = (layer.in_channels, *layer.kernel_size), layer.out_channels
    else:
        raise TypeError(f"row LoRA targets Linear and Conv2d layers, not {type(layer).__name__}")
    options = {"dtype": dtype or weight.dtype, "device": weight.device}
    layer.register_buffer("lora_down", torch.zeros(slots, rank, *down_shape, **options), persistent=False)
    layer.register_buffer("lora_up", torch.zeros(slots, rank, out, **options), persistent=False)


def write_slot(layer: nn.Module, slot: int, down: torch.Tensor | None, up: torch.Tensor | None, scale: float):
    """Slot `slot` of `layer` becomes one adapter's A and scale·Bᵀ (zero-padded), or zeros."""
    layer.lora_down[slot].zero_()
    layer.lora_up[slot].zero_()
    if down is None:
        return
    rank = down.shape[0]
    layer.lora_down[slot, :rank] = down.to(layer.lora_down.dtype)
    layer.lora_up[slot, :rank] = (up.float().flatten(1).t() * scale).to(layer.lora_up.dtype)


class RowLoRAHook:
    """Forward hook of one targeted layer: output + each row's LoRA delta."""

    def __init__(self, selection: RowSelection):
        self.selection = selection

    def __call__(self, layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        selection = self.selection
        if selection.index is None:
            return output
        x = args[0]
        rows, rank = x.shape[0], layer.lora_down.shape[1]
        if selection.index.shape[0] != rows:
            raise ValueError(
                f"{rows} rows reach a LoRA layer but {selection.index.shape[0]} rows have adapters"
            )
        # (slots kept in another dtype, e.g. fp32 for TensorRT, are cast to the layer's)
        down = layer.lora_down[selection.index].flatten(1, 2).to(x.dtype)  # [n, K·R, in(, kh, kw)]
        up = layer.lora_up[selection.index].flatten(1, 2).to(x.dtype)  # [n, K·R, out]
        scale = selection.scale.to(up.dtype).repeat_interleave(rank, dim=1)  # [n, K·R]
        if isinstance(layer, nn.Conv2d):
            # Every row's A as one grouped convolution: groups = rows, K·R output channels each.
            hidden = F.conv2d(
                x.reshape(1, -1, *x.shape[2:]),
                down.flatten(0, 1),
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=rows,
            ).view(rows, down.shape[1], -1)  # [n, K·R, h·w]
            delta = torch.bmm(up.transpose(1, 2), hidden * scale.unsqueeze(-1))  # [n, out, h·w]
        else:
            flat = x.reshape(rows, -1, x.shape[-1])  # [n, tokens, in]
            hidden = torch.bmm(flat, down.transpose(1, 2)) * scale.unsqueeze(1)  # [n, tokens, K·R]
            delta = torch.bmm(hidden, up)  # [n, tokens, out]
        return output + delta.view(output.shape)
