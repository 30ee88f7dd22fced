"""Samplers: the official single-step DPM-Solver++ and DDIM, the few-step samplers distilled
adapters need (trailing Euler, LCM, TCD), plus diffusers schedulers as options.

The official DPM-Solver++ is not any stock diffusers scheduler: timesteps are "trailing"
(999, 959, ..., 39 for 25 steps), the per-step order is 1,1,2,1,2,... (an order-2 step restarts
from the sample saved at the preceding order-1 step, which was only a midpoint), and the last step
targets ᾱ at timestep 0. The image is decoded from the last step's x̂₀ prediction, which every
sampler here returns.

All schedulers share one interface: `timesteps` (int64 [S]), `step(k, eps, sample) -> (sample, x0)`
and `final_latents(sample, x0)` (what the VAE decodes). Coefficients are precomputed per step so a
step is a few tensor operations with no host synchronisation.

The few-step samplers follow diffusers' classes operation for operation (tested step by step
against EulerDiscreteScheduler with trailing spacing, LCMScheduler and TCDScheduler): their x̂₀
output is what diffusers returns beside the sample (LCM's `denoised`, TCD's `pred_noised_sample`),
so the last step's x̂₀ is what a diffusers pipeline decodes. LCM and TCD add fresh noise after
every step but the last; that noise is an input (`noise`, drawn ahead from the request's seed,
realcustom/pipeline.py `prepare_step_noise`), so a step stays a fixed formula per row.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

SCHEDULERS = ("dpm", "ddim", "euler", "lcm", "tcd", "diffusers-dpm", "diffusers-euler", "diffusers-ddim")
# LCM and TCD pick their timesteps from a 50-step distillation schedule (diffusers'
# original_inference_steps): no loop of theirs has more steps.
DISTILLATION_STEPS = 50


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

    def distillation_timesteps(
        self, num_steps: int, original_steps: int = DISTILLATION_STEPS
    ) -> torch.Tensor:
        """LCM/TCD: `num_steps` evenly spaced indices into the descending `original_steps` schedule
        (k·i − 1 for i = 1..original_steps, k = num_train_timesteps // original_steps)."""
        if num_steps > original_steps:
            raise ValueError(f"at most {original_steps} steps on the distillation schedule, got {num_steps}")
        k = self.num_train_timesteps // original_steps
        origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
        indices = np.floor(np.linspace(0, original_steps, num=num_steps, endpoint=False)).astype(np.int64)
        return torch.from_numpy(origin[indices].astype(np.int64))


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
    # The initial sample is noise times this (1: the sample is x_t itself).
    init_noise_sigma = 1.0
    # Whether `update` adds fresh noise (then `noise` is that step's N(0, I) draw).
    stochastic = False
    # Tables `model_input` reads (none: the UNet sees the sample as it is).
    input_tables: tuple[str, ...] = ()
    _anchor: torch.Tensor | None = None
    _anchor_x0: torch.Tensor | None = None

    def tables(self) -> dict[str, torch.Tensor]:
        return self._tables

    @staticmethod
    def model_input(values: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        """What the UNet sees of the sample."""
        return sample

    @staticmethod
    @abstractmethod
    def update(
        values: dict[str, torch.Tensor],
        eps: torch.Tensor,
        sample: torch.Tensor,
        anchor: torch.Tensor,
        anchor_x0: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(next sample, x̂₀, next anchor, next anchor x̂₀) from one step's table values."""

    def scale_model_input(self, sample: torch.Tensor, k: int) -> torch.Tensor:
        return self.model_input({name: self._tables[name][k] for name in self.input_tables}, sample)

    def step(
        self, k: int, eps: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stochastic and noise is None:
            raise ValueError(f"{type(self).__name__} adds noise at every step: pass that step's noise")
        if self._anchor is None:
            self._anchor, self._anchor_x0 = torch.zeros_like(sample), torch.zeros_like(sample)
        values = {name: table[k] for name, table in self._tables.items()}
        sample, x0, self._anchor, self._anchor_x0 = self.update(
            values, eps, sample, self._anchor, self._anchor_x0, noise
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

    @staticmethod
    def update(values, eps, sample, anchor, anchor_x0, noise=None):
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

    @staticmethod
    def update(values, eps, sample, anchor, anchor_x0, noise=None):
        x0 = (sample - values["sigma"] * eps) / values["alpha"]
        return values["next_alpha"] * x0 + values["next_sigma"] * eps, x0, anchor, anchor_x0


class EulerTrailing(TableScheduler):
    """Euler on trailing timesteps, as diffusers' EulerDiscreteScheduler(timestep_spacing="trailing")
    steps it (ε-prediction, no churn): what SDXL-Lightning's authors prescribe.

    The sample lives in σ-space, x̃ = x_t / α_t with σ̃ = σ_t / α_t, and starts as noise times
    σ̃ at timestep 999 (diffusers' init_noise_sigma for trailing spacing); the UNet sees
    x̃ / √(σ̃² + 1). A step: x̂₀ = x̃ − σ̃ ε, x̃' = x̃ + (x̃ − x̂₀)/σ̃ · (σ̃' − σ̃), with σ̃ = 0
    after the last step. In exact arithmetic this is DDIM (η = 0) on the same timesteps, apart
    from the initial scale. Tables: `sigma`, `step_size` (σ̃' − σ̃), `input_divisor` (√(σ̃² + 1)).
    """

    input_tables = ("input_divisor",)

    def __init__(self, num_steps: int, schedule: NoiseSchedule | None = None):
        _check_steps(num_steps)
        schedule = schedule or NoiseSchedule()
        acp = schedule.alphas_cumprod()
        all_sigmas = ((1 - acp) / acp) ** 0.5  # float32, as diffusers computes them
        self.timesteps = schedule.trailing_timesteps(num_steps)
        sigmas = torch.cat([all_sigmas[self.timesteps], torch.zeros(1)])
        self.init_noise_sigma = float(all_sigmas[schedule.num_train_timesteps - 1])
        self._tables = {
            "sigma": sigmas[:-1],
            "step_size": sigmas[1:] - sigmas[:-1],
            "input_divisor": (sigmas[:-1] ** 2 + 1) ** 0.5,
        }

    @staticmethod
    def model_input(values, sample):
        return sample / values["input_divisor"]

    @staticmethod
    def update(values, eps, sample, anchor, anchor_x0, noise=None):
        sigma = values["sigma"]
        x0 = sample - sigma * eps
        derivative = (sample - x0) / sigma
        return sample + derivative * values["step_size"], x0, anchor, anchor_x0


def _custom_timesteps(
    timesteps, num_steps: int, schedule: NoiseSchedule, original_steps: int
) -> torch.Tensor:
    values = [int(t) for t in timesteps]
    if len(values) != num_steps:
        raise ValueError(f"{len(values)} timesteps given for a {num_steps}-step loop")
    if num_steps > original_steps:
        raise ValueError(f"at most {original_steps} timesteps, got {num_steps}")
    if any(b >= a for a, b in itertools.pairwise(values)) or not values[-1] >= 0:
        raise ValueError(f"timesteps must be strictly descending and non-negative, got {values}")
    if values[0] >= schedule.num_train_timesteps:
        raise ValueError(f"timesteps must be below {schedule.num_train_timesteps}, got {values[0]}")
    return torch.tensor(values, dtype=torch.int64)


def _distillation_steps(
    num_steps: int, schedule: NoiseSchedule | None, timesteps
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ of the schedule, the steps' timesteps) of a sampler on the 50-step distillation grid:
    evenly spaced on it, or the given ones."""
    _check_steps(num_steps)
    schedule = schedule or NoiseSchedule()
    if timesteps is None:
        return schedule.alphas_cumprod(), schedule.distillation_timesteps(num_steps)
    return schedule.alphas_cumprod(), _custom_timesteps(timesteps, num_steps, schedule, DISTILLATION_STEPS)


class LCM(TableScheduler):
    """Latent Consistency Model sampling, as diffusers' LCMScheduler steps it (ε-prediction).

    x̂₀ = (x − σ_t ε)/α_t, then the consistency boundary condition denoised = c_out·x̂₀ + c_skip·x
    (c_skip = σ_d²/((10t)² + σ_d²), c_out = 10t/√((10t)² + σ_d²), σ_d = 0.5); the next sample is
    α_prev·denoised + σ_prev·noise, and the last step returns denoised itself. Timesteps: evenly
    spaced on the 50-step distillation schedule (999, 759, 499, 259 for 4 steps), or given
    (DMD2 uses 999, 749, 499, 249). Tables: `alpha`, `sigma`, `c_skip`, `c_out`, `next_alpha`,
    `next_sigma` (1 and 0 on the last step).
    """

    stochastic = True
    max_steps = DISTILLATION_STEPS

    def __init__(self, num_steps: int, schedule: NoiseSchedule | None = None, timesteps=None):
        acp, self.timesteps = _distillation_steps(num_steps, schedule, timesteps)
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in _LCM_TABLES}
        for k, t in enumerate(self.timesteps):
            alpha_prod = acp[t]
            scaled = t * 10.0
            rows["alpha"].append(alpha_prod.sqrt())
            rows["sigma"].append((1 - alpha_prod).sqrt())
            rows["c_skip"].append(0.25 / (scaled**2 + 0.25))
            rows["c_out"].append(scaled / (scaled**2 + 0.25) ** 0.5)
            if k + 1 < num_steps:
                previous = acp[self.timesteps[k + 1]]
                rows["next_alpha"].append(previous.sqrt())
                rows["next_sigma"].append((1 - previous).sqrt())
            else:  # the last step returns denoised
                rows["next_alpha"].append(torch.ones(()))
                rows["next_sigma"].append(torch.zeros(()))
        self._tables = {name: torch.stack(values).float() for name, values in rows.items()}

    @staticmethod
    def update(values, eps, sample, anchor, anchor_x0, noise=None):
        x0 = (sample - values["sigma"] * eps) / values["alpha"]
        denoised = values["c_out"] * x0 + values["c_skip"] * sample
        return values["next_alpha"] * denoised + values["next_sigma"] * noise, denoised, anchor, anchor_x0


_LCM_TABLES = ("alpha", "sigma", "c_skip", "c_out", "next_alpha", "next_sigma")


class TCD(TableScheduler):
    """Trajectory Consistency Distillation sampling, as diffusers' TCDScheduler steps it
    (ε-prediction, stochasticity γ = `eta`, 0.3 by default).

    With s = ⌊(1 − γ)·t_prev⌋ (t_prev = 0 after the last step): x̂₀ = (x − σ_t ε)/α_t, the
    predicted noised sample x_s = α_s x̂₀ + σ_s ε, and the next sample √(ᾱ_prev/ᾱ_s)·x_s +
    √(1 − ᾱ_prev/ᾱ_s)·noise (x_s itself on the last step or with γ = 0). x_s is the step's x̂₀
    output: the last one is what diffusers decodes. Tables: `alpha`, `sigma`, `s_alpha`,
    `s_sigma`, `keep` and `renoise` (the two coefficients of the next sample).
    """

    stochastic = True
    max_steps = DISTILLATION_STEPS

    def __init__(
        self, num_steps: int, schedule: NoiseSchedule | None = None, timesteps=None, eta: float = 0.3
    ):
        if not 0 <= eta <= 1:
            raise ValueError(f"TCD's eta (gamma) must be in [0, 1], got {eta}")
        acp, self.timesteps = _distillation_steps(num_steps, schedule, timesteps)
        self.eta = eta
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in ("alpha", "sigma", "s_alpha", "s_sigma")}
        rows.update(keep=[], renoise=[])
        for k, t in enumerate(self.timesteps):
            last = k + 1 == num_steps
            previous = torch.tensor(0) if last else self.timesteps[k + 1]
            s = torch.floor((1 - eta) * previous).to(torch.long)
            alpha_prod, alpha_prod_s = acp[t], acp[s]
            rows["alpha"].append(alpha_prod.sqrt())
            rows["sigma"].append((1 - alpha_prod).sqrt())
            rows["s_alpha"].append(alpha_prod_s.sqrt())
            rows["s_sigma"].append((1 - alpha_prod_s).sqrt())
            if eta > 0 and not last:
                ratio = acp[previous] / alpha_prod_s
                rows["keep"].append(ratio.sqrt())
                rows["renoise"].append((1 - ratio).sqrt())
            else:
                rows["keep"].append(torch.ones(()))
                rows["renoise"].append(torch.zeros(()))
        self._tables = {name: torch.stack(values).float() for name, values in rows.items()}

    @staticmethod
    def update(values, eps, sample, anchor, anchor_x0, noise=None):
        x0 = (sample - values["sigma"] * eps) / values["alpha"]
        noised = values["s_alpha"] * x0 + values["s_sigma"] * eps
        return values["keep"] * noised + values["renoise"] * noise, noised, anchor, anchor_x0


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
TABLE_SCHEDULERS = {"dpm": OfficialDPMSolver, "ddim": DDIM, "euler": EulerTrailing, "lcm": LCM, "tcd": TCD}
# Options a sampler takes beyond its step count (custom timesteps, TCD's eta).
SCHEDULER_OPTIONS = {"lcm": ("timesteps",), "tcd": ("timesteps", "eta")}


def make_scheduler(name: str, num_steps: int, schedule: NoiseSchedule | None = None, **options):
    """Scheduler by name: `dpm` (official default), `ddim`, `euler`, `lcm`, `tcd`, or a `diffusers-*`
    scheduler; `options` (`timesteps`, `eta`) only where SCHEDULER_OPTIONS allows them."""
    options = {key: value for key, value in options.items() if value is not None}
    unknown = set(options) - set(SCHEDULER_OPTIONS.get(name, ()))
    if unknown:
        raise ValueError(f"scheduler {name!r} takes no {sorted(unknown)} option")
    if name in TABLE_SCHEDULERS:
        return TABLE_SCHEDULERS[name](num_steps, schedule, **options)
    if name in SCHEDULERS:
        return DiffusersScheduler(name, num_steps, schedule)
    raise ValueError(f"unknown scheduler {name!r}; choose from {SCHEDULERS}")
