"""One denoising step of RealCustom++ (Adaptive Mask Guidance): the only definition of it.

Every loop runs `denoise_step`: the eager loop (realcustom/denoise.py), the compiled backend
(torch.compile + CUDA graphs) and the TensorRT backend. A backend only supplies how the two UNet
roles run (`UNetCalls`: eager modules, a compiled function, TensorRT engines).

Per step, on the tensors of a `LoopState`:
1. MASK_UPDATE steps: guidance pass (text only, target-word maps) -> masks; each row keeps its new
   mask only while it is in its mask-update phase (its step < its mask_reused_step, or step 0);
2. generation pass: conditional (prompt + reference tokens) and unconditional (negative prompt +
   black-image tokens) samples as one batch, both gated by the same masks;
3. classifier-free guidance ε = ε_u + w(ε_c − ε_u), in fp32, for rows with w > 1; a row with
   w <= 1 is CFG-free and takes ε_c (its unconditional sample may be left out of the pass);
4. scheduler update (fp32 latents), and every row's step index moves on by one.

Per-row LoRA: when the UNet has an adapter bank (realcustom/lora/bank.py), each row carries its
adapters' slots and scales (`lora_index`, `lora_scale`), and both passes apply them: the guidance
pass and both halves of the generation pass use the row's own adapters.

Rows are independent: each has its own step index, timestep schedule (device tables of its own
scheduler and step count), guidance scale, mask scope and mask_reused_step. Nothing inside a step
reads a Python value that changes between steps, so one captured graph per step kind serves every
step; lookups use `gather` on the device step index (never `tensor[idx]`, a host sync).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from realcustom.masks import generate_masks
from realcustom.schedulers import TABLE_SCHEDULERS, DiffusersScheduler, TableScheduler, make_scheduler
from realcustom.unet import RealCustomUNet

# Capacity of the device schedule tables (a loop with more steps cannot use a prepared state).
MAX_STEPS = 1000


@dataclass
class Conditioning:
    """Everything the loop needs per sample: B samples, S subject slots (zero rows pad unused slots)."""

    prompt_embeds: torch.Tensor  # [B, 77, D]
    negative_prompt_embeds: torch.Tensor  # [B, 77, D]
    pooled: torch.Tensor | None  # [B, P] (SDXL)
    negative_pooled: torch.Tensor | None  # [B, P] (SDXL)
    time_ids: torch.Tensor | None  # [B, 6] (SDXL)
    image_tokens: torch.Tensor  # [B, S, T, C]
    negative_image_tokens: torch.Tensor  # [B, S, T, C]
    target_tokens: torch.Tensor  # [B, S, 77]
    guidance_scale: torch.Tensor  # [B]; <= 1: CFG-free (ε_c only)
    mask_scope: torch.Tensor  # [B], float64 (the official top-k count int(scope·h·w) is float64)
    # Per-row LoRA (a UNet with an adapter bank): slots [B, K] int64 and scales [B, K] (0 = unused).
    lora_index: torch.Tensor | None = None
    lora_scale: torch.Tensor | None = None
    # Stochastic samplers (LCM, TCD): each step's N(0, I) draw [B, steps, C, h, w], from the seed.
    step_noise: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]


class StepKind(enum.Enum):
    MASK_UPDATE = "mask_update"
    MASK_REUSE = "mask_reuse"


def step_kinds(num_steps: int, mask_reused_step: int) -> list[StepKind]:
    """The kind of every step of a loop (step 0 always computes a mask)."""
    return [
        StepKind.MASK_UPDATE if k < mask_reused_step or k == 0 else StepKind.MASK_REUSE
        for k in range(num_steps)
    ]


@dataclass(frozen=True)
class MaskSettings:
    """How maps become masks: Python constants of the step (they change its operations)."""

    mode: tuple[str, ...] = ("max_norm",)
    overlap: str = "exclusive"


class RowSchedule:
    """Per-row scheduler tables on the device ([rows, capacity]); row r follows its own schedule.

    Tables are allocated once and refilled in place (a captured graph keeps reading the same
    addresses). Unused entries hold harmless values (1, first order, timestep 0). A stochastic
    sampler (LCM, TCD) also has `noise` [rows, noise capacity, C, h, w]: each row's draw for each
    of its steps, written when the row is loaded (`LoopState.load_rows`, from `Conditioning.step_noise`).
    """

    def __init__(
        self,
        family: str,
        rows: int,
        device: torch.device,
        capacity: int = MAX_STEPS,
        latent_shape: tuple[int, int, int] | None = None,
    ):
        if family not in TABLE_SCHEDULERS:
            raise ValueError(
                f"scheduler {family!r} has no device tables; use one of {tuple(TABLE_SCHEDULERS)}"
            )
        self.family, self.capacity = family, capacity
        self.sampler = TABLE_SCHEDULERS[family]
        example = self.sampler(1)
        self.init_noise_sigma = example.init_noise_sigma
        self.tables = {
            name: torch.ones(rows, capacity, dtype=values.dtype, device=device)
            for name, values in example.tables().items()
        }
        self.timesteps = torch.zeros(rows, capacity, dtype=torch.int64, device=device)
        self.noise = None
        if self.sampler.stochastic:
            if latent_shape is None:
                raise ValueError(f"scheduler {family!r} adds noise at every step: give the latent shape")
            steps = min(capacity, self.sampler.max_steps)
            self.noise = torch.zeros(rows, steps, *latent_shape, dtype=torch.float32, device=device)

    def load(
        self,
        num_steps: int,
        rows: slice | None = None,
        *,
        timesteps: Sequence[int] | None = None,
        eta: float | None = None,
    ) -> None:
        """Fill `rows` (all by default) with the tables of a `num_steps` loop (`timesteps`, `eta`:
        the sampler's options, realcustom.schedulers.SCHEDULER_OPTIONS)."""
        if num_steps > self.capacity:
            raise ValueError(f"{num_steps} steps exceed the schedule capacity {self.capacity}")
        rows = rows or slice(None)
        scheduler: TableScheduler = make_scheduler(self.family, num_steps, timesteps=timesteps, eta=eta)
        for name, values in scheduler.tables().items():
            self.tables[name][rows, :num_steps] = values.to(self.tables[name].device)
        self.timesteps[rows, :num_steps] = scheduler.timesteps.to(self.timesteps.device)

    def load_noise(self, rows: slice, noise: torch.Tensor | None) -> None:
        """Rows `rows` take their step noise [n, steps, C, h, w] (later steps: zeros)."""
        if self.noise is None:
            return
        if noise is None:
            raise ValueError(
                f"scheduler {self.family!r} adds noise at every step: give each row's step noise "
                "(Conditioning.step_noise, RealCustomPipeline.prepare_step_noise)"
            )
        if noise.shape[1] > self.noise.shape[1]:
            raise ValueError(f"{noise.shape[1]} steps of noise exceed the capacity {self.noise.shape[1]}")
        self.noise[rows] = 0
        self.noise[rows, : noise.shape[1]] = noise.float()

    def row_tensors(self) -> list[torch.Tensor]:
        """Tensors with one entry per row (tables, timesteps, noise)."""
        tensors = [*self.tables.values(), self.timesteps]
        return tensors if self.noise is None else [*tensors, self.noise]

    def _row_values(self, table: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        index = step.clamp(0, self.capacity - 1).view(-1, 1)  # rows past their end read a harmless entry
        return table.gather(1, index).view(-1)

    def timestep(self, state: LoopState) -> torch.Tensor:
        return self._row_values(self.timesteps, state.step)  # [B] int64

    def model_input(self, state: LoopState) -> torch.Tensor:
        values = {
            name: self._row_values(self.tables[name], state.step).view(-1, 1, 1, 1)
            for name in self.sampler.input_tables
        }
        return self.sampler.model_input(values, state.latents)

    def _step_noise(self, state: LoopState) -> torch.Tensor | None:
        if self.noise is None:
            return None
        index = state.step.clamp(0, self.noise.shape[1] - 1).view(-1, 1, 1, 1, 1)
        return self.noise.gather(1, index.expand(-1, 1, *self.noise.shape[2:])).squeeze(1)

    def update(self, state: LoopState, noise_pred: torch.Tensor) -> None:
        values = {
            name: self._row_values(table, state.step).view(-1, 1, 1, 1) for name, table in self.tables.items()
        }
        sample, x0, anchor, anchor_x0 = self.sampler.update(
            values, noise_pred, state.latents, state.anchor, state.anchor_x0, self._step_noise(state)
        )
        state.latents.copy_(sample)
        state.x0.copy_(x0)
        state.anchor.copy_(anchor)
        state.anchor_x0.copy_(anchor_x0)

    def final_latents(self, state: LoopState) -> torch.Tensor:
        return state.x0


class HostSchedule:
    """A stock diffusers scheduler, stepped from the host: every row at the same step (eager only)."""

    def __init__(self, name: str, num_steps: int):
        self.scheduler = make_scheduler(name, num_steps)
        if not isinstance(self.scheduler, DiffusersScheduler):
            raise ValueError(f"{name!r} has device tables; use RowSchedule")
        self.init_noise_sigma = self.scheduler.init_noise_sigma
        self.k = 0

    def timestep(self, state: LoopState) -> torch.Tensor:
        return self.scheduler.timesteps[self.k].to(state.latents.device).expand(state.rows)

    def model_input(self, state: LoopState) -> torch.Tensor:
        return self.scheduler.scale_model_input(state.latents, self.k)

    def update(self, state: LoopState, noise_pred: torch.Tensor) -> None:
        sample, x0 = self.scheduler.step(self.k, noise_pred, state.latents)
        state.latents.copy_(sample)
        state.x0.copy_(x0)
        self.k += 1

    def final_latents(self, state: LoopState) -> torch.Tensor:
        return state.latents


def make_schedule(
    name: str,
    rows: int,
    device: torch.device,
    num_steps: int,
    latent_shape: tuple[int, int, int] | None = None,
    **options,
) -> RowSchedule | HostSchedule:
    """Device tables of one `num_steps` loop for the table samplers, else a host schedule
    (`options`: the sampler's, e.g. LCM's custom `timesteps`)."""
    if name in TABLE_SCHEDULERS:
        schedule = RowSchedule(name, rows, device, num_steps, latent_shape)
        schedule.load(num_steps, **options)
        return schedule
    if any(value is not None for value in options.values()):
        raise ValueError(f"scheduler {name!r} takes no options")
    return HostSchedule(name, num_steps)


# Per layer (K, V) of the reference tokens, then of the black-image tokens.
ImageKeyValues = tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]


def _pad_slots(tensor: torch.Tensor, slots: int) -> torch.Tensor:
    """[B, S, ...] -> [B, slots, ...] with zero rows for the missing subjects."""
    extra = slots - tensor.shape[1]
    if not extra:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], extra, *tensor.shape[2:])], dim=1)


class LoopState:
    """Every tensor one loop reads or writes; a step changes only these (in place).

    Latents, x̂₀ and the sampler's anchors are fp32 whatever the model's dtype (the UNet gets a
    cast copy). Text conditioning is stored [cond; uncond] (2·rows); the guidance pass reads the
    first half. Image K/V buffers are contiguous (TensorRT binds them by address).
    """

    def __init__(
        self,
        unet: RealCustomUNet,
        *,
        rows: int,
        subjects: int,
        latent_shape: tuple[int, int, int],
        text_shape: tuple[int, int],
        pooled_dim: int | None,
        image_token_shape: tuple[int, int],
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.rows, self.subjects, self.dtype = rows, subjects, dtype
        channels, h, w = latent_shape
        self.mask_size = (h // 2, w // 2)

        def zeros(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dt, device=device)

        f32 = torch.float32
        self.step = zeros(rows, dt=torch.int64)
        self.latents = zeros(rows, channels, h, w, dt=f32)
        self.x0 = zeros(rows, channels, h, w, dt=f32)
        self.anchor = zeros(rows, channels, h, w, dt=f32)
        self.anchor_x0 = zeros(rows, channels, h, w, dt=f32)
        self.masks = zeros(rows, subjects, *self.mask_size, dt=f32)
        self.text = zeros(2 * rows, *text_shape)
        self.pooled = None if pooled_dim is None else zeros(2 * rows, pooled_dim)
        self.time_ids = None if pooled_dim is None else zeros(2 * rows, 6)
        self.target_tokens = zeros(rows, subjects, text_shape[0])
        self.guidance_scale = zeros(rows, 1, 1, 1, dt=f32)
        self.mask_scope = zeros(rows, dt=torch.float64)  # the official int(scope·h·w) is float64
        self.mask_reused_step = zeros(rows, dt=torch.int64)
        bank = unet.adapters
        self.lora_index = None if bank is None else zeros(rows, bank.per_row, dt=torch.int64)
        self.lora_scale = None if bank is None else zeros(rows, bank.per_row, dt=f32)
        tokens = image_token_shape[0]
        self.image_kv = [
            tuple(
                zeros(2 * rows, subjects, attn.heads, tokens, projection.out_features // attn.heads)
                for projection in (attn.to_k_vision, attn.to_v_vision)
            )
            for attn in unet.cross_attention_layers
        ]
        self.schedule: RowSchedule | HostSchedule | None = None

    @classmethod
    def for_model(
        cls,
        unet: RealCustomUNet,
        image_token_shape: tuple[int, int],
        rows: int,
        subjects: int,
        height: int,
        width: int,
        latent_factor: int,
        dtype: torch.dtype | None = None,
    ) -> LoopState:
        """A state for `rows` samples of `subjects` subjects at height x width pixels; conditioning
        buffers in `dtype` (the model's by default)."""
        config = unet.unet.config
        pooled_dim = None
        if unet.is_sdxl:
            pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        parameter = next(unet.parameters())
        return cls(
            unet,
            rows=rows,
            subjects=subjects,
            latent_shape=(config.in_channels, height // latent_factor, width // latent_factor),
            text_shape=(77, config.cross_attention_dim),
            pooled_dim=pooled_dim,
            image_token_shape=image_token_shape,
            device=parameter.device,
            dtype=dtype or parameter.dtype,
        )

    def half(self, tensor: torch.Tensor | None, rows: int | None = None) -> torch.Tensor | None:
        """The conditional half of a [cond; uncond] tensor (what the guidance pass reads), or its
        first `rows` rows."""
        return None if tensor is None else tensor[: self.rows if rows is None else rows]

    def paired(self, tensor: torch.Tensor | None, uncond_rows: int) -> torch.Tensor | None:
        """A [cond; uncond] tensor with only the first `uncond_rows` unconditional rows (what a
        generation pass with CFG-free rows reads)."""
        if tensor is None or uncond_rows == self.rows:
            return tensor
        if uncond_rows == 0:
            return tensor[: self.rows]
        return torch.cat([tensor[: self.rows], tensor[self.rows : self.rows + uncond_rows]])

    def adapter_rows(self, rows: int | None = None, uncond_rows: int = 0) -> tuple | None:
        """Each row's LoRA (slots, scales) for a pass over the first `rows` rows, followed by the
        first `uncond_rows` rows again (the unconditional half uses the row's own adapters)."""
        if self.lora_index is None:
            return None
        rows = self.rows if rows is None else rows
        index, scale = self.lora_index[:rows], self.lora_scale[:rows]
        if uncond_rows:
            index = torch.cat([index, self.lora_index[:uncond_rows]])
            scale = torch.cat([scale, self.lora_scale[:uncond_rows]])
        return index, scale

    def load(
        self,
        unet: RealCustomUNet,
        cond: Conditioning,
        latents: torch.Tensor,
        mask_reused_step: int,
        schedule: RowSchedule | HostSchedule,
    ) -> None:
        """Copy one loop's inputs into every row (host-side work allowed). Rows beyond the loop's
        batch repeat its last row. Every layer's image K/V is computed here, once per loop."""
        batch = cond.batch_size
        if batch > self.rows:
            raise ValueError(f"{batch} rows exceed the state's {self.rows}")
        pad = self.rows - batch

        def rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None or not pad:
                return tensor
            return torch.cat([tensor, tensor[-1:].expand(pad, *tensor.shape[1:])])

        padded = Conditioning(**{name: rows(value) for name, value in vars(cond).items()})
        self.schedule = schedule
        self.load_rows(unet, padded, rows(latents), mask_reused_step, start=0)

    @staticmethod
    def image_key_values(unet: RealCustomUNet, cond: Conditioning, slots: int) -> ImageKeyValues:
        """Every layer's image K/V of one loop's reference and black-image tokens, padded to `slots`
        subject slots: what `load_rows` writes (computable ahead, e.g. while other rows step)."""
        return (
            unet.image_key_values(_pad_slots(cond.image_tokens, slots)),
            unet.image_key_values(_pad_slots(cond.negative_image_tokens, slots)),
        )

    def load_rows(
        self,
        unet: RealCustomUNet,
        cond: Conditioning,
        latents: torch.Tensor,
        mask_reused_step: int,
        start: int,
        key_values: ImageKeyValues | None = None,
    ) -> slice:
        """Rows [start, start + B) take one loop's inputs, at step 0; other rows are untouched (a
        request joining a running batch). Subject slots beyond its subjects are zero (zero tokens ->
        zero mask -> the slot adds exactly 0). `key_values`: `image_key_values(unet, cond,
        self.subjects)` when computed ahead. Returns the rows. The schedule's table rows are the
        caller's (`RowSchedule.load(steps, rows)`)."""
        batch, subjects = cond.batch_size, cond.image_tokens.shape[1]
        if start < 0 or start + batch > self.rows or subjects > self.subjects:
            raise ValueError(
                f"rows {start}..{start + batch} x {subjects} subjects exceed the state "
                f"({self.rows} rows x {self.subjects} subjects)"
            )
        own = slice(start, start + batch)
        uncond = slice(self.rows + start, self.rows + start + batch)

        def both(buffer: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> None:
            buffer[own] = first
            buffer[uncond] = second

        self.latents[own] = latents.float() * self.schedule.init_noise_sigma
        self.x0[own] = self.latents[own]
        for buffer in (self.anchor, self.anchor_x0, self.masks, self.step):
            buffer[own] = 0
        self.mask_reused_step[own] = mask_reused_step
        both(self.text, cond.prompt_embeds, cond.negative_prompt_embeds)
        if self.pooled is not None:
            both(self.pooled, cond.pooled, cond.negative_pooled)
            both(self.time_ids, cond.time_ids, cond.time_ids)
        self.target_tokens[own] = _pad_slots(cond.target_tokens, self.subjects)
        self.guidance_scale[own] = cond.guidance_scale.float().view(-1, 1, 1, 1)
        self.mask_scope[own] = cond.mask_scope
        if self.lora_index is not None:
            given = cond.lora_index is not None
            self.lora_index[own] = cond.lora_index if given else 0
            self.lora_scale[own] = cond.lora_scale.float() if given else 0
        elif cond.lora_index is not None:
            raise ValueError("the request names LoRA adapters but the UNet has no adapter bank")
        if isinstance(self.schedule, RowSchedule):
            self.schedule.load_noise(own, cond.step_noise)
        positive, negative = key_values or self.image_key_values(unet, cond, self.subjects)
        for (key_buffer, value_buffer), (key, value), (negative_key, negative_value) in zip(
            self.image_kv, positive, negative, strict=True
        ):
            both(key_buffer, key, negative_key)
            both(value_buffer, value, negative_value)
        return own

    def _row_tensors(self) -> list[torch.Tensor]:
        """Tensors with one entry per row (dim 0 = rows), schedule tables included."""
        tensors = [self.step, self.latents, self.x0, self.anchor, self.anchor_x0, self.masks]
        tensors += [self.target_tokens, self.guidance_scale, self.mask_scope, self.mask_reused_step]
        tensors += [t for t in (self.lora_index, self.lora_scale) if t is not None]
        if isinstance(self.schedule, RowSchedule):
            tensors += self.schedule.row_tensors()
        return tensors

    def _paired_tensors(self) -> list[torch.Tensor]:
        """Tensors stored [cond; uncond] (dim 0 = 2·rows)."""
        tensors = [self.text] + [t for t in (self.pooled, self.time_ids) if t is not None]
        return tensors + [buffer for pair in self.image_kv for buffer in pair]

    def copy_rows(self, source: LoopState, src: list[int], dst: list[int]) -> None:
        """Rows `dst` of this state become rows `src` of `source` mid-loop (step index, sampler
        state, masks, schedule and step noise, conditioning, adapters, image K/V). `source` may be
        this state: the source rows are gathered before any is written. Both states must share
        subject slots and shapes."""
        device = self.latents.device
        src_index = torch.tensor(src, dtype=torch.long, device=device)
        dst_index = torch.tensor(dst, dtype=torch.long, device=device)
        for mine, theirs in zip(self._row_tensors(), source._row_tensors(), strict=True):
            mine[dst_index] = theirs[src_index]
        for mine, theirs in zip(self._paired_tensors(), source._paired_tensors(), strict=True):
            for half_mine, half_theirs in ((0, 0), (self.rows, source.rows)):
                mine[dst_index + half_mine] = theirs[src_index + half_theirs]


class UNetCalls(Protocol):
    """How a backend runs the UNet's two roles on a state's conditioning."""

    def guidance(self, state: LoopState, latents: torch.Tensor, timestep: torch.Tensor) -> list[torch.Tensor]:
        """Text-only pass of the state's first len(latents) rows -> per-layer target-token maps
        [len(latents), S, h_l, w_l]."""
        ...

    def generation(
        self, state: LoopState, latents: torch.Tensor, timestep: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        """Conditional pass of every row + unconditional pass of the first len(latents) − rows rows
        (rows + 0..rows samples) under masks -> ε [len(latents), C, h, w]."""
        ...


class TorchUNetCalls:
    """The UNet roles as torch modules (eager, or traced by torch.compile).

    `record`, when set to a dict, receives the guidance pass's ε and kept full probabilities
    (parity tests and debugging; never set inside a compiled step).
    """

    def __init__(self, unet: RealCustomUNet, full_probability_layers: frozenset[int] = frozenset()):
        self.unet = unet
        self.full_probability_layers = full_probability_layers
        self.record: dict[str, torch.Tensor] | None = None

    def guidance(self, state: LoopState, latents: torch.Tensor, timestep: torch.Tensor) -> list[torch.Tensor]:
        rows = latents.shape[0]
        eps, maps, probs = self.unet.guidance(
            latents,
            timestep,
            state.half(state.text, rows),
            state.half(state.pooled, rows),
            state.half(state.time_ids, rows),
            state.target_tokens[:rows],
            self.full_probability_layers,
            adapters=state.adapter_rows(rows),
        )
        if self.record is not None:
            self.record["eps_guidance"] = eps
            self.record.update({f"probs_L{i:02d}": layer_probs for i, layer_probs in probs.items()})
        return maps

    def generation(
        self, state: LoopState, latents: torch.Tensor, timestep: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        uncond = latents.shape[0] - state.rows
        image_kv = state.image_kv
        if uncond != state.rows:
            image_kv = [(state.paired(key, uncond), state.paired(value, uncond)) for key, value in image_kv]
        return self.unet.generation(
            latents,
            timestep,
            state.paired(state.text, uncond),
            state.paired(state.pooled, uncond),
            state.paired(state.time_ids, uncond),
            masks=masks,
            image_key_values=image_kv,
            adapters=state.adapter_rows(state.rows, uncond),
        )


def denoise_step(
    calls: UNetCalls,
    state: LoopState,
    kind: StepKind,
    mask: MaskSettings,
    record: dict[str, torch.Tensor] | None = None,
    guidance_rows: int | None = None,
    uncond_rows: int | None = None,
) -> None:
    """One step on `state` (the function CUDA graphs capture). Writes latents, x̂₀, masks, step.

    `guidance_rows`: the guidance pass runs on the first rows only (a running batch keeps the rows
    in their mask-update phase first); None = every row. `uncond_rows`: the unconditional half of
    the generation pass covers the first rows only (rows with guidance scale > 1 must come first;
    the others are CFG-free and take ε_c): 0 = no unconditional pass, None = every row."""
    schedule = state.schedule
    timestep = schedule.timestep(state)
    model_input = schedule.model_input(state).to(state.dtype)

    # 1. Guidance branch: text only, target-word attention -> masks (rows in their update phase).
    if kind is StepKind.MASK_UPDATE:
        rows = state.rows if guidance_rows is None else guidance_rows
        maps = calls.guidance(state, model_input[:rows], timestep[:rows])
        masks, score = generate_masks(maps, state.mask_size, mask.mode, state.mask_scope[:rows], mask.overlap)
        updating = ((state.step < state.mask_reused_step) | (state.step == 0))[:rows]
        state.masks[:rows].copy_(torch.where(updating.view(-1, 1, 1, 1), masks, state.masks[:rows]))
        if record is not None:
            record.update(mask_score=score)
            record.update({f"map_L{i:02d}": layer_map for i, layer_map in enumerate(maps)})

    # 2. Generation branch: conditional and unconditional samples in one batch, same masks.
    gate = state.masks.to(state.dtype)
    uncond = state.rows if uncond_rows is None else uncond_rows
    eps = calls.generation(
        state,
        torch.cat([model_input, model_input[:uncond]]),
        torch.cat([timestep, timestep[:uncond]]),
        torch.cat([gate, gate[:uncond]]),
    ).float()
    eps_cond, eps_uncond = eps[: state.rows], eps[state.rows :]

    # 3. Classifier-free guidance (rows with w > 1), 4. scheduler update.
    noise_pred = eps_cond
    if uncond:
        scale = state.guidance_scale[:uncond]
        guided = eps_uncond + scale * (eps_cond[:uncond] - eps_uncond)
        guided = torch.where(scale > 1, guided, eps_cond[:uncond])
        noise_pred = guided if uncond == state.rows else torch.cat([guided, eps_cond[uncond:]])
    schedule.update(state, noise_pred)
    state.step.add_(1)
    if record is not None:
        record.update(mask=state.masks.clone(), eps_cond=eps_cond, eps_uncond=eps_uncond)
        record.update(noise_pred=noise_pred, latents=state.latents.clone(), x0=state.x0.clone())
