"""RealCustomPipeline: prompt + reference photos -> customised images, in numbered steps.

Mirrors the diffusers pipelines: components are plain modules, `__call__` is a sequence of
numbered steps, and every intermediate can be passed in precomputed (prompt embeddings, vision
features, target-token indicators, latents). The lower-level methods (`encode_prompt`,
`image_tokens`, `prepare_latents`, `decode`) are what the engines' batched runner composes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import nn

from realcustom.denoise import Conditioning, LoopSettings, LoopTrace, denoise
from realcustom.lora.requests import LoRAChoice
from realcustom.masks import OVERLAP_POLICIES, check_mask_mode
from realcustom.phrases import check_prompt_length, target_token_indicator
from realcustom.reference import ReferenceEncoder, VisionFeatures
from realcustom.schedulers import SCHEDULERS, TABLE_SCHEDULERS
from realcustom.settings_check import check_mask_scope, check_schedule, check_size
from realcustom.text import TextEmbeddings, TextEncoder, default_negative_prompt
from realcustom.unet import RealCustomUNet


@dataclass
class RealCustomOutput:
    """images: one PIL image (or a latent/tensor row) per sample; masks: [steps, B, S, h/16, w/16]."""

    images: list[Image.Image] | torch.Tensor
    masks: torch.Tensor | None = None

    def mask_images(self, size: tuple[int, int] | None = None) -> list[list[Image.Image]]:
        """The last step's mask per sample and subject as grayscale images (optionally resized)."""
        if self.masks is None:
            raise ValueError("masks were not returned; call the pipeline with return_masks=True")
        return [[mask_to_image(mask, size) for mask in sample] for sample in self.masks[-1]]


def mask_to_image(mask: torch.Tensor, size: tuple[int, int] | None = None) -> Image.Image:
    """[h, w] in [0, 1] -> grayscale image, nearest-neighbour resize so the top-k cells stay crisp."""
    image = Image.fromarray((mask.float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8), mode="L")
    return image.resize(size, Image.Resampling.NEAREST) if size else image


class RealCustomPipeline(nn.Module):
    """All components of one RealCustom++ model (SDXL or SD-1.5 backbone)."""

    def __init__(
        self,
        text_encoder: TextEncoder,
        reference_encoder: ReferenceEncoder,
        projector: nn.Module,
        unet: RealCustomUNet,
        vae: AutoencoderKL,
        name: str = "custom",
        default_size: int = 1024,
        negative_prompt: str | None = None,
    ):
        super().__init__()
        self.text_encoder = text_encoder
        self.reference_encoder = reference_encoder
        self.projector = projector
        self.unet = unet
        self.vae = vae
        self.name = name
        self.default_size = default_size
        self.negative_prompt = default_negative_prompt() if negative_prompt is None else negative_prompt
        self._cache: dict[tuple, object] = {}
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def tokenizer(self):
        return self.text_encoder.tokenizer

    def _apply(self, fn, recurse=True):
        self._cache.clear()  # cached embeddings live on the old device/dtype
        return super()._apply(fn, recurse)

    # ---- building blocks (also used by engines/) -------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> TextEmbeddings:
        embeddings = self.text_encoder(prompts)
        pooled = None if embeddings.pooled is None else embeddings.pooled.to(self.dtype)
        return TextEmbeddings(embeddings.tokens.to(self.dtype), pooled)

    def negative_embeddings(self, batch: int, negative_prompt: str | None = None) -> TextEmbeddings:
        """Negative-prompt embeddings, encoded once per process and prompt."""
        prompt = self.negative_prompt if negative_prompt is None else negative_prompt
        key = ("negative", prompt)
        if key not in self._cache:
            self._cache[key] = self.encode_prompt([prompt])
        cached: TextEmbeddings = self._cache[key]
        pooled = None if cached.pooled is None else cached.pooled.expand(batch, -1)
        return TextEmbeddings(cached.tokens.expand(batch, -1, -1), pooled)

    def target_tokens(self, prompt: str, targets: Sequence[str]) -> torch.Tensor:
        """[S, 77] indicator rows, one per target phrase (raises a ValueError if one is missing)."""
        check_prompt_length(self.tokenizer, prompt)
        rows = [target_token_indicator(self.tokenizer, prompt, target) for target in targets]
        return torch.tensor(rows, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def project(self, features: VisionFeatures) -> torch.Tensor:
        def cast(tokens: torch.Tensor | None) -> torch.Tensor | None:
            return None if tokens is None else tokens.to(self.device, self.dtype)

        return self.projector(
            cast(features.global_tokens), cast(features.local_tokens), cast(features.shallow_tokens)
        )

    @torch.no_grad()
    def image_tokens(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Projector tokens [N, T, C] of reference images."""
        # float32 pixels: the encoder's uint8 truncation must see unrounded values.
        return self.project(self.reference_encoder(self.reference_encoder.to_tensor(list(images))))

    def black_image_tokens(self) -> torch.Tensor:
        """Tokens [1, T, C] of the all-black reference (the CFG negative), computed once per process."""
        key = ("black",)
        if key not in self._cache:
            self._cache[key] = self.project(self.reference_encoder.black_features(1))
        return self._cache[key]

    def time_ids(self, batch: int, height: int, width: int) -> torch.Tensor | None:
        """SDXL micro-conditioning as the official code builds it: [W, H, 0, 0, W, H] (width first)."""
        if not self.unet.is_sdxl:
            return None
        row = torch.tensor([width, height, 0, 0, width, height], dtype=self.dtype, device=self.device)
        return row.expand(batch, -1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.unet.unet.config.in_channels, height // factor, width // factor

    def prepare_latents(
        self, seeds: Sequence[int], counts: Sequence[int], height: int, width: int
    ) -> torch.Tensor:
        """Initial noise: `counts[i]` samples drawn from a CPU generator seeded with `seeds[i]`.

        Drawn on the CPU so a seed gives the same image on any device and in any batch; fp32
        whatever the model's dtype (latents and the sampler's state stay fp32, as in diffusers).
        """
        shape = self.latent_shape(height, width)
        noise = [
            torch.randn((count, *shape), generator=torch.Generator("cpu").manual_seed(seed))
            for seed, count in zip(seeds, counts, strict=True)
        ]
        return torch.cat(noise).to(self.device, torch.float32)

    def prepare_step_noise(
        self, seeds: Sequence[int], counts: Sequence[int], height: int, width: int, steps: int
    ) -> torch.Tensor:
        """The per-step noise of a stochastic sampler (LCM, TCD) [N, steps, C, h, w]: drawn from the
        same CPU generator as `prepare_latents`, after the initial noise, one [count, C, h, w] draw
        per step, the order in which a diffusers pipeline's scheduler draws it from its generator."""
        shape = self.latent_shape(height, width)
        noise = []
        for seed, count in zip(seeds, counts, strict=True):
            generator = torch.Generator("cpu").manual_seed(seed)
            torch.randn((count, *shape), generator=generator)  # the initial noise comes first
            draws = [torch.randn((count, *shape), generator=generator) for _ in range(steps)]
            noise.append(torch.stack(draws, dim=1))
        return torch.cat(noise).to(self.device, torch.float32)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """VAE decode; pixels truncated to uint8 as the official ToPILImage conversion does."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        pixels = self.vae.decode(latents).sample.clamp(-1, 1)
        pixels = (pixels / 2 + 0.5).clamp(0, 1).mul(255).to(torch.uint8)  # truncation, not rounding
        return [Image.fromarray(row) for row in pixels.permute(0, 2, 3, 1).cpu().numpy()]

    # ---- the whole method ------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        subjects: Sequence[tuple[Image.Image, str]] | None = None,
        *,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.5,
        mask_scope: float = 0.25,
        mask_mode: Sequence[str] = ("max_norm",),
        mask_reused_step: int = 12,
        scheduler: str = "dpm",
        timesteps: Sequence[int] | None = None,
        eta: float | None = None,
        loras: Sequence[LoRAChoice] = (),
        overlap: str = "exclusive",
        num_images_per_prompt: int = 1,
        seed: int = 0,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        image_features: Sequence[VisionFeatures] | None = None,
        negative_image_features: VisionFeatures | None = None,
        target_token_masks: torch.Tensor | None = None,
        output_type: str = "pil",
        return_masks: bool = False,
        trace: LoopTrace | None = None,
    ) -> RealCustomOutput:
        # 1. Check inputs.
        height = height or self.default_size
        width = width or self.default_size
        check_size(height, width)
        self._check_settings(mask_mode, mask_scope, scheduler, overlap, num_inference_steps, mask_reused_step)
        targets = [target for _, target in subjects or []]
        if image_features is None and not subjects:
            raise ValueError("give at least one subject: (reference image, target phrase)")
        if target_token_masks is None and not targets:
            raise ValueError("give the target phrase of every subject, or target_token_masks")
        batch = num_images_per_prompt

        # 2. Text: prompt and (cached) negative-prompt embeddings.
        if prompt_embeds is None:
            embeddings = self.encode_prompt([prompt])
            prompt_embeds, pooled_prompt_embeds = embeddings.tokens, embeddings.pooled
        if negative_prompt_embeds is None:
            negative = self.negative_embeddings(1, negative_prompt)
            negative_prompt_embeds, negative_pooled_prompt_embeds = negative.tokens, negative.pooled

        # 3. Target tokens: one τ row per subject, located on token boundaries.
        if target_token_masks is None:
            target_token_masks = self.target_tokens(prompt, targets)
        target_tokens = target_token_masks.to(self.device, self.dtype).reshape(
            -1, *target_token_masks.shape[-2:]
        )

        # 4. Reference images -> projector tokens, one token set per subject; black-image tokens.
        if image_features is not None:
            tokens = torch.stack([self.project(features) for features in image_features], dim=1)
        else:
            # [1, S, T, C]: one token set per subject
            tokens = torch.stack(self.reference_tokens([image for image, _ in subjects])).unsqueeze(0)
        if negative_image_features is not None:
            negative_tokens = self.project(negative_image_features).unsqueeze(1)
        else:
            negative_tokens = self.black_image_tokens().unsqueeze(1)
        num_subjects = tokens.shape[1]
        if target_tokens.shape[-2] != num_subjects:
            raise ValueError(f"{num_subjects} reference(s) but {target_tokens.shape[-2]} target phrase(s)")

        # 5. Initial noise (and a stochastic sampler's per-step noise, from the same seed).
        if latents is None:
            latents = self.prepare_latents([seed], [batch], height, width)
        latents = latents.to(self.device, torch.float32)
        step_noise = None
        if scheduler in TABLE_SCHEDULERS and TABLE_SCHEDULERS[scheduler].stochastic:
            step_noise = self.prepare_step_noise([seed], [batch], height, width, num_inference_steps)
        lora_index = lora_scale = None
        if loras:
            if self.unet.adapters is None:
                raise ValueError("loras need an adapter bank on the UNet (realcustom.lora.bank.AdapterBank)")
            lora_index, lora_scale = self.unet.adapters.rows([list(loras)] * batch)

        # 6. Per-sample conditioning.
        cond = Conditioning(
            prompt_embeds=_rows(prompt_embeds, batch),
            negative_prompt_embeds=_rows(negative_prompt_embeds, batch),
            pooled=None if pooled_prompt_embeds is None else _rows(pooled_prompt_embeds, batch),
            negative_pooled=None
            if negative_pooled_prompt_embeds is None
            else _rows(negative_pooled_prompt_embeds, batch),
            time_ids=self.time_ids(batch, height, width),
            image_tokens=_rows(tokens, batch),
            negative_image_tokens=_rows(negative_tokens, batch).expand(-1, num_subjects, -1, -1),
            target_tokens=_rows(target_tokens, batch),
            guidance_scale=torch.full((batch,), guidance_scale, device=self.device),
            mask_scope=torch.full((batch,), mask_scope, dtype=torch.float64, device=self.device),
            lora_index=lora_index,
            lora_scale=lora_scale,
            step_noise=step_noise,
        )

        # 7. Denoising loop.
        settings = LoopSettings(
            num_inference_steps,
            scheduler,
            tuple(mask_mode),
            mask_reused_step,
            overlap,
            None if timesteps is None else tuple(timesteps),
            eta,
        )
        result = denoise(self.unet, cond, latents, settings, trace)

        # 8. Decode.
        if output_type == "latent":
            images = result.latents
        elif output_type == "pil":
            images = self.decode(result.latents)
        else:
            raise ValueError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        return RealCustomOutput(images, result.masks if return_masks else None)

    def reference_tokens(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Projector tokens [T, C] per image; a photo passed several times is encoded once."""
        distinct: dict[int, Image.Image] = {}
        for image in images:
            distinct.setdefault(id(image), image)
        encoded = dict(zip(distinct, self.image_tokens(list(distinct.values())), strict=True))
        return [encoded[id(image)] for image in images]

    @staticmethod
    def _check_settings(mask_mode, mask_scope, scheduler, overlap, steps, mask_reused_step) -> None:
        check_mask_mode(mask_mode)
        check_mask_scope(mask_scope)
        check_schedule(steps, mask_reused_step)  # the rules the API applies too
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose from {SCHEDULERS}")
        if overlap not in OVERLAP_POLICIES:
            raise ValueError(f"unknown overlap policy {overlap!r}; choose from {OVERLAP_POLICIES}")


def _rows(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast a batch-1 tensor to `batch` rows; a tensor that already has them is kept."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"expected 1 or {batch} rows, got {tensor.shape[0]}")
