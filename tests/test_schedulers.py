"""Schedules at their smallest: one step (from pure noise straight to the image) and zero steps."""

from __future__ import annotations

import pytest
import torch

from realcustom.schedulers import SCHEDULERS, NoiseSchedule, make_scheduler


def noise_and_eps(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator) * getattr(scheduler, "init_noise_sigma", 1.0)
    return sample, torch.randn(2, 4, 8, 8, generator=generator)


def clean_estimate(sample: torch.Tensor, eps: torch.Tensor, timestep: int) -> torch.Tensor:
    """x̂₀ = (z − σ_t ε) / α_t, in float64."""
    alphas_cumprod = NoiseSchedule().alphas_cumprod().double()[timestep]
    return (sample.double() - (1 - alphas_cumprod).sqrt() * eps.double()) / alphas_cumprod.sqrt()


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_zero_steps_is_a_clear_error(kind: str) -> None:
    with pytest.raises(ValueError, match="at least 1, got 0"):
        make_scheduler(kind, 0)


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_one_step_starts_from_pure_noise_and_decodes_its_clean_estimate(kind: str) -> None:
    scheduler = make_scheduler(kind, 1)
    assert scheduler.timesteps.tolist() == [999]  # trailing: the one step is at the last training timestep
    sample, eps = noise_and_eps(scheduler)
    if hasattr(scheduler, "scale_model_input"):
        assert torch.isfinite(scheduler.scale_model_input(sample, 0)).all()
    # A stochastic sampler's last step adds no noise (LCM, TCD): its draw must not matter.
    noise = {"noise": torch.full_like(sample, 1e3)} if getattr(scheduler, "stochastic", False) else {}
    after, x0 = scheduler.step(0, eps, sample, **noise)
    final = scheduler.final_latents(after, x0)
    assert final.shape == sample.shape and torch.isfinite(final).all()
    # Nothing is left to denoise: what gets decoded is the step's own x̂₀.
    torch.testing.assert_close(final, x0, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["dpm", "ddim", "diffusers-dpm", "diffusers-ddim"])
def test_one_step_epsilon_samplers_decode_the_t999_clean_estimate(kind: str) -> None:
    scheduler = make_scheduler(kind, 1)
    sample, eps = noise_and_eps(scheduler)
    after, x0 = scheduler.step(0, eps, sample)
    expected = clean_estimate(sample, eps, 999)
    torch.testing.assert_close(scheduler.final_latents(after, x0).double(), expected, rtol=1e-5, atol=1e-4)


def test_one_step_dpm_is_order_one_and_targets_timestep_zero() -> None:
    """The official last step targets ᾱ at timestep 0 (1 − β₀, not 1): its sample is not x̂₀."""
    scheduler = make_scheduler("dpm", 1)
    assert scheduler.orders == [1]
    sample, eps = noise_and_eps(scheduler)
    after, x0 = scheduler.step(0, eps, sample)
    alphas_cumprod = NoiseSchedule().alphas_cumprod().double()
    alpha, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    h = (alpha[0] / sigma[0]).log() - (alpha[999] / sigma[999]).log()
    expected = sigma[0] / sigma[999] * sample.double() - alpha[0] * torch.expm1(-h) * clean_estimate(
        sample, eps, 999
    )
    torch.testing.assert_close(after.double(), expected, rtol=1e-5, atol=1e-5)
    assert (after - x0).abs().max() > 1e-3


def test_one_step_ddim_lands_on_its_clean_estimate() -> None:
    scheduler = make_scheduler("ddim", 1)
    sample, eps = noise_and_eps(scheduler)
    after, x0 = scheduler.step(0, eps, sample)
    torch.testing.assert_close(after, x0, rtol=0, atol=1e-6)
