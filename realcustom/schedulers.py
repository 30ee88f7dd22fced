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

from abc import ABC, abstractmethod
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


class TableScheduler(ABC):
    """A sampler whose step is a fixed formula over per-step coefficient tables.

    `tables()` holds every per-step value ([steps] tensors, float32 or bool) and `update` is the
    step's formula over values looked up from them, written once: the eager `step(k, ...)` reads
    row k of the tables (0-dim values), the device loop (realcustom/step.py) reads each batch row's
    own step of device copies of the tables ([B, 1, 1, 1] values). Same operations, same order, so
    both give identical values. `anchor`/`anchor_x0` are the sample and x̂₀ a multistep update
    restarts from (unused by single-state samplers).
    """

    timesteps: torch.Tensor

    def tables(self) -> dict[str, torch.Tensor]:
        return self._tables

    @staticmethod
    @abstractmethod
    def update(
        values: dict[str, torch.Tensor],
        eps: torch.Tensor,
        sample: torch.Tensor,
        anchor: torch.Tensor,
        anchor_x0: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(next sample, x̂₀, next anchor, next anchor x̂₀) from one step's table values."""

    def step(self, k: int, eps: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._anchor is None:
            self._anchor, self._anchor_x0 = torch.zeros_like(sample), torch.zeros_like(sample)
        values = {name: table[k] for name, table in self._tables.items()}
        sample, x0, self._anchor, self._anchor_x0 = self.update(
            values, eps, sample, self._anchor, self._anchor_x0
        )
        return sample, x0

    def final_latents(self, sample: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return x0


class OfficialDPMSolver(TableScheduler):
    """Single-step DPM-Solver++ (order 2, midpoint), exactly as the official sampler steps.

    Tables: `alpha`, `sigma` (of the step's timestep), `sample_coef` and `x0_coef` (the
    exponential-integrator weights of the source sample and of x̂₀), `midpoint_ratio` (r₀ of an
    order-2 step; 1 where unused) and `first_order`.
    """

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
        log_snr = alpha.log() - sigma.log()
        rows: dict[str, list[torch.Tensor]] = {
            "alpha": [],
            "sigma": [],
            "sample_coef": [],
            "x0_coef": [],
            "midpoint_ratio": [],
        }
        for k, order in enumerate(self.orders):
            t, t_next = int(self.timesteps[k]), targets[k]
            # An order-2 step restarts from the preceding (order-1) step's sample.
            source = int(self.timesteps[k - 1]) if order == 2 else t
            h = log_snr[t_next] - log_snr[source]
            rows["alpha"].append(alpha[t])
            rows["sigma"].append(sigma[t])
            rows["sample_coef"].append(sigma[t_next] / sigma[source])
            rows["x0_coef"].append(-alpha[t_next] * (torch.exp(-h) - 1))
            rows["midpoint_ratio"].append(
                (log_snr[t] - log_snr[source]) / h if order == 2 else torch.ones(())
            )
        self._tables = {name: torch.stack(values).float() for name, values in rows.items()}
        self._tables["first_order"] = torch.tensor([order == 1 for order in self.orders])
        self._anchor: torch.Tensor | None = None
        self._anchor_x0: torch.Tensor | None = None

    @staticmethod
    def update(values, eps, sample, anchor, anchor_x0):
        x0 = (sample - values["sigma"] * eps) / values["alpha"]
        sample_coef, x0_coef, first = values["sample_coef"], values["x0_coef"], values["first_order"]
        # Order 1: from the current sample, which becomes the anchor of the next (order-2) step.
        first_order = sample_coef * sample + x0_coef * x0
        # Order 2: restart from the anchor with the midpoint correction of x̂₀.
        slope = (x0 - anchor_x0) / values["midpoint_ratio"]
        second_order = sample_coef * anchor + x0_coef * anchor_x0 + 0.5 * x0_coef * slope
        return (
            torch.where(first, first_order, second_order),
            x0,
            torch.where(first, sample, anchor),
            torch.where(first, x0, anchor_x0),
        )


class DDIM(TableScheduler):
    """DDIM with η = 0 on trailing timesteps; the last step targets ᾱ = 1, so it lands on x̂₀.

    Tables: `alpha`, `sigma` of the step's timestep, `next_alpha`, `next_sigma` of its target.
    """

    def __init__(self, num_steps: int, schedule: NoiseSchedule | None = None):
        _check_steps(num_steps)
        schedule = schedule or NoiseSchedule()
        acp = schedule.alphas_cumprod()
        self.timesteps = schedule.trailing_timesteps(num_steps)
        current = torch.stack([acp[t] for t in self.timesteps.tolist()])
        following = torch.cat([current[1:], torch.ones(1)])
        self._tables = {
            "alpha": current.sqrt(),
            "sigma": (1 - current).sqrt(),
            "next_alpha": following.sqrt(),
            "next_sigma": (1 - following).sqrt(),
        }
        self._anchor: torch.Tensor | None = None
        self._anchor_x0: torch.Tensor | None = None

    @staticmethod
    def update(values, eps, sample, anchor, anchor_x0):
        x0 = (sample - values["sigma"] * eps) / values["alpha"]
        return values["next_alpha"] * x0 + values["next_sigma"] * eps, x0, anchor, anchor_x0


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
            # Stock DDIM clips x̂₀ to [-1, 1] by default, which is wrong for SD latents.
            **({"clip_sample": False} if name == "diffusers-ddim" else {}),
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


# Samplers whose step is a fixed formula over device tables (graph-capturable, per-row schedules).
TABLE_SCHEDULERS = {"dpm": OfficialDPMSolver, "ddim": DDIM}


def make_scheduler(name: str, num_steps: int, schedule: NoiseSchedule | None = None):
    """Scheduler by name: `dpm` (official default), `ddim`, or a `diffusers-*` scheduler."""
    if name == "dpm":
        return OfficialDPMSolver(num_steps, schedule)
    if name == "ddim":
        return DDIM(num_steps, schedule)
    if name in SCHEDULERS:
        return DiffusersScheduler(name, num_steps, schedule)
    raise ValueError(f"unknown scheduler {name!r}; choose from {SCHEDULERS}")
