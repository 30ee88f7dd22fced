"""Exponential moving average of the trainable weights, kept in float32.

The released checkpoint's predecessor was named `RealCustom_0025000_ema_highres.pth`, so the
exported weights are the EMA ones when EMA is on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class TrainableEMA:
    """Shadow copies of named parameters; decay warmed up as min(decay, (1 + n) / (10 + n))."""

    def __init__(self, parameters: dict[str, nn.Parameter], decay: float):
        self.parameters = parameters
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in parameters.items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        for name, parameter in self.parameters.items():
            self.shadow[name].lerp_(parameter.detach().float(), 1 - decay)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights under their official names."""
        return {name: tensor.clone() for name, tensor in self.shadow.items()}

    def load_state_dict(self, shadow: dict[str, torch.Tensor], updates: int) -> None:
        if set(shadow) != set(self.shadow):
            raise ValueError("EMA state does not match the trainable weights")
        for name, tensor in shadow.items():
            self.shadow[name].copy_(tensor)
        self.updates = updates

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the model (for samples), then restore."""
        saved = {name: p.detach().clone() for name, p in self.parameters.items()}
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                parameter.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, parameter in self.parameters.items():
                    parameter.copy_(saved[name])
