"""The adapter bank: stacked LoRA slots on a UNet's targeted layers, and each row's choice of them.

`AdapterBank(unet, targets=..., slots=..., rank=..., per_row=...)` installs, once and before any
state is allocated or any step captured, slot buffers and a forward hook on every targeted layer
(realcustom/lora/layers.py). After that:

* `load(adapter)` writes an adapter into a free slot in place (A, and Bᵀ times alpha/rank,
  zero-padded to the bank's rank): captured graphs keep reading the same buffers, so a newly
  loaded adapter is used by the next step without recapture. `unload(name)` zeroes its slot,
  refused while requests hold it (`acquire`/`release`).
* `rows(choices)` turns each row's adapters (name, scale) into the per-row `index` [n, K] and
  `scale` [n, K] tensors the step carries in its `LoopState` (`Conditioning.lora_index/scale`
  when a request joins); a row with fewer than K adapters fills the rest with scale 0.

Slots are kept in the model's dtype, or in `dtype` (fp32 for TensorRT engines, whose inputs are
fp32). What a bank serves is fixed at construction: its target layers (an adapter touching any other
layer is refused with the layer's name), its rank R (ranks above R are refused; smaller ones are
zero-padded, so every row pays for R ranks per position), K adapters per row and the slot count.
Writing a slot while a step runs is safe only for a free slot (no row points at it); the worker
loads between steps. The bookkeeping (slots, holds) is guarded by a lock: requests acquire on a
preparation thread and release on the worker's event loop while the stepping thread loads.

`BankLayout` is what a deployment configures (targets, slots, rank, adapters per row); a runner
installs it on its UNet before any state is allocated or step captured (engines.runner.load_runner).
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from realcustom.lora.adapter import LoRAAdapter, LoRAError, check_adapter
from realcustom.lora.layers import RowLoRAHook, RowSelection, add_slots, write_slot
from realcustom.lora.requests import LoRAChoice, check_loras
from realcustom.unet import RealCustomUNet

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_TRANSFORMER = (*_ATTENTION, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
# Which layers a bank serves, by name: the attention projections (what most style LoRAs train),
# the whole transformer blocks (+ feed-forward and projections in/out: LCM-LoRA, most distilled
# adapters), or every Linear/Conv2d (LoCon-style adapters with resnet convolutions).
TARGET_KINDS = ("attention", "transformer", "all")
# RealCustom's own image projections: never LoRA targets (their K/V are computed once per request).
_NEVER = ("to_k_vision", "to_v_vision")


# Everything of a layer's name up to its block (what a listing shows: "attn1.to_q", "ff.net.0.proj").
_BLOCK_PATH = re.compile(r"^.*\.(?:transformer_blocks|attentions|resnets|downsamplers|upsamplers)\.\d+\.")


def module_kinds(names: Iterable[str]) -> list[str]:
    """The distinct layer kinds of module names, without their block path."""
    return sorted({_BLOCK_PATH.sub("", name) for name in names})


def target_layers(unet: nn.Module, kind: str) -> list[str]:
    """Names of the layers of a diffusers UNet that a bank of `kind` serves."""
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown LoRA target kind {kind!r}; choose from {TARGET_KINDS}")
    suffixes = {"attention": _ATTENTION, "transformer": _TRANSFORMER}.get(kind)
    names = []
    for name, module in unet.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d) or name.endswith(_NEVER):
            continue
        if suffixes is None or name.endswith(tuple("." + suffix for suffix in suffixes)):
            names.append(name)
    return names


@dataclass(frozen=True)
class BankLayout:
    """What a deployment serves: adapters on the `targets` layers (a kind of TARGET_KINDS), `slots`
    loaded at once, ranks up to `rank`, up to `per_row` adapters per request."""

    targets: str = "transformer"
    slots: int = 8
    rank: int = 64
    per_row: int = 4

    def install(self, unet: RealCustomUNet, dtype: torch.dtype | None = None) -> AdapterBank:
        return AdapterBank(
            unet, targets=self.targets, slots=self.slots, rank=self.rank, per_row=self.per_row, dtype=dtype
        )


class AdapterBank:
    """LoRA slots on a RealCustomUNet's targeted layers (see the module docstring)."""

    def __init__(
        self,
        unet: RealCustomUNet,
        *,
        targets: str | Iterable[str] = "transformer",
        slots: int = 8,
        rank: int = 64,
        per_row: int = 4,
        dtype: torch.dtype | None = None,
    ):
        if getattr(unet, "adapters", None) is not None:
            raise ValueError("this UNet already has an adapter bank")
        if min(slots, rank, per_row) < 1:
            raise ValueError("slots, rank and per_row must be at least 1")
        self.unet, self.rank, self.per_row = unet, rank, per_row
        names = target_layers(unet.unet, targets) if isinstance(targets, str) else sorted(set(targets))
        if not names:
            raise ValueError("no layer to serve LoRA on: name at least one Linear or Conv2d layer")
        modules = dict(unet.unet.named_modules())
        missing = [name for name in names if name not in modules]
        if missing:
            raise ValueError(f"the UNet has no layer {missing[0]!r}")
        self.selection = RowSelection()
        self.layers: dict[str, nn.Module] = {}
        self._hooks = []
        for name in names:
            layer = modules[name]
            add_slots(layer, slots, rank, dtype)
            self._hooks.append(layer.register_forward_hook(RowLoRAHook(self.selection)))
            self.layers[name] = layer
        self.targets = targets if isinstance(targets, str) else "custom"
        self.slots: list[str | None] = [None] * slots
        self.adapters: dict[str, LoRAAdapter] = {}
        self.holds: Counter[str] = Counter()
        self._lock = threading.Lock()
        unet.adapters = self

    # ---- slots ----------------------------------------------------------------------------------

    @torch.no_grad()
    def load(self, adapter: LoRAAdapter) -> int:
        """Put `adapter` into a free slot (in place) and return the slot."""
        if adapter.name in self.adapters:
            raise LoRAError(f"an adapter named {adapter.name!r} is already loaded; unload it first")
        outside = sorted(set(adapter.modules) - set(self.layers))
        if outside:
            raise LoRAError(
                f"LoRA {adapter.name!r} targets {len(outside)} layers this bank does not serve (e.g. "
                f"{outside[0]!r}); serve them with a bank on more targets (kinds {TARGET_KINDS})"
            )
        check_adapter(adapter, self.unet.unet, max_rank=self.rank)
        with self._lock:
            if None not in self.slots:
                raise LoRAError(f"all {len(self.slots)} adapter slots are taken; unload one first")
            slot = self.slots.index(None)
            self.slots[slot] = adapter.name  # reserved; rows cannot name it before it is in `adapters`
        try:
            for name, layer in self.layers.items():
                module = adapter.modules.get(name)
                if module is None:
                    write_slot(layer, slot, None, None, 0.0)
                else:
                    write_slot(layer, slot, module.down, module.up, module.scale)
        except BaseException:
            with self._lock:
                self.slots[slot] = None
            raise
        with self._lock:
            self.adapters[adapter.name] = adapter
        return slot

    @torch.no_grad()
    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self.adapters:
                raise LoRAError(f"no adapter {name!r} is loaded")
            if self.holds[name]:
                raise LoRAError(
                    f"adapter {name!r} is used by {self.holds[name]} running request(s); try again later"
                )
            slot = self.slots.index(name)
            del self.adapters[name]  # no new request can hold it from here on
        for layer in self.layers.values():
            write_slot(layer, slot, None, None, 0.0)
        with self._lock:
            self.slots[slot] = None

    def detach(self) -> None:
        """Take the bank off the UNet: hooks and slot buffers removed, the stock UNet again (states
        and graphs made with the bank must not be used after this)."""
        if self.holds:
            raise LoRAError(f"adapters {sorted(self.holds)} are held by running requests")
        for hook in self._hooks:
            hook.remove()
        for layer in self.layers.values():
            del layer.lora_down, layer.lora_up
        self.unet.adapters = None
        self.layers, self.adapters, self._hooks = {}, {}, []

    def describe(self) -> list[dict]:
        """What is loaded (for listings): name, rank, targeted layers and their kinds, source, slot."""
        with self._lock:
            loaded = list(self.adapters.items())
            return [
                {**adapter.describe(), "kinds": module_kinds(adapter.modules), "slot": self.slots.index(name)}
                for name, adapter in loaded
            ]

    def held(self, name: str) -> bool:
        with self._lock:
            return self.holds[name] > 0

    # ---- requests -------------------------------------------------------------------------------

    def acquire(self, choices: Sequence[LoRAChoice]) -> None:
        """A request holds its adapters from preparation to its end (they cannot be unloaded)."""
        with self._lock:
            self._check(choices)
            self.holds.update(choice.name for choice in choices)

    def release(self, choices: Sequence[LoRAChoice]) -> None:
        with self._lock:
            self.holds.subtract(choice.name for choice in choices)
            self.holds += Counter()  # drop names no longer held

    def rows(self, choices: Sequence[Sequence[LoRAChoice]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row slot index [n, K] (int64) and scale [n, K] (float32), on the UNet's device."""
        index = torch.zeros(len(choices), self.per_row, dtype=torch.int64)
        scale = torch.zeros(len(choices), self.per_row, dtype=torch.float32)
        with self._lock:
            for row, row_choices in enumerate(choices):
                self._check(row_choices)
                for position, choice in enumerate(row_choices):
                    index[row, position] = self.slots.index(choice.name)
                    scale[row, position] = choice.scale
        device = next(iter(self.layers.values())).lora_down.device
        return index.to(device), scale.to(device)

    def _check(self, choices: Sequence[LoRAChoice]) -> None:
        check_loras(choices, self.per_row, served=self.adapters)
