"""The denoising loop as steps over static buffers: what CUDA graphs capture and replay.

A step reads and writes only tensors that live as long as the loop's buffers (latents, masks,
scheduler anchors, conditioning, every layer's image K/V, the step index), so one captured graph
per step kind can be replayed for every step of every request of that shape. Nothing inside a step
reads a Python number that changes between steps: the step index is a device tensor, and the
timestep and the scheduler's per-step coefficients are looked up from device tables with
`index_select` (never `tensor[idx]`, which turns a 0-dim index into a host `.item()`). The DPM
solver's order 1 / order 2 branches are both computed and selected with `torch.where`, so one graph
serves both orders; every value equals the reference's (same operations, same order).

Step kinds:
    MASK_UPDATE: guidance pass (text only, target-token attention) -> masks, then the generation
                 pass (conditional and unconditional as one batch), CFG, scheduler update;
    MASK_REUSE:  the generation pass with the last masks, CFG, scheduler update.

Graph keys are (kind, batch, subjects, height, width, program), where `program` names what else
changes the captured operations: the scheduler family, the mask mode and the overlap policy. The
number of steps, `mask_reused_step`, guidance scales and mask scopes do not (they are data).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from realcustom.denoise import Conditioning, LoopSettings
from realcustom.masks import generate_masks
from realcustom.schedulers import DDIM, OfficialDPMSolver, make_scheduler
from realcustom.unet import RealCustomUNet

# Schedulers whose step is a fixed sequence of tensor operations (graph-capturable).
GRAPH_SCHEDULERS = ("dpm", "ddim")
# Capacity of the per-step coefficient tables (a request with more steps runs uncaptured).
MAX_STEPS = 1000


class StepKind(enum.Enum):
    MASK_UPDATE = "mask_update"
    MASK_REUSE = "mask_reuse"


def step_kinds(num_steps: int, mask_reused_step: int) -> list[StepKind]:
    """The kind of every step, as the reference decides it (step 0 always computes a mask)."""
    return [
        StepKind.MASK_UPDATE if k < mask_reused_step or k == 0 else StepKind.MASK_REUSE
        for k in range(num_steps)
    ]


@dataclass(frozen=True, order=True)
class Bucket:
    """A shape the backend prepares at warm-up: up to `batch` samples, up to `subjects` subjects."""

    batch: int
    height: int
    width: int
    subjects: int = 1

    def fits(self, batch: int, subjects: int, height: int, width: int) -> bool:
        return (
            (height, width) == (self.height, self.width) and batch <= self.batch and subjects <= self.subjects
        )

    def __str__(self) -> str:
        return f"{self.batch}x{self.height}x{self.width}" + (f"s{self.subjects}" if self.subjects > 1 else "")


_BUCKET = re.compile(r"^(\d+)x(\d+)x(\d+)(?:s(\d+))?$")


def parse_buckets(text: str | Sequence[str]) -> list[Bucket]:
    """ "1x1024x1024,4x1024x1024s2" -> buckets (BATCHxHEIGHTxWIDTH, optional sSUBJECTS), sorted."""
    items = text.split(",") if isinstance(text, str) else list(text)
    buckets = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        match = _BUCKET.match(item)
        if not match:
            raise ValueError(f"bad bucket {item!r}: use BATCHxHEIGHTxWIDTH[sSUBJECTS], e.g. 4x1024x1024")
        batch, height, width, subjects = match.groups()
        bucket = Bucket(int(batch), int(height), int(width), int(subjects or 1))
        if min(bucket.batch, bucket.subjects) < 1 or bucket.height % 32 or bucket.width % 32:
            raise ValueError(f"bad bucket {item!r}: batch, subjects >= 1; sizes multiples of 32")
        buckets.append(bucket)
    return sorted(set(buckets))


def pick_bucket(
    buckets: Sequence[Bucket], batch: int, subjects: int, height: int, width: int
) -> Bucket | None:
    """The smallest configured bucket that holds this loop (padding rows and subject slots), or None."""
    fitting = [b for b in buckets if b.fits(batch, subjects, height, width)]
    return min(fitting, key=lambda b: (b.batch * b.subjects, b.batch)) if fitting else None


@dataclass(frozen=True)
class Program:
    """The loop settings that change which operations a step runs."""

    scheduler: str = "dpm"
    mask_mode: tuple[str, ...] = ("max_norm",)
    overlap: str = "exclusive"

    @classmethod
    def of(cls, settings: LoopSettings) -> Program:
        return cls(settings.scheduler, tuple(settings.mask_mode), settings.overlap)

    @property
    def capturable(self) -> bool:
        return self.scheduler in GRAPH_SCHEDULERS


@dataclass(frozen=True)
class GraphKey:
    kind: str
    batch: int
    subjects: int
    height: int
    width: int
    program: Program = Program()

    @classmethod
    def of(cls, kind: StepKind, bucket: Bucket, program: Program) -> GraphKey:
        return cls(kind.value, bucket.batch, bucket.subjects, bucket.height, bucket.width, program)


class DeviceSchedule:
    """The reference schedulers' per-step values as device tables (capacity MAX_STEPS).

    Tables are allocated once per buffer set and refilled per request (in place: a captured graph
    keeps reading the same addresses). Values are the reference scheduler's own tensors.
    """

    def __init__(self, scheduler_name: str, device: torch.device, capacity: int = MAX_STEPS):
        if scheduler_name not in GRAPH_SCHEDULERS:
            raise ValueError(f"scheduler {scheduler_name!r} has no device schedule; use {GRAPH_SCHEDULERS}")
        self.name = scheduler_name
        self.capacity = capacity
        names = ("alpha", "sigma", "keep", "x0", "r0") if scheduler_name == "dpm" else ("a", "s", "an", "sn")
        self.timesteps = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.first_order = torch.ones(capacity, dtype=torch.bool, device=device)
        self.table = {name: torch.ones(capacity, dtype=torch.float32, device=device) for name in names}

    def load(self, num_steps: int) -> None:
        """Fill the tables for a `num_steps` loop (host->device copies, before the loop)."""
        if num_steps > self.capacity:
            raise ValueError(f"{num_steps} steps exceed the schedule capacity {self.capacity}")
        scheduler = make_scheduler(self.name, num_steps)
        rows: dict[str, list[torch.Tensor]]
        if isinstance(scheduler, OfficialDPMSolver):
            coefficients = scheduler._coefficients
            rows = {
                "alpha": scheduler._alpha,
                "sigma": scheduler._sigma,
                "keep": [c["keep"] for c in coefficients],
                "x0": [c["x0"] for c in coefficients],
                # order-1 steps never use r0; 1 keeps the unused branch finite.
                "r0": [c.get("r0", torch.tensor(1.0)) for c in coefficients],
            }
            self.first_order[:num_steps].copy_(torch.tensor([o == 1 for o in scheduler.orders]))
        elif isinstance(scheduler, DDIM):
            columns = list(zip(*scheduler._coefficients, strict=True))
            rows = dict(zip(("a", "s", "an", "sn"), columns, strict=True))
        else:  # pragma: no cover - guarded by GRAPH_SCHEDULERS
            raise TypeError(type(scheduler))
        for name, values in rows.items():
            self.table[name][:num_steps].copy_(torch.stack([torch.as_tensor(v) for v in values]).float())
        self.timesteps[:num_steps].copy_(scheduler.timesteps)

    def at(self, name: str, step: torch.Tensor) -> torch.Tensor:
        """0-dim value of table `name` at the device step index `step` ([1] int64), no host sync."""
        return self.table[name].index_select(0, step).squeeze(0)

    def timestep(self, step: torch.Tensor) -> torch.Tensor:
        return self.timesteps.index_select(0, step)  # [1], int64

    def step(self, buffers: StaticBuffers, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(next sample, x0) from the buffers' current sample; updates the DPM anchors in place."""
        k, sample = buffers.step, buffers.latents
        if self.name == "ddim":
            alpha, sigma = self.at("a", k), self.at("s", k)
            x0 = (sample - sigma * eps) / alpha
            return self.at("an", k) * x0 + self.at("sn", k) * eps, x0
        x0 = (sample - self.at("sigma", k) * eps) / self.at("alpha", k)
        keep, c_x0, r0 = self.at("keep", k), self.at("x0", k), self.at("r0", k)
        first = self.first_order.index_select(0, k).squeeze(0)
        # Order 1 (the reference's formula): from the current sample; it becomes the anchor.
        out_first = keep * sample + c_x0 * x0
        # Order 2: restart from the anchor of the preceding order-1 step (midpoint correction).
        d1 = (x0 - buffers.anchor_x0) / r0
        out_second = keep * buffers.anchor + c_x0 * buffers.anchor_x0 + 0.5 * c_x0 * d1
        buffers.anchor.copy_(torch.where(first, sample, buffers.anchor))
        buffers.anchor_x0.copy_(torch.where(first, x0, buffers.anchor_x0))
        return torch.where(first, out_first, out_second), x0


class StaticBuffers:
    """Every tensor one loop of a bucket's shape reads or writes, allocated once and reused.

    Conditioning rows for the two generation halves are stored concatenated ([cond; uncond]); the
    guidance pass reads the first half as a view.
    """

    def __init__(
        self,
        unet: RealCustomUNet,
        bucket: Bucket,
        program: Program,
        *,
        text_shape: tuple[int, int],
        pooled_dim: int | None,
        image_token_shape: tuple[int, int],
        latent_channels: int,
        latent_factor: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.bucket, self.program = bucket, program
        batch, subjects = bucket.batch, bucket.subjects
        h, w = bucket.height // latent_factor, bucket.width // latent_factor
        self.mask_size = (h // 2, w // 2)
        zeros = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt, device=device)  # noqa: E731
        self.step = torch.zeros(1, dtype=torch.int64, device=device)
        self.latents = zeros(batch, latent_channels, h, w)
        self.x0 = zeros(batch, latent_channels, h, w)
        self.anchor = zeros(batch, latent_channels, h, w)
        self.anchor_x0 = zeros(batch, latent_channels, h, w)
        self.masks = zeros(batch, subjects, *self.mask_size, dt=torch.float32)
        self.text = zeros(2 * batch, *text_shape)
        self.pooled = None if pooled_dim is None else zeros(2 * batch, pooled_dim)
        self.time_ids = None if pooled_dim is None else zeros(2 * batch, 6)
        self.target_tokens = zeros(batch, subjects, text_shape[0])
        self.guidance_scale = zeros(batch, 1, 1, 1)
        self.mask_scope = zeros(batch, dt=torch.float32)
        probe = torch.zeros(2 * batch, subjects, *image_token_shape, dtype=dtype, device=device)
        self.image_kv = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in unet.image_key_values(probe)]
        self.schedule = DeviceSchedule(program.scheduler, device)

    # ---- filling (before the loop; host-side work allowed) ----------------------------------

    def load(self, unet: RealCustomUNet, cond: Conditioning, latents: torch.Tensor, num_steps: int) -> None:
        """Copy one loop's inputs in; rows beyond the loop's batch repeat its last row."""
        batch = cond.batch_size
        pad = self.bucket.batch - batch
        subjects = cond.image_tokens.shape[1]

        def rows(tensor: torch.Tensor) -> torch.Tensor:
            return torch.cat([tensor, tensor[-1:].expand(pad, *tensor.shape[1:])]) if pad else tensor

        def slots(tensor: torch.Tensor) -> torch.Tensor:  # zero subject slots: zero masks, no effect
            extra = self.bucket.subjects - subjects
            if not extra:
                return tensor
            return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], extra, *tensor.shape[2:])], dim=1)

        two = lambda first, second: torch.cat([rows(first), rows(second)])  # noqa: E731
        self.latents.copy_(rows(latents))
        self.x0.copy_(self.latents)
        self.anchor.zero_()
        self.anchor_x0.zero_()
        self.masks.zero_()
        self.step.zero_()
        self.text.copy_(two(cond.prompt_embeds, cond.negative_prompt_embeds))
        if self.pooled is not None:
            self.pooled.copy_(two(cond.pooled, cond.negative_pooled))
            self.time_ids.copy_(two(cond.time_ids, cond.time_ids))
        self.target_tokens.copy_(slots(rows(cond.target_tokens)))
        self.guidance_scale.copy_(rows(cond.guidance_scale).view(-1, 1, 1, 1))
        self.mask_scope.copy_(rows(cond.mask_scope))
        tokens = slots(two(cond.image_tokens, cond.negative_image_tokens))
        for (key_buffer, value_buffer), (key, value) in zip(
            self.image_kv, unet.image_key_values(tokens), strict=True
        ):
            key_buffer.copy_(key)
            value_buffer.copy_(value)
        self.schedule.load(num_steps)

    # ---- views the steps read ----------------------------------------------------------------

    @property
    def batch(self) -> int:
        return self.bucket.batch

    def half(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor[: self.batch]


def run_step(unet: RealCustomUNet, buffers: StaticBuffers, kind: StepKind) -> None:
    """One denoising step on the buffers (the function graphs capture). Writes latents, x0, masks."""
    batch, program = buffers.batch, buffers.program
    model_input = buffers.latents
    timestep = buffers.schedule.timestep(buffers.step)
    if kind is StepKind.MASK_UPDATE:
        _, maps, _ = unet.guidance(
            model_input,
            timestep.expand(batch),
            buffers.half(buffers.text),
            buffers.half(buffers.pooled),
            buffers.half(buffers.time_ids),
            buffers.target_tokens,
        )
        masks, _ = generate_masks(
            maps, buffers.mask_size, program.mask_mode, buffers.mask_scope, program.overlap
        )
        buffers.masks.copy_(masks)
    masks = buffers.masks
    eps = unet.generation(
        torch.cat([model_input, model_input]),
        timestep.expand(2 * batch),
        buffers.text,
        buffers.pooled,
        buffers.time_ids,
        masks=torch.cat([masks, masks]).to(model_input.dtype),
        image_key_values=buffers.image_kv,
    )
    finish_step(buffers, eps)


def finish_step(buffers: StaticBuffers, eps: torch.Tensor) -> None:
    """CFG on the generation pass's ε [cond; uncond] and the scheduler update, into the buffers."""
    eps_cond, eps_uncond = eps.chunk(2)
    noise_pred = eps_uncond + buffers.guidance_scale * (eps_cond - eps_uncond)
    latents, x0 = buffers.schedule.step(buffers, noise_pred)
    buffers.latents.copy_(latents)
    buffers.x0.copy_(x0)


def advance(buffers: StaticBuffers) -> None:
    """Move the device step index on by one (a device op, between replays)."""
    buffers.step.add_(1)
