"""`python -m realcustom.train --config FILE --output-dir DIR [--resume-from latest|PATH]`.

Trains the projector and the image cross-attention with the config's curriculum; works the same
under `accelerate launch` or `torchrun` on one or many GPUs. Writes
DIR/checkpoint-STEP/ (official key layout, loadable with `--model DIR/checkpoint-STEP`),
DIR/metrics.jsonl and DIR/samples/. See docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("realcustom.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m realcustom.train", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="training YAML (configs/train/*.yaml)")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument(
        "--resume-from",
        default=None,
        help="'latest' (the newest checkpoint in --output-dir, if any) or a checkpoint directory",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from realcustom.training.checkpoints import latest_checkpoint  # torch start-up is slow
    from realcustom.training.config import load_config
    from realcustom.training.trainer import Trainer

    try:
        config = load_config(args.config)
    except (OSError, ValueError) as error:
        logger.error("bad config %s: %s", args.config, error)
        return 2
    resume = args.resume_from
    if resume == "latest":
        resume = latest_checkpoint(args.output_dir)
        logger.info("resuming from %s", resume or "scratch (no checkpoint yet)")
    trainer = Trainer(config, args.output_dir)
    steps = trainer.train(resume_from=resume)
    logger.info("done: %d steps, checkpoints and metrics in %s", steps, args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
