"""Samplers: the official single-step DPM-Solver++ and DDIM, plus diffusers schedulers as options.

The official DPM-Solver++ is not any stock diffusers scheduler: timesteps are "trailing"
(999, 959, ..., 39 for 25 steps), the per-step order is 1,1,2,1,2,... (an order-2 step restarts
from the sample saved at the preceding order-1 step, which was only a midpoint), and the last step
targets ᾱ at timestep 0. The image is decoded from the last step's x̂₀ prediction, which every
sampler here returns.

All schedulers share one interface: `timesteps` (int64 [S]), `step(k, eps, sample) -> (sample, x0)`
and `final_latents(sample, x0)` (what the VAE decodes). Coefficients are precomputed per step so a
step is a few tensor operations with no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SCHEDULERS = ("dpm", "ddim", "diffusers-dpm", "diffusers-euler", "diffusers-ddim")


@dataclass(frozen=True)
class NoiseSchedule:
    """SD/SDXL training schedule: "squared_linear" (diffusers' scaled_linear) betas, ε-prediction."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def alphas_cumprod(self) -> torch.Tensor:
        betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_train_timesteps) ** 2
        return torch.cumprod(1.0 - betas, dim=0)

    def trailing_timesteps(self, num_steps: int) -> torch.Tensor:
        steps = np.arange(self.num_train_timesteps - 1, -1, -self.num_train_timesteps / num_steps).round()
        return torch.from_numpy(steps.astype(np.int64))


def _check_steps(num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_steps}")


class OfficialDPMSolver:
    """Single-step DPM-Solver++ (order 2, midpoint), exactly as the official sampler steps."""

    def __init__(self, num_steps: int, schedule: NoiseSchedule | None = None):
        _check_steps(num_steps)
        schedule = schedule or NoiseSchedule()
        acp = schedule.alphas_cumprod()
        self.timesteps = schedule.trailing_timesteps(num_steps)
        self.orders = [1] + [(i % 2) + 1 for i in range(num_steps - 1)]
        # Step k moves from t_k to t_{k+1}; after the last step the target is timestep 0.
        targets = [*self.timesteps[1:].tolist(), 0]
        alpha = acp.sqrt()
        sigma = (1 - acp).sqrt()
        lam = alpha.log() - sigma.log()
        self._alpha = [alpha[t] for t in self.timesteps.tolist()]
        self._sigma = [sigma[t] for t in self.timesteps.tolist()]
        self._coefficients = []
        for k, order in enumerate(self.orders):
            t, t_next = int(self.timesteps[k]), targets[k]
            source = int(self.timesteps[k - 1]) if order == 2 else t
            h = lam[t_next] - lam[source]
            phi = torch.exp(-h) - 1
            coefficient = {"keep": sigma[t_next] / sigma[source], "x0": -alpha[t_next] * phi}
            if order == 2:
                coefficient["r0"] = (lam[t] - lam[source]) / h
            self._coefficients.append(coefficient)
        self._anchor: torch.Tensor | None = None
        self._anchor_x0: torch.Tensor | None = None

    def step(self, k: int, eps: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = (sample - self._sigma[k] * eps) / self._alpha[k]
        c = self._coefficients[k]
        if self.orders[k] == 1:
            self._anchor, self._anchor_x0 = sample, x0
            return c["keep"] * sample + c["x0"] * x0, x0
        d1 = (x0 - self._anchor_x0) / c["r0"]
        out = c["keep"] * self._anchor + c["x0"] * self._anchor_x0 + 0.5 * c["x0"] * d1
        return out, x0

    def final_latents(self, sample: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return x0


class DDIM:
    """DDIM with η = 0 on trailing timesteps; the last step targets ᾱ = 1, so it lands on x̂₀."""

    def __init__(self, num_steps: int, schedule: NoiseSchedule | None = None):
        _check_steps(num_steps)
        schedule = schedule or NoiseSchedule()
        acp = schedule.alphas_cumprod()
        self.timesteps = schedule.trailing_timesteps(num_steps)
        current = [acp[t] for t in self.timesteps.tolist()]
        following = [*current[1:], torch.tensor(1.0)]
        self._coefficients = [
            (a.sqrt(), (1 - a).sqrt(), b.sqrt(), (1 - b).sqrt())
            for a, b in zip(current, following, strict=True)
        ]

    def step(self, k: int, eps: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma, alpha_next, sigma_next = self._coefficients[k]
        x0 = (sample - sigma * eps) / alpha
        return alpha_next * x0 + sigma_next * eps, x0

    def final_latents(self, sample: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return x0


class DiffusersScheduler:
    """A stock diffusers scheduler behind the same interface; decodes the final sample, as diffusers does."""

    def __init__(self, name: str, num_steps: int, schedule: NoiseSchedule | None = None):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

        _check_steps(num_steps)
        schedule = schedule or NoiseSchedule()
        classes = {
            "diffusers-dpm": DPMSolverMultistepScheduler,
            "diffusers-euler": EulerDiscreteScheduler,
            "diffusers-ddim": DDIMScheduler,
        }
        self._scheduler = classes[name](
            num_train_timesteps=schedule.num_train_timesteps,
            beta_start=schedule.beta_start,
            beta_end=schedule.beta_end,
            beta_schedule="scaled_linear",
            timestep_spacing="trailing",
        )
        self._scheduler.set_timesteps(num_steps)
        self.timesteps = self._scheduler.timesteps.to(torch.int64)
        self.init_noise_sigma = float(self._scheduler.init_noise_sigma)

    def scale_model_input(self, sample: torch.Tensor, k: int) -> torch.Tensor:
        return self._scheduler.scale_model_input(sample, self._scheduler.timesteps[k])

    def step(self, k: int, eps: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self._scheduler.step(eps, self._scheduler.timesteps[k], sample)
        x0 = getattr(output, "pred_original_sample", None)
        return output.prev_sample, output.prev_sample if x0 is None else x0

    def final_latents(self, sample: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return sample


def make_scheduler(name: str, num_steps: int, schedule: NoiseSchedule | None = None):
    """Scheduler by name: `dpm` (official default), `ddim`, or a `diffusers-*` scheduler."""
    if name == "dpm":
        return OfficialDPMSolver(num_steps, schedule)
    if name == "ddim":
        return DDIM(num_steps, schedule)
    if name in SCHEDULERS:
        return DiffusersScheduler(name, num_steps, schedule)
    raise ValueError(f"unknown scheduler {name!r}; choose from {SCHEDULERS}")
