"""Training step time of full-size RealCustom++ (random weights): forward, backward, AdamW, EMA.

    python benchmarks/train_step_gpu.py --out results/train_step.json            # SDXL on cuda
    python benchmarks/train_step_gpu.py --model tiny --device cpu --resolution 64 --batch-sizes 1

Uses the trainer's own pieces (`DenoisingLoss`, the freezing and dtype placement, `TrainableEMA`)
on synthetic pixels and references, so the numbers are those of `python -m realcustom.train`
minus data loading. Weights are random (the work per step does not depend on their values). For
each batch size and gradient-checkpointing setting it reports the median step time, images per
second and peak GPU memory; a setting that runs out of memory is recorded as such.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from realcustom.loading import load_pipeline
from realcustom.training.ema import TrainableEMA
from realcustom.training.model import (
    DenoisingLoss,
    freeze_all_but_added_weights,
    image_tokens_kept_for_backward,
    place_for_training,
)

logger = logging.getLogger("train_step_gpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="sdxl-random", help="tiny | sdxl-random | sd15-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--checkpointing",
        nargs="+",
        default=["on", "off"],
        choices=["on", "off"],
        help="gradient checkpointing",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per setting")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(model: str, device: torch.device, mixed_precision: str):
    """The pipeline with its trainable weights, built directly on the device when possible."""
    started = time.perf_counter()
    # Random initialisation of ~3.5B parameters is minutes on a CPU and seconds on a GPU.
    with torch.device(device):
        pipeline = load_pipeline(model, device=device)
    trainable = freeze_all_but_added_weights(pipeline)
    place_for_training(pipeline, device, mixed_precision)
    logger.info("built %s in %.1f s", model, time.perf_counter() - started)
    return pipeline, trainable


def measure(
    objective: DenoisingLoss,
    trainable: dict,
    batch_size: int,
    resolution: int,
    args: argparse.Namespace,
    device: torch.device,
) -> dict:
    pipeline = objective.pipeline
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-5)
    ema = TrainableEMA(trainable, 0.9999)
    reference_size = pipeline.reference_encoder.reference_size
    latent_shape = (batch_size, *pipeline.latent_shape(resolution, resolution))
    generator = torch.Generator("cpu").manual_seed(0)
    pixels = (torch.rand(batch_size, 3, resolution, resolution, generator=generator) * 2 - 1).to(device)
    reference = torch.rand(batch_size, 3, reference_size, reference_size, generator=generator).to(device)
    captions = ["a photo of a dog on the beach, highly detailed"] * batch_size
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    times = []
    for step in range(args.warmup + args.steps):
        noise = torch.randn(latent_shape, generator=generator)
        latent_noise = torch.randn(latent_shape, generator=generator)
        timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
        synchronize(device)
        started = time.perf_counter()
        with (
            torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
            image_tokens_kept_for_backward(pipeline),
        ):
            loss = objective(pixels, reference, captions, noise, latent_noise, timesteps)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
        synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {
        "step_seconds_median": median,
        "step_seconds_all": times,
        "images_per_second": batch_size / median,
        "loss_last": float(loss.detach()),
    }


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    pipeline, trainable = build(args.model, device, args.mixed_precision)
    objective = DenoisingLoss(pipeline).to(device)
    results = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else args.device,
        "mixed_precision": args.mixed_precision,
        "resolution": args.resolution,
        "reference_size": pipeline.reference_encoder.reference_size,
        "trainable_parameters": sum(p.numel() for p in trainable.values()),
        "torch": torch.__version__,
        "runs": [],
    }
    for checkpointing in args.checkpointing:
        unet = pipeline.unet.unet
        if checkpointing == "on":
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        for batch_size in args.batch_sizes:
            run = {"batch_size": batch_size, "gradient_checkpointing": checkpointing == "on"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                run.update(measure(objective, trainable, batch_size, args.resolution, args, device))
            except torch.OutOfMemoryError:
                run["out_of_memory"] = True
            for parameter in trainable.values():
                parameter.grad = None
            if device.type == "cuda":
                run["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            logger.info("%s", json.dumps({k: v for k, v in run.items() if k != "step_seconds_all"}))
            results["runs"].append(run)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        logger.info("wrote %s", args.out)
    return results


if __name__ == "__main__":
    main()
