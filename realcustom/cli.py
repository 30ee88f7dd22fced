"""Command line: `python -m realcustom generate ...`.

Bad input (unreadable image, target phrase not in the prompt, bad size) prints one line on
stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from PIL import Image

from realcustom.decoding import ImageRejectedError, decode_reference
from realcustom.masks import MASK_MODES, OVERLAP_POLICIES
from realcustom.phrases import check_prompt_length, locate_phrase
from realcustom.presets import PRESETS
from realcustom.schedulers import SCHEDULERS
from realcustom.settings_check import SIZE_MULTIPLE, check_mask_scope, check_schedule, check_size
from realcustom.tokenizer import load_clip_tokenizer

logger = logging.getLogger("realcustom")


class UsageError(Exception):
    """Input the user must fix; reported as one line with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m realcustom", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="customise one prompt with one or more reference photos")
    gen.add_argument(
        "--model", default="tiny", help="'tiny' (default), 'sdxl-random', or a checkpoint directory"
    )
    gen.add_argument(
        "--image", action="append", required=True, help="reference photo; repeat for more subjects"
    )
    gen.add_argument("--target", action="append", required=True, help="target phrase per --image, in order")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument(
        "--out", required=True, type=Path, help="output image (PNG); several images get _1, _2 ..."
    )
    gen.add_argument("--mask-out", type=Path, help="write the final mask(s) here, subjects side by side")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=25)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--guidance-scale", type=float, default=3.5)
    gen.add_argument("--mask-scope", type=float, default=0.25)
    gen.add_argument("--mask-mode", nargs="+", default=["max_norm"], choices=[*MASK_MODES, "none"])
    gen.add_argument("--mask-reused-step", type=int, default=12)
    gen.add_argument("--scheduler", default="dpm", choices=SCHEDULERS)
    gen.add_argument("--overlap", default="exclusive", choices=OVERLAP_POLICIES)
    gen.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="fast mode: the sampler, steps, guidance and mask schedule of a distilled adapter family "
        "(replaces --steps, --scheduler, --guidance-scale, --mask-reused-step); load its adapter with --lora",
    )
    gen.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="SOURCE[=SCALE]",
        help="a LoRA adapter (safetensors file, name in --lora-dir, or hub id) and its scale (1); repeatable",
    )
    gen.add_argument("--lora-dir", type=Path, default=None, help="where --lora names are looked up")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--device", default="cpu")
    return parser


def read_image(path: str) -> Image.Image:
    """The reference exactly as the service decodes it (realcustom.decoding)."""
    try:
        return decode_reference(Path(path).read_bytes())
    except (OSError, ImageRejectedError) as error:
        raise UsageError(f"cannot read image {path}: {error}") from error


def lora_choices(values: list[str]) -> list[tuple[str, float]]:
    """`SOURCE[=SCALE]` -> (source, scale)."""
    choices = []
    for value in values:
        source, _, scale = value.rpartition("=") if "=" in value else (value, "", "1")
        try:
            choices.append((source, float(scale)))
        except ValueError as error:
            raise UsageError(f"--lora {value}: the scale after '=' must be a number") from error
    return choices


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked without the model, so bad input fails in a second."""
    if args.preset is not None:
        settings = PRESETS[args.preset].settings()
        args.steps, args.scheduler = settings["num_inference_steps"], settings["scheduler"]
        args.guidance_scale, args.mask_reused_step = settings["guidance_scale"], settings["mask_reused_step"]
    args.loras = lora_choices(args.lora)
    if len(args.image) != len(args.target):
        raise UsageError(
            f"give one --target per --image ({len(args.image)} images, {len(args.target)} targets)"
        )
    try:
        check_size(args.height or SIZE_MULTIPLE, args.width or SIZE_MULTIPLE)  # unset: the model's size
        check_schedule(args.steps, args.mask_reused_step)
        check_mask_scope(args.mask_scope)
        tokenizer = load_clip_tokenizer()  # the BPE every model's tokenizers share
        check_prompt_length(tokenizer, args.prompt)
        for target in args.target:
            locate_phrase(tokenizer, args.prompt, target)
    except ValueError as error:
        raise UsageError(str(error)) from error


def generate(args: argparse.Namespace) -> None:
    from realcustom.loading import load_pipeline  # imported late: torch start-up is slow

    check_arguments(args)
    images = {path: read_image(path) for path in args.image}
    subjects = [(images[path], target) for path, target in zip(args.image, args.target, strict=True)]
    pipeline = load_pipeline(args.model, device=args.device)
    preset = PRESETS[args.preset].settings() if args.preset else {}
    try:
        loras = install_loras(pipeline, args.loras, args.lora_dir)
        output = pipeline(
            args.prompt,
            subjects,
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            mask_scope=args.mask_scope,
            mask_mode=args.mask_mode,
            mask_reused_step=args.mask_reused_step,
            scheduler=args.scheduler,
            timesteps=preset.get("timesteps"),
            eta=preset.get("eta"),
            loras=loras,
            overlap=args.overlap,
            num_images_per_prompt=args.num_images,
            seed=args.seed,
            return_masks=args.mask_out is not None,
        )
    except ValueError as error:
        raise UsageError(str(error)) from error
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(output.images):
        path = args.out if len(output.images) == 1 else args.out.with_stem(f"{args.out.stem}_{index + 1}")
        image.save(path)
        logger.info("wrote %s", path)
    if args.mask_out is not None:
        size = output.images[0].size
        masks = output.mask_images(size)[0]
        sheet = Image.new("L", (size[0] * len(masks), size[1]))
        for index, mask in enumerate(masks):
            sheet.paste(mask, (index * size[0], 0))
        args.mask_out.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(args.mask_out)
        logger.info("wrote %s", args.mask_out)


def install_loras(pipeline, choices: list[tuple[str, float]], lora_dir: Path | None) -> list:
    """Load the adapters into a bank sized for exactly them; their per-row choices."""
    if not choices:
        return []
    from realcustom.lora.bank import AdapterBank
    from realcustom.lora.files import load_adapter
    from realcustom.lora.requests import LoRAChoice

    adapters = [load_adapter(source, pipeline.unet.unet, lora_dir=lora_dir) for source, _ in choices]
    targets = sorted({name for adapter in adapters for name in adapter.modules})
    rank = max(adapter.rank for adapter in adapters)
    bank = AdapterBank(pipeline.unet, targets=targets, slots=len(adapters), rank=rank, per_row=len(adapters))
    for adapter in adapters:
        bank.load(adapter)
    return [LoRAChoice(adapter.name, scale) for adapter, (_, scale) in zip(adapters, choices, strict=True)]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        generate(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
