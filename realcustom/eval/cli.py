"""`python -m realcustom.eval`: the DreamBench protocol end to end, resumable.

Bad input (missing dataset, unloadable metric model, a resumed run with other settings) prints one
line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from realcustom.eval.dreambench import build_cases, load_dreambench
from realcustom.eval.gallery import write_gallery
from realcustom.eval.generators import PipelineGenerator, Sampling, ServiceGenerator
from realcustom.eval.harness import RunConfig, check_or_store_config, run_cases
from realcustom.eval.report import write_results
from realcustom.eval.scorers import DEFAULT_CLIP_B, DEFAULT_CLIP_L, DEFAULT_DINO, load_scorers, tiny_scorers

logger = logging.getLogger("realcustom.eval")
PROTOCOLS = {"single": ("single",), "multi": ("multi",), "both": ("single", "multi")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m realcustom.eval", description=__doc__)
    parser.add_argument("--dreambench", required=True, type=Path, help="the DreamBench dataset/ folder")
    parser.add_argument("--model", default="tiny", help="'tiny', 'sdxl-random' or a checkpoint directory")
    parser.add_argument("--out", required=True, type=Path, help="output folder (resumed when it exists)")
    parser.add_argument("--subjects", type=int, default=None, help="first N subjects (default: all 30)")
    parser.add_argument("--prompts", type=int, default=None, help="first N prompts (default: all 25)")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="single")
    parser.add_argument("--size", type=int, default=None, help="output side in px (default: the model's)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--mask-scope", type=float, default=0.25)
    parser.add_argument("--mask-reused-step", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses seed + i")
    parser.add_argument("--device", default="cpu", help="torch device of the model and the metrics")
    parser.add_argument("--service", default=None, help="URL of a running service to generate with")
    parser.add_argument("--api-key", default=None, help="bearer key for --service")
    parser.add_argument("--clip-b", default=DEFAULT_CLIP_B, help="CLIP ViT-B/32: hub id or directory")
    parser.add_argument("--clip-l", default=DEFAULT_CLIP_L, help="CLIP ViT-L/14: hub id or directory")
    parser.add_argument("--dino", default=DEFAULT_DINO, help="DINO ViT-S/16: hub id or directory")
    parser.add_argument(
        "--tiny-metrics", action="store_true", help="random-weight metric models (smoke tests only)"
    )
    return parser


def evaluate(args: argparse.Namespace) -> Path:
    bench = load_dreambench(args.dreambench)
    protocols = PROTOCOLS[args.protocol]
    cases = [
        case for protocol in protocols for case in build_cases(bench, protocol, args.subjects, args.prompts)
    ]
    if not cases:
        raise ValueError("no cases to run: check --subjects/--prompts (multi needs two subjects)")
    scorers = (
        tiny_scorers()
        if args.tiny_metrics
        else load_scorers(args.clip_b, args.clip_l, args.dino, args.device)
    )

    if args.service:
        if args.size is None:
            raise ValueError("--size is required with --service (the service's model is not known here)")
        generator = ServiceGenerator(args.service, args.api_key)
        size = args.size
    else:
        from realcustom.loading import load_pipeline  # imported late: only in-process runs need it

        pipeline = load_pipeline(args.model, device=args.device)
        generator = PipelineGenerator(pipeline)
        size = args.size or pipeline.default_size
    sampling = Sampling(size, args.steps, args.guidance_scale, args.mask_scope, args.mask_reused_step)
    config = RunConfig(
        dreambench=str(args.dreambench.resolve()),
        model=args.model,
        protocols=protocols,
        num_subjects=args.subjects,
        num_prompts=args.prompts,
        images_per_prompt=args.images_per_prompt,
        base_seed=args.seed,
        sampling=sampling,
        metric_models=scorers.description,
    )
    check_or_store_config(args.out, config)
    try:
        records = run_cases(args.out, cases, generator, scorers, sampling, args.images_per_prompt, args.seed)
    finally:
        if isinstance(generator, ServiceGenerator):
            generator.close()
    random_weights = args.tiny_metrics or args.model == "tiny" or args.model.endswith("-random")
    results = write_results(args.out, config, records, random_weights)
    used = sorted({subject for case in cases for subject in case.subjects}, key=bench.subjects.index)
    write_gallery(args.out, results, used)
    logger.info("wrote %s/results.md, results.json and index.html", args.out)
    return args.out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        evaluate(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
