"""The few-step samplers (trailing Euler, LCM, TCD) against diffusers' own scheduler classes, step by
step, on the tiny model: the same UNet, the same initial noise and the same per-step noise (one CPU
generator, drawn in the order a diffusers pipeline draws it), every step's sample and x̂₀ compared.
Then the samplers as per-row device tables: rows joining a running batch at different steps, each
equal to its own loop."""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler, LCMScheduler, TCDScheduler
from PIL import Image

from engines.graph_loop import EagerCapture, GraphLoop
from engines.static_loop import Bucket, GraphSettings
from engines.step_batching import RowRequest, RunningBatch
from realcustom.denoise import LoopSettings, LoopTrace, denoise
from realcustom.schedulers import DDIM, EulerTrailing, NoiseSchedule, make_scheduler
from realcustom.step import Conditioning, LoopState, MaskSettings, TorchUNetCalls, denoise_step, step_kinds

SIZE, SEED, PROMPT = 64, 7, "a photo of a dog on a sofa"
BETAS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def conditioning(pipeline, guidance: float = 1.0) -> Conditioning:
    photo = Image.new("RGB", (64, 64), (200, 20, 20))
    text = pipeline.encode_prompt([PROMPT])
    negative = pipeline.negative_embeddings(1)
    return Conditioning(
        prompt_embeds=text.tokens,
        negative_prompt_embeds=negative.tokens,
        pooled=text.pooled,
        negative_pooled=negative.pooled,
        time_ids=pipeline.time_ids(1, SIZE, SIZE),
        image_tokens=torch.stack(pipeline.reference_tokens([photo])).unsqueeze(0),
        negative_image_tokens=pipeline.black_image_tokens().unsqueeze(1),
        target_tokens=pipeline.target_tokens(PROMPT, ["dog"]).unsqueeze(0),
        guidance_scale=torch.tensor([guidance]),
        mask_scope=torch.tensor([0.25], dtype=torch.float64),
    )


class DiffusersSchedule:
    """A diffusers scheduler instance stepped from the host inside our step (the reference)."""

    def __init__(self, scheduler, generator: torch.Generator, **step_kwargs):
        self.scheduler, self.generator, self.step_kwargs = scheduler, generator, step_kwargs
        self.init_noise_sigma = float(scheduler.init_noise_sigma)
        self.k = 0

    def timestep(self, state):
        return self.scheduler.timesteps[self.k].long().expand(state.rows)

    def model_input(self, state):
        return self.scheduler.scale_model_input(state.latents, self.scheduler.timesteps[self.k])

    def update(self, state, noise_pred):
        output = self.scheduler.step(
            noise_pred,
            self.scheduler.timesteps[self.k],
            state.latents,
            generator=self.generator,
            **self.step_kwargs,
        )
        x0 = next(
            getattr(output, name)
            for name in ("pred_original_sample", "denoised", "pred_noised_sample")
            if getattr(output, name, None) is not None
        )
        state.latents.copy_(output.prev_sample)
        state.x0.copy_(x0)
        self.k += 1


@torch.no_grad()
def diffusers_loop(pipeline, cond, scheduler, steps: int, reuse: int, **step_kwargs) -> list[dict]:
    """Our step with the diffusers scheduler; the generator first draws the initial noise, as
    `prepare_latents` does (and a diffusers pipeline with that generator)."""
    generator = torch.Generator().manual_seed(SEED)
    latents = torch.randn((1, *pipeline.latent_shape(SIZE, SIZE)), generator=generator)
    unet = pipeline.unet
    state = LoopState.for_model(unet, tuple(cond.image_tokens.shape[2:]), 1, 1, SIZE, SIZE, 8)
    schedule = DiffusersSchedule(scheduler, generator, **step_kwargs)
    state.load(unet, cond, latents, reuse, schedule)
    calls, records = TorchUNetCalls(unet), []
    for kind in step_kinds(steps, reuse):
        denoise_step(calls, state, kind, MaskSettings(), uncond_rows=0)
        records.append({"latents": state.latents.clone(), "x0": state.x0.clone()})
    return records


@torch.no_grad()
def our_loop(pipeline, cond, scheduler: str, steps: int, reuse: int, **options) -> LoopTrace:
    cond.step_noise = pipeline.prepare_step_noise([SEED], [1], SIZE, SIZE, steps)
    trace = LoopTrace()
    latents = pipeline.prepare_latents([SEED], [1], SIZE, SIZE)
    settings = LoopSettings(steps, scheduler, ("max_norm",), reuse, **options)
    denoise(pipeline.unet, cond, latents, settings, trace)
    return trace


CASES = {
    "euler": (lambda: EulerDiscreteScheduler(**BETAS, timestep_spacing="trailing"), {}, {}),
    "lcm": (lambda: LCMScheduler(**BETAS), {}, {}),
    "lcm-dmd2-timesteps": (lambda: LCMScheduler(**BETAS), {"timesteps": (999, 749, 499, 249)}, {}),
    "tcd": (lambda: TCDScheduler(**BETAS), {}, {"eta": 0.3}),
    "tcd-eta-0": (lambda: TCDScheduler(**BETAS), {"eta": 0.0}, {"eta": 0.0}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_step_equals_diffusers_scheduler(tiny_pipeline, case):
    make, options, step_kwargs = CASES[case]
    name = case.split("-")[0]
    steps, reuse = 4, 2
    reference = make()
    if "timesteps" in options:
        reference.set_timesteps(timesteps=list(options["timesteps"]))
    else:
        reference.set_timesteps(steps)
    ours_scheduler = make_scheduler(name, steps, **options)
    assert ours_scheduler.timesteps.tolist() == reference.timesteps.long().tolist()
    cond = conditioning(tiny_pipeline)
    expected = diffusers_loop(tiny_pipeline, cond, reference, steps, reuse, **step_kwargs)
    trace = our_loop(tiny_pipeline, cond, name, steps, reuse, **options)
    assert len(trace.steps) == steps
    for k, (ours, theirs) in enumerate(zip(trace.steps, expected, strict=True)):
        scale = max(1.0, float(theirs["latents"].abs().max()))
        torch.testing.assert_close(
            ours["latents"], theirs["latents"], rtol=0, atol=2e-5 * scale, msg=f"step {k}"
        )
        torch.testing.assert_close(ours["x0"], theirs["x0"], rtol=0, atol=2e-5 * scale, msg=f"step {k}")
    # The stochastic samplers really used their noise (TCD with eta 0 uses none).
    if name == "lcm" or case == "tcd":
        cond.step_noise = None
        with pytest.raises(ValueError, match="adds noise at every step"):
            denoise(
                tiny_pipeline.unet, cond, torch.zeros(1, 4, 8, 8), LoopSettings(steps, name, ("max_norm",), 2)
            )


def test_trailing_euler_is_ddim_up_to_its_initial_scale():
    """In exact arithmetic Euler on σ-space samples is DDIM on x_t = α_t x̃ (the docstring's claim)."""
    generator = torch.Generator().manual_seed(0)
    acp = NoiseSchedule().alphas_cumprod().double()
    euler, ddim = EulerTrailing(4), DDIM(4)
    noise = torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64)
    x_euler = noise * euler.init_noise_sigma
    x_ddim = x_euler * acp[999].sqrt()  # the same point in x_t coordinates
    for k in range(4):
        eps = torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(
            euler.scale_model_input(x_euler.float(), k).double(), x_ddim, rtol=1e-5, atol=1e-5
        )
        x_euler, euler_x0 = (v.double() for v in euler.step(k, eps.float(), x_euler.float()))
        x_ddim, ddim_x0 = (v.double() for v in ddim.step(k, eps.float(), x_ddim.float()))
        torch.testing.assert_close(euler_x0, ddim_x0, rtol=1e-4, atol=1e-4)
        following = euler.timesteps[k + 1] if k + 1 < 4 else None
        alpha = 1.0 if following is None else acp[following].sqrt()
        torch.testing.assert_close(x_euler * alpha, x_ddim, rtol=1e-4, atol=1e-4)
    assert euler.timesteps.tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize("scheduler", ["lcm", "tcd", "euler"])
def test_rows_joining_at_different_steps_each_equal_their_own_loop(tiny_pipeline, scheduler):
    """Per-row tables and per-row step noise: a 4-step row joins a batch whose 3-step row is one
    step in; after compaction and the move to the 1-row bucket each equals its loop run alone."""
    pipeline = tiny_pipeline
    family = [Bucket(rows, SIZE, SIZE) for rows in (1, 2)]
    graphs = GraphLoop(pipeline, EagerCapture())
    graphs.prepare(family, [GraphSettings(scheduler)])
    batch = RunningBatch(graphs, family, GraphSettings(scheduler))

    def request(key: str, seed: int, steps: int) -> RowRequest:
        cond = conditioning(pipeline)
        cond.step_noise = pipeline.prepare_step_noise([seed], [1], SIZE, SIZE, steps)
        return RowRequest(key, cond, pipeline.prepare_latents([seed], [1], SIZE, SIZE), steps, 2)

    first, second = request("first", 1, 3), request("second", 2, 4)
    finished = {}
    assert batch.join(first)
    finished.update({done.key: done for done in batch.step()})
    assert batch.join(second)
    while batch.slots:
        finished.update({done.key: done for done in batch.step()})
    for row in (first, second):
        settings = LoopSettings(row.num_steps, scheduler, ("max_norm",), row.mask_reused_step)
        alone = denoise(pipeline.unet, row.cond, row.latents, settings)
        scale = max(1.0, float(alone.latents.abs().max()))
        torch.testing.assert_close(finished[row.key].latents, alone.latents, rtol=0, atol=1e-5 * scale)
