"""The training loop: curriculum stages, accelerate (one or many GPUs), EMA, checkpoints, logs.

Every random draw (which record, crops, dropout, noise, timestep, VAE posterior sample) is a
function of (run seed, stage, sample index), and a step's samples are numbered step * global batch
+ position. So a run resumed from `checkpoint-N` takes exactly the steps the uninterrupted run
would have taken after step N, and splitting the same global batch over more devices or
micro-batches trains on the same samples with the same noise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from realcustom.loading import apply_realcustom_weights, load_from_directory, load_pipeline
from realcustom.pipeline import RealCustomPipeline
from realcustom.training.checkpoints import checkpoint_dir, load_checkpoint, save_checkpoint
from realcustom.training.config import TrainConfig, is_model_name
from realcustom.training.curriculum import Curriculum, StageSpan
from realcustom.training.data import (
    Record,
    SampleNumbering,
    StageDataset,
    collate,
    load_rgb,
    read_manifest,
    torch_seed,
)
from realcustom.training.dreambench import build_dreambench_manifest
from realcustom.training.ema import TrainableEMA
from realcustom.training.model import (
    DenoisingLoss,
    freeze_all_but_added_weights,
    image_tokens_kept_for_backward,
    init_vision_from_text,
    place_for_training,
)

logger = logging.getLogger(__name__)

# Stage number of the held-out evaluation samples: a seed stream no training stage uses.
EVALUATION_STREAM = 2**31
# Last seed word of a sample's noise draw, to keep it apart from the sample's data draw.
NOISE_STREAM = 1
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"


@dataclass(frozen=True)
class NoiseDraw:
    """The random tensors of one micro-batch."""

    noise: torch.Tensor
    latent_noise: torch.Tensor
    timesteps: torch.Tensor


class Trainer:
    """Builds the model and data for a config and runs (or resumes) its curriculum."""

    def __init__(self, config: TrainConfig, output_dir: str | Path, accelerator: Accelerator | None = None):
        self.config = config
        self.output_dir = Path(output_dir)
        optim = config.training
        self.accelerator = accelerator or Accelerator(mixed_precision=optim.mixed_precision)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            (self.output_dir / "train_config.json").write_text(json.dumps(describe(config), indent=2) + "\n")
        self.records = self._records()
        self.curriculum = Curriculum(config.stages)
        self.pipeline = self._pipeline()
        self.trainable = freeze_all_but_added_weights(self.pipeline)
        if optim.gradient_checkpointing:
            self.pipeline.unet.unet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(
            list(self.trainable.values()), lr=optim.learning_rate, weight_decay=optim.weight_decay
        )
        self.loss_module, self.optimizer = self.accelerator.prepare(DenoisingLoss(self.pipeline), optimizer)
        self.ema = None if optim.ema_decay is None else TrainableEMA(self.trainable, optim.ema_decay)
        logger.info(
            "training %d tensors (%.2fM parameters) over %d steps in %d stage(s)",
            len(self.trainable),
            sum(p.numel() for p in self.trainable.values()) / 1e6,
            self.curriculum.total_steps,
            len(self.curriculum.spans),
        )

    # ---- set-up ----------------------------------------------------------------------------

    def _records(self) -> list[Record]:
        data = self.config.data
        if data.manifest is not None:
            return read_manifest(data.manifest)
        data_dir = self.output_dir / "data"
        manifest = data_dir / "train.jsonl"
        if self.accelerator.is_main_process and not manifest.is_file():
            build_dreambench_manifest(data.dreambench, data_dir, self.config.seed)
        self.accelerator.wait_for_everyone()
        return read_manifest(manifest)

    def _pipeline(self) -> RealCustomPipeline:
        model = self.config.model
        if is_model_name(model.base):
            pipeline = load_pipeline(model.base, seed=model.seed)
        else:
            # A backbone directory may lack RealCustom weights: they then start from `model.seed`.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(model.seed)
                pipeline = load_from_directory(model.base, backbone_only=True)
        if model.vision_init == "from_text":
            init_vision_from_text(pipeline)
        if model.init_weights is not None:  # explicit starting weights win over vision_init
            apply_realcustom_weights(pipeline, model.init_weights)
        place_for_training(pipeline, self.accelerator.device, self.config.training.mixed_precision)
        return pipeline

    # ---- the run ---------------------------------------------------------------------------

    def train(self, resume_from: str | Path | None = None) -> int:
        """Run the remaining curriculum; returns the number of completed steps."""
        completed = 0
        if resume_from is not None:
            completed = load_checkpoint(
                Path(resume_from), trainable=self.trainable, ema=self.ema, optimizer=self.optimizer
            )
        metrics = self._open_metrics(completed)
        if completed == 0:
            self._evaluate(0, self.curriculum.spans[0].stage.name)
        try:
            for span, first_step in self.curriculum.remaining(completed):
                completed = self._run_stage(span, first_step, metrics)
        finally:
            if metrics is not None:
                metrics.close()
        self.accelerator.wait_for_everyone()
        return completed

    def _run_stage(self, span: StageSpan, first_step: int, metrics) -> int:
        optim = self.config.training
        accelerator = self.accelerator
        stage = span.stage
        logger.info(
            "stage %d %r: steps %d-%d, resolution %d, sources %s",
            span.index,
            stage.name,
            first_step,
            span.end,
            stage.resolution,
            [(source.kind, source.weight) for source in stage.sources],
        )
        numbering = SampleNumbering(
            batch_size=optim.batch_size,
            accumulation=optim.gradient_accumulation_steps,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
        )
        dataset = StageDataset(
            self.records,
            stage,
            self.pipeline.reference_encoder.reference_size,
            optim.image_dropout,
            self.config.seed,
            span.index,
        )
        loader = DataLoader(
            dataset,
            batch_sampler=list(numbering.batches(first_step, span.end)),
            collate_fn=collate,
            num_workers=self.config.data.num_workers,
        )
        batches = iter(loader)
        started = time.perf_counter()
        for step in range(first_step, span.end):
            loss, dropped = self._optimizer_step(step, span.index, batches)
            completed = step + 1
            if completed % optim.log_every == 0 or completed == span.end:
                record = {
                    "step": completed,
                    "stage": stage.name,
                    "loss": loss,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "dropped_fraction": dropped,
                    "seconds_per_step": (time.perf_counter() - started) / (completed - first_step),
                }
                self._log(metrics, record)
            if completed % optim.checkpoint_every == 0 or completed == span.end:
                self._save(completed, stage.name)
                self._evaluate(completed, stage.name)
        if self.config.sampling is not None:
            self._sample(span, span.end)
        return span.end

    def _optimizer_step(self, step: int, stage_index: int, batches) -> tuple[float, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; (loss, dropped share)."""
        optim = self.config.training
        accelerator = self.accelerator
        for group in self.optimizer.param_groups:
            group["lr"] = optim.learning_rate * min(1.0, (step + 1) / max(1, optim.warmup_steps))
        losses, dropped = [], []
        accumulation = optim.gradient_accumulation_steps
        for micro in range(accumulation):
            batch = next(batches)
            draw = self._draw(batch, stage_index)
            last = micro == accumulation - 1
            # Gradients are all-reduced only on the last micro-batch of the step.
            sync = contextlib.nullcontext() if last else accelerator.no_sync(self.loss_module)
            with sync, image_tokens_kept_for_backward(self.pipeline):
                loss = self.loss_module(
                    batch["pixels"].to(accelerator.device),
                    batch["reference"].to(accelerator.device),
                    batch["captions"],
                    draw.noise,
                    draw.latent_noise,
                    draw.timesteps,
                )
                accelerator.backward(loss / accumulation)
            losses.append(loss.detach())
            dropped.append(batch["dropped"].float().mean().to(accelerator.device))
        accelerator.clip_grad_norm_(list(self.trainable.values()), optim.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        mean_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean")
        mean_dropped = accelerator.reduce(torch.stack(dropped).mean(), reduction="mean")
        return float(mean_loss), float(mean_dropped)

    def _draw(self, batch: dict, stage_index: int) -> NoiseDraw:
        """Noise, VAE posterior draw and timestep of every sample, each from the sample's own seed
        (on the CPU, so any device, batch split or device count draws the same numbers)."""
        shape = self.pipeline.latent_shape(*batch["pixels"].shape[-2:])
        num_timesteps = self.loss_module_unwrapped.num_train_timesteps
        noise, latent_noise, timesteps = [], [], []
        for index in batch["indices"]:
            generator = torch.Generator("cpu").manual_seed(
                torch_seed(self.config.seed, stage_index, index, NOISE_STREAM)
            )
            noise.append(torch.randn(shape, generator=generator))
            latent_noise.append(torch.randn(shape, generator=generator))
            timesteps.append(torch.randint(0, num_timesteps, (), generator=generator))
        return NoiseDraw(torch.stack(noise), torch.stack(latent_noise), torch.stack(timesteps))

    @property
    def loss_module_unwrapped(self) -> DenoisingLoss:
        return self.accelerator.unwrap_model(self.loss_module)

    @torch.no_grad()
    def evaluation_loss(self) -> float:
        """Mean loss over the held-out samples with the weights currently in the model."""
        evaluation = self.config.evaluation
        span = self.curriculum.spans[-1]
        dataset = StageDataset(
            self.records,
            span.stage,
            self.pipeline.reference_encoder.reference_size,
            0.0,
            self.config.seed,
            EVALUATION_STREAM,
        )
        batch_size = self.config.training.batch_size
        total = 0.0
        for first in range(0, evaluation.samples, batch_size):
            batch = collate([dataset[i] for i in range(first, min(first + batch_size, evaluation.samples))])
            draw = self._draw(batch, EVALUATION_STREAM)
            with self.accelerator.autocast():
                loss = self.loss_module_unwrapped(
                    batch["pixels"].to(self.accelerator.device),
                    batch["reference"].to(self.accelerator.device),
                    batch["captions"],
                    draw.noise,
                    draw.latent_noise,
                    draw.timesteps,
                )
            self.pipeline.unet.attention_state.reset()
            total += float(loss) * len(batch["captions"])
        return total / evaluation.samples

    # ---- outputs ---------------------------------------------------------------------------

    def _open_metrics(self, completed: int):
        """metrics.jsonl for appending (main process), after dropping the lines of metrics.jsonl and
        eval.jsonl past `completed`: a run resumed from an earlier checkpoint rewrites them."""
        if not self.accelerator.is_main_process:
            return None
        for name in (METRICS_FILE, EVAL_FILE):
            path = self.output_dir / name
            if path.is_file():
                lines = path.read_text().splitlines()
                kept = [line for line in lines if json.loads(line)["step"] <= completed]
                path.write_text("".join(line + "\n" for line in kept))
        return (self.output_dir / METRICS_FILE).open("a", buffering=1)

    def _log(self, metrics, record: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            logger.info("step %(step)d [%(stage)s] loss %(loss).4f", record)

    def _save(self, step: int, stage: str) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            model = self.config.model
            save_checkpoint(
                checkpoint_dir(self.output_dir, step),
                trainable=self.trainable,
                ema=self.ema,
                optimizer=self.optimizer,
                step=step,
                stage=stage,
                base_model=model.base,
                base_seed=model.seed,
                export_format=self.config.training.export_format,
            )
        self.accelerator.wait_for_everyone()

    def _evaluate(self, step: int, stage: str) -> None:
        """Held-out loss with the exported (EMA) weights, appended to eval.jsonl (main process)."""
        if self.config.evaluation is not None and self.accelerator.is_main_process:
            weights = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
            with weights:
                loss = self.evaluation_loss()
            record = {"step": step, "stage": stage, "eval_loss": loss}
            with (self.output_dir / EVAL_FILE).open("a") as file:
                file.write(json.dumps(record) + "\n")
            logger.info("step %d held-out loss %.4f", step, loss)
        self.accelerator.wait_for_everyone()

    def _sample(self, span: StageSpan, step: int) -> None:
        """One image with the (EMA) weights at the end of a stage: OUTPUT_DIR/samples/."""
        if self.accelerator.is_main_process:
            sampling = self.config.sampling
            if sampling.reference is not None:
                reference = load_rgb(Path(sampling.reference))
            else:
                first = self.records[0]
                reference = load_rgb(first.references[0] if first.references else first.image)
            weights = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
            pipeline = self.pipeline
            with weights, torch.no_grad(), self.accelerator.autocast():
                image = pipeline(
                    sampling.prompt,
                    [(reference, sampling.target)],
                    num_inference_steps=sampling.steps,
                    height=sampling.size,
                    width=sampling.size,
                    seed=sampling.seed,
                    # Fresh black-image tokens: the pipeline caches them, the projector has changed.
                    negative_image_features=pipeline.reference_encoder.black_features(1),
                ).images[0]
            path = self.output_dir / "samples" / f"{span.index:02d}-{span.stage.name}-step{step}.png"
            path.parent.mkdir(exist_ok=True)
            image.save(path)
            logger.info("sample for stage %r: %s", span.stage.name, path)
        self.accelerator.wait_for_everyone()


def describe(config: TrainConfig) -> dict:
    """The config as plain data (written next to the run for the record)."""
    return dataclasses.asdict(config)
