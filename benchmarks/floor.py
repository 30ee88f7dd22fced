"""The computed floor: FLOPs per step kind and per image, and the time they take at peak throughput.

Every model is built on the meta device (shapes only: no weights allocated, no arithmetic done) and
each part runs through its real entry point under `torch.utils.flop_counter.FlopCounterMode`:

    text encoders        pipeline.encode_prompt, one prompt per sample (B requests batched)
    reference encoder    SigLIP + DINOv2 over the five views, one reference per sample and subject
    projector            pipeline.project of those features
    image K/V            unet.image_key_values of [reference; black] tokens, once per request
    MASK_UPDATE step     unet.guidance (batch B) + unet.generation (batch 2B: cond + uncond)
    MASK_REUSE step      unet.generation (batch 2B)
    (fast mode, no CFG:  the generation pass has batch B: guidance scale <= 1 leaves out the
                         unconditional half; with `--fast-lora-rank R` every pass also carries a
                         per-row LoRA of rank R on the transformer layers, realcustom/lora)
    VAE decode           vae.decode of the final latents (pipeline.decode ends in PIL, not meta)

Not per image: the negative-prompt embeddings and the black-image tokens are computed once per
process (pipeline caches). FLOP = 2 x multiply-accumulate, counted for matmuls, convolutions and
attention only; element-wise work (norms, activations, masks, CFG, the scheduler update) is
memory-bound and not counted. Attention runs on the MATH backend, where SDPA is two batched matmuls
the counter sees on every device (on the CPU the fused kernel is not counted at all).

The default run adds the fast-mode floor beside the 25-step one: SDXL 1024², 4 steps (masks
updated at the first 2, realcustom/presets.py), no CFG, with the distilled adapter fused (no LoRA
work) and as a per-row rank-64 LoRA.

Floors: at 790 TFLOP/s (bf16 dense matmul measured on an H200 in this workplace) and at 989 TFLOP/s
(NVIDIA's H100 SXM datasheet figure for dense BF16; the H200 datasheet gives the same).

    python benchmarks/floor.py                                # sdxl 1024², sd15 512², batch 1 + fast
    python benchmarks/floor.py --models sdxl --batch 4 --fast-models "" --out-dir /tmp/floor
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from realcustom.lora.bank import AdapterBank
from realcustom.masks import generate_masks
from realcustom.models import SPECS, build_pipeline
from realcustom.pipeline import RealCustomPipeline

MEASURED_H200_TFLOPS = 790.0
H100_SXM_DATASHEET_TFLOPS = 989.0
RATES = {"h200_measured_790": MEASURED_H200_TFLOPS, "h100_datasheet_989": H100_SXM_DATASHEET_TFLOPS}
PROMPT = "a photo of a cat in the snow"
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class FloorSettings:
    model: str = "sdxl"
    batch: int = 1
    subjects: int = 1
    steps: int = 25
    mask_reused_step: int = 12
    size: int | None = None  # None: the spec's default (sdxl 1024, sd15 512)
    cfg: bool = True  # False: CFG-free (guidance <= 1), the generation pass has batch B
    lora_rank: int = 0  # > 0: every row carries a per-row LoRA of this rank
    lora_targets: str = "transformer"

    def __post_init__(self) -> None:
        if self.model not in SPECS:
            raise ValueError(f"unknown model {self.model!r}; choose from {sorted(SPECS)}")
        if min(self.batch, self.subjects, self.steps, self.mask_reused_step) < 1:
            raise ValueError("batch, subjects, steps and mask_reused_step must be at least 1")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.size is not None and (self.size <= 0 or self.size % 32):
            raise ValueError(f"size must be a positive multiple of 32, got {self.size}")

    @property
    def update_steps(self) -> int:
        # realcustom/denoise.py: the mask is recomputed while k < mask_reused_step (always at k = 0).
        return min(self.steps, self.mask_reused_step)

    @property
    def reuse_steps(self) -> int:
        return self.steps - self.update_steps


def count_flops(fn: Callable, *args, **kwargs) -> tuple[int, object]:
    """(FLOPs, result) of one call, attention on the MATH backend so that it is counted."""
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    return counter.get_total_flops(), result


def meta_pipeline(model: str) -> RealCustomPipeline:
    """The full architecture of `model` with every parameter on the meta device (no memory)."""
    with torch.device("meta"):
        return build_pipeline(SPECS[model])


def meta_plain_unet(model: str) -> UNet2DConditionModel:
    """The stock diffusers UNet of `model` (no RealCustom processors), for comparison."""
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(SPECS[model].unet)


def count_parts(
    pipeline: RealCustomPipeline, plain_unet: UNet2DConditionModel, settings: FloorSettings
) -> tuple[dict[str, int], int]:
    """FLOPs of each part for one batch of `settings.batch` requests (see the module docstring).

    `pipeline` must be fresh: its first negative-prompt and black-image calls are what get counted.
    """
    batch, subjects = settings.batch, settings.subjects
    size = settings.size or pipeline.default_size
    unet = pipeline.unet
    meta = torch.device("meta")
    flops: dict[str, int] = {}
    generation_rows = 2 * batch if settings.cfg else batch
    guidance_adapters = generation_adapters = None
    if settings.lora_rank:
        AdapterBank(unet, targets=settings.lora_targets, slots=1, rank=settings.lora_rank, per_row=1)

        def adapters(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.zeros(rows, 1, dtype=torch.int64, device=meta), torch.ones(rows, 1, device=meta)

        guidance_adapters, generation_adapters = adapters(batch), adapters(generation_rows)

    # First calls on a fresh pipeline: these two compute and cache their once-per-process results.
    flops["negative_prompt"], negative = count_flops(pipeline.negative_embeddings, batch)
    flops["black_image_tokens"], black = count_flops(pipeline.black_image_tokens)
    flops["text_encoders"], text = count_flops(pipeline.encode_prompt, [PROMPT] * batch)
    # Host-side resize of the photos (PIL -> [N, 3, R, R]) happens on the CPU, outside the count.
    encoder = pipeline.reference_encoder
    pixels = encoder.to_tensor([Image.new("RGB", (512, 512))] * (batch * subjects))
    flops["reference_encoder"], features = count_flops(encoder, pixels)
    flops["projector"], tokens = count_flops(pipeline.project, features)
    tokens = tokens.unflatten(0, (batch, subjects))
    black = black.unsqueeze(1).expand(batch, subjects, -1, -1)
    # CFG-free rows need no black-image K/V (no unconditional pass).
    kv_tokens = torch.cat([tokens, black]) if settings.cfg else tokens
    flops["image_kv"], image_kv = count_flops(unet.image_key_values, kv_tokens)

    latents = pipeline.prepare_latents([0], [batch], size, size)
    timestep = torch.full((batch,), 999, device=meta)
    time_ids = pipeline.time_ids(batch, size, size)
    target_tokens = torch.ones(batch, subjects, 77, device=meta)  # values do not change the work
    flops["guidance_pass"], (_, maps, _) = count_flops(
        unet.guidance,
        latents,
        timestep,
        text.tokens,
        text.pooled,
        time_ids,
        target_tokens,
        adapters=guidance_adapters,
    )
    mask_size = (latents.shape[-2] // 2, latents.shape[-1] // 2)
    masks, _ = generate_masks(maps, mask_size, ("max_norm",), torch.full((batch,), 0.25, device=meta))

    def both(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
        if first is None or not settings.cfg:  # CFG-free: the conditional rows only
            return first
        return torch.cat([first, second])

    flops["generation_pass"], _ = count_flops(
        unet.generation,
        both(latents, latents),
        both(timestep, timestep),
        both(text.tokens, negative.tokens),
        both(text.pooled, negative.pooled),
        both(time_ids, time_ids),
        masks=both(masks, masks),
        image_key_values=image_kv,
        adapters=generation_adapters,
    )
    flops["vae_decode"], _ = count_flops(pipeline.vae.decode, latents / pipeline.vae.config.scaling_factor)

    added = {"text_embeds": text.pooled, "time_ids": time_ids} if unet.is_sdxl else None
    flops["plain_unet_forward"], _ = count_flops(
        plain_unet, latents, timestep, encoder_hidden_states=text.tokens, added_cond_kwargs=added
    )
    return flops, size


def floor(settings: FloorSettings) -> dict:
    """The floor of one model: FLOPs per part, per step kind, per batch and per image, and times."""
    parts, size = count_parts(meta_pipeline(settings.model), meta_plain_unet(settings.model), settings)
    per_step = {
        "mask_update": parts["guidance_pass"] + parts["generation_pass"],
        "mask_reuse": parts["generation_pass"],
    }
    per_batch = {
        "text_encoders": parts["text_encoders"],
        "reference_encoder": parts["reference_encoder"],
        "projector": parts["projector"],
        "image_kv": parts["image_kv"],
        "mask_update_steps": settings.update_steps * per_step["mask_update"],
        "mask_reuse_steps": settings.reuse_steps * per_step["mask_reuse"],
        "vae_decode": parts["vae_decode"],
    }
    total = sum(per_batch.values())
    return {
        "settings": {**asdict(settings), "size": size},
        "update_steps": settings.update_steps,
        "reuse_steps": settings.reuse_steps,
        "parts": parts,
        "per_step": per_step,
        "per_batch": per_batch,
        "total": total,
        "per_image": total / settings.batch,
        "floor_ms": {name: total / (rate * 1e12) * 1e3 for name, rate in RATES.items()},
    }


def _tflop(flops: float) -> str:
    return f"{flops / 1e12:.4g}"


def _ms(flops: float) -> str:
    return " | ".join(f"{flops / (rate * 1e12) * 1e3:.1f}" for rate in RATES.values())


def markdown(report: dict) -> str:
    """One table per model: count, TFLOP each, TFLOP in the batch, ms at each rate."""
    lines = []
    for result in report["models"]:
        s = result["settings"]
        parts, per_step, b = result["parts"], result["per_step"], s["batch"]
        refs = b * s["subjects"]
        cfg = s.get("cfg", True)
        generation = "generation pass (batch 2B)" if cfg else "generation pass (batch B, no CFG)"
        kv = "image K/V, every layer, [reference; black]" if cfg else "image K/V, every layer, reference"
        rows = [
            ("text encoders (prompt)", b, parts["text_encoders"] / b),
            ("reference encoder (SigLIP + DINOv2, 5 views)", refs, parts["reference_encoder"] / refs),
            ("projector", refs, parts["projector"] / refs),
            (kv, 1, parts["image_kv"]),
            ("MASK_UPDATE step", result["update_steps"], per_step["mask_update"]),
            ("· guidance pass (batch B)", result["update_steps"], parts["guidance_pass"]),
            (f"· {generation}", result["update_steps"], parts["generation_pass"]),
            (f"MASK_REUSE step: {generation}", result["reuse_steps"], per_step["mask_reuse"]),
            ("VAE decode", b, parts["vae_decode"] / b),
        ]
        lines += [
            f"### {s['model']} {s['size']}², batch {b}, {s['subjects']} subject(s), {s['steps']} steps, "
            f"mask_reused_step {s['mask_reused_step']}"
            + ("" if cfg else ", no CFG (fast mode)")
            + (f", per-row LoRA rank {s['lora_rank']} ({s['lora_targets']})" if s.get("lora_rank") else ""),
            "",
            "| part | count | TFLOP each | TFLOP | ms @ 790 TFLOP/s | ms @ 989 TFLOP/s |",
            "|---|---|---|---|---|---|",
        ]
        for name, count, each in rows:
            shown = "" if name.startswith("·") else _ms(count * each)
            total = _tflop(count * each) if shown else ""
            lines.append(f"| {name} | {count} | {_tflop(each)} | {total} | {shown or ' | '} |")
        lines += [
            f"| **total per batch** | | | **{_tflop(result['total'])}** | {_ms(result['total'])} |",
            f"| **per image** | | | **{_tflop(result['per_image'])}** | {_ms(result['per_image'])} |",
            f"| not per image: negative prompt, black-image tokens (once per process) | 1 | | "
            f"{_tflop(parts['negative_prompt'] + parts['black_image_tokens'])} | | |",
            f"| for comparison: stock diffusers UNet forward, batch B | | "
            f"{_tflop(parts['plain_unet_forward'])} | | | |",
            "",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sdxl,sd15", help="comma-separated: sdxl, sd15, tiny, tiny-sd15")
    parser.add_argument("--batch", type=int, default=1, help="requests batched in one loop (B)")
    parser.add_argument("--subjects", type=int, default=1, help="reference subjects per request (S)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--mask-reused-step", type=int, default=12)
    parser.add_argument("--size", type=int, default=None, help="image side; default per model")
    parser.add_argument("--no-cfg", action="store_true", help="the --models floors without CFG")
    parser.add_argument(
        "--fast-models", default="sdxl", help="fast-mode floors too (comma-separated; '' none)"
    )
    parser.add_argument("--fast-steps", type=int, default=4)
    parser.add_argument("--fast-mask-reused-step", type=int, default=2)
    parser.add_argument(
        "--fast-lora-rank",
        type=int,
        default=64,
        help="also a fast floor with a per-row LoRA of this rank (0: no)",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where floor.{json,md} go")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = []
    for model in [name.strip() for name in args.models.split(",") if name.strip()]:
        settings = FloorSettings(
            model, args.batch, args.subjects, args.steps, args.mask_reused_step, args.size, not args.no_cfg
        )
        results.append(floor(settings))
    for model in [name.strip() for name in args.fast_models.split(",") if name.strip()]:
        for rank in sorted({0, args.fast_lora_rank}):
            fast = FloorSettings(
                model,
                args.batch,
                args.subjects,
                args.fast_steps,
                args.fast_mask_reused_step,
                args.size,
                cfg=False,
                lora_rank=rank,
            )
            results.append(floor(fast))
    report = {"rates_tflops": RATES, "models": results}
    table = markdown(report)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "floor.json").write_text(json.dumps(report, indent=2) + "\n")
    command = "python benchmarks/floor.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = f"# Computed floor (FLOPs on the meta device)\n\n`{command.strip()}`\n\n"
    (args.out_dir / "floor.md").write_text(header + table)
    return report


if __name__ == "__main__":
    main()
