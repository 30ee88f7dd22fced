"""One tiny curriculum run (configs/train/tiny.yaml, shared by the module) and what it must show:
the loss falls, checkpoints are in the official layout and change the pipeline's output, frozen
weights are untouched, and a resumed run takes exactly the steps of the uninterrupted one."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from realcustom.loading import PROJECTOR_PREFIX, apply_realcustom_weights, load_pipeline
from realcustom.train import main
from realcustom.training.config import load_config
from realcustom.training.model import trainable_parameters
from realcustom.training.trainer import Trainer

PROJECT = Path(__file__).resolve().parents[2]
TINY_CONFIG = PROJECT / "configs" / "train" / "tiny.yaml"
WEIGHTS = Path("realcustom") / "RealCustom_highres.safetensors"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Trainer, Path]:
    output = tmp_path_factory.mktemp("tiny-run")
    trainer = Trainer(load_config(TINY_CONFIG), output)
    assert trainer.train() == 60
    return trainer, output


def test_metrics_have_one_line_per_step_in_stage_order(tiny_run):
    _, output = tiny_run
    metrics = read_jsonl(output / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 61))
    stages = [m["stage"] for m in metrics]
    assert stages == ["reconstruction"] * 20 + ["scale_and_pose"] * 20 + ["recontextualisation"] * 20
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert 0.0 <= np.mean([m["dropped_fraction"] for m in metrics]) <= 0.25


def test_loss_falls(tiny_run):
    _, output = tiny_run
    held_out = read_jsonl(output / "eval.jsonl")
    assert [e["step"] for e in held_out] == [0, 20, 40, 60]
    losses = [e["eval_loss"] for e in held_out]
    # Same samples, noise and timesteps every time: only the weights differ.
    assert losses[-1] < 0.95 * losses[0]
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))
    training = [m["loss"] for m in read_jsonl(output / "metrics.jsonl")]
    assert np.mean(training[-10:]) < np.mean(training[:10])


def test_checkpoints_hold_exactly_the_added_weights_under_official_keys(tiny_run, tiny_pipeline):
    _, output = tiny_run
    assert sorted(p.name for p in output.glob("checkpoint-*")) == [
        "checkpoint-20",
        "checkpoint-40",
        "checkpoint-60",
    ]
    weights = load_file(str(output / "checkpoint-60" / WEIGHTS))
    expected = set(tiny_pipeline.unet.vision_state_dict())
    expected |= {PROJECTOR_PREFIX + name for name in tiny_pipeline.projector.state_dict()}
    assert set(weights) == expected
    assert any(k.endswith("attn2.to_k_vision.weight") and k.startswith("down_blocks.1.") for k in weights)
    description = json.loads((output / "checkpoint-60" / "realcustom.json").read_text())
    assert description == {"base_model": "tiny", "seed": 0, "step": 60, "stage": "recontextualisation"}


def test_checkpoint_loads_in_the_pipeline_and_changes_the_output(tiny_run, dreambench_dir):
    _, output = tiny_run
    reference = Image.open(dreambench_dir / "backpack.jpg").convert("RGB")

    def generate(pipeline) -> np.ndarray:
        result = pipeline("a backpack on the beach", [(reference, "backpack")], num_inference_steps=3, seed=0)
        return np.asarray(result.images[0], dtype=np.int16)

    base = load_pipeline("tiny")
    trained = load_pipeline(str(output / "checkpoint-60"))
    for name, tensor in load_file(str(output / "checkpoint-60" / WEIGHTS)).items():
        assert torch.equal(trainable_parameters(trained)[name].detach(), tensor)
    before, after = generate(base), generate(trained)
    assert np.abs(before - after).mean() > 1.0
    # The weights file alone, applied to a base model, gives the same pipeline.
    applied = apply_realcustom_weights(load_pipeline("tiny"), output / "checkpoint-60" / WEIGHTS)
    assert np.array_equal(generate(applied), after)


def test_frozen_weights_are_bit_identical_after_training(tiny_run):
    trainer, _ = tiny_run
    fresh = load_pipeline("tiny").state_dict()
    trained = trainer.pipeline.state_dict()
    added = {name.removeprefix(PROJECTOR_PREFIX) for name in trainer.trainable}
    frozen = [k for k in fresh if k.removeprefix("unet.unet.").removeprefix("projector.") not in added]
    assert len(frozen) > 100
    assert all(torch.equal(fresh[k], trained[k]) for k in frozen)
    assert all(not p.requires_grad for n, p in trainer.pipeline.named_parameters() if n in frozen)
    changed = [
        name
        for name, parameter in trainer.trainable.items()
        if not torch.equal(parameter.detach(), fresh[_pipeline_key(name)])
    ]
    assert len(changed) == len(trainer.trainable)


def _pipeline_key(official: str) -> str:
    if official.startswith(PROJECTOR_PREFIX):
        return "projector." + official.removeprefix(PROJECTOR_PREFIX)
    return "unet.unet." + official


def test_samples_are_written_per_stage(tiny_run):
    _, output = tiny_run
    samples = sorted(p.name for p in (output / "samples").glob("*.png"))
    assert samples == [
        "00-reconstruction-step20.png",
        "01-scale_and_pose-step40.png",
        "02-recontextualisation-step60.png",
    ]
    assert Image.open(output / "samples" / samples[0]).size == (64, 64)


def test_resume_continues_from_the_same_step(tiny_run, tmp_path):
    _, output = tiny_run
    # Resume into a directory that also holds the metrics of steps past the checkpoint.
    shutil.copy(output / "metrics.jsonl", tmp_path / "metrics.jsonl")
    resumed = Trainer(load_config(TINY_CONFIG), tmp_path)
    assert resumed.train(resume_from=output / "checkpoint-40") == 60
    original = read_jsonl(output / "metrics.jsonl")
    again = read_jsonl(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in again] == list(range(1, 61))
    assert [m["loss"] for m in again[40:]] == [m["loss"] for m in original[40:]]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-60"]
    for name in ("training_state/trainable.safetensors", "training_state/ema.safetensors", str(WEIGHTS)):
        first = load_file(str(output / "checkpoint-60" / name))
        second = load_file(str(tmp_path / "checkpoint-60" / name))
        assert all(torch.equal(first[k], second[k]) for k in first), name


def test_command_line_trains_and_resumes_latest(tmp_path):
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    raw["data"]["dreambench"]["source"] = str(PROJECT / "examples" / "dreambench")
    raw["training"].update(checkpoint_every=1, export_format="pth")
    for stage in raw["stages"]:
        stage["steps"] = 1
    del raw["sampling"], raw["evaluation"]
    config = tmp_path / "three_steps.yaml"
    config.write_text(yaml.safe_dump(raw))
    output = tmp_path / "run"
    assert main(["--config", str(config), "--output-dir", str(output)]) == 0
    assert sorted(p.name for p in output.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]
    assert main(["--config", str(config), "--output-dir", str(output), "--resume-from", "latest"]) == 0
    assert [m["step"] for m in read_jsonl(output / "metrics.jsonl")] == [1, 2, 3]
    # The official code reads the weights with torch.load: a plain dict under the official keys.
    exported = torch.load(
        output / "checkpoint-3" / "realcustom" / "RealCustom_highres.pth", weights_only=True
    )
    loaded = trainable_parameters(load_pipeline(str(output / "checkpoint-3")))
    assert set(exported) == set(loaded)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in exported.items())
    config.write_text("stages: []\n")
    assert main(["--config", str(config), "--output-dir", str(output)]) == 2


def test_training_a_backbone_without_realcustom_weights(tmp_path, dreambench_dir):
    from test_loading import save_official_layout  # tests/ is on the path (tests/conftest.py)

    backbone = tmp_path / "backbone"
    save_official_layout(load_pipeline("tiny", seed=3), backbone)
    (backbone / "realcustom" / "RealCustom_highres.pth").unlink()
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    raw["model"] = {"base": "backbone", "seed": 1, "vision_init": "from_text"}
    raw["data"]["dreambench"]["source"] = str(dreambench_dir)
    raw["stages"] = raw["stages"][-1:]
    raw["stages"][0]["steps"] = 2
    del raw["sampling"], raw["evaluation"]
    config = tmp_path / "backbone.yaml"
    config.write_text(yaml.safe_dump(raw))
    trainer = Trainer(load_config(config), tmp_path / "run")
    assert trainer.train() == 2
    # The checkpoint names the backbone directory; loading it needs no RealCustom weights there.
    description = json.loads((tmp_path / "run" / "checkpoint-2" / "realcustom.json").read_text())
    assert description["base_model"] == str(backbone)
    loaded = load_pipeline(str(tmp_path / "run" / "checkpoint-2"))
    for name, parameter in trainable_parameters(loaded).items():
        assert torch.equal(parameter, trainer.ema.shadow[name])
    base = load_pipeline("tiny", seed=3).state_dict()
    assert torch.equal(loaded.state_dict()["unet.unet.conv_in.weight"], base["unet.unet.conv_in.weight"])


def short_config(tmp_path: Path, dreambench_dir: Path, name: str, **training) -> Path:
    """Three steps of the tiny config's middle stage (self + multiview), no samples or evaluation."""
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    raw["data"]["dreambench"]["source"] = str(dreambench_dir)
    raw["training"].update(training, checkpoint_every=100)
    raw["stages"] = raw["stages"][1:2]
    raw["stages"][0]["steps"] = 3
    del raw["sampling"], raw["evaluation"]
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def short_run(tmp_path: Path, dreambench_dir: Path, name: str, **training) -> dict[str, torch.Tensor]:
    config = short_config(tmp_path, dreambench_dir, name, **training)
    trainer = Trainer(load_config(config), tmp_path / name)
    trainer.train()
    return {name: parameter.detach().clone() for name, parameter in trainer.trainable.items()}


def test_splitting_the_batch_into_micro_batches_trains_on_the_same_samples(tmp_path, dreambench_dir):
    """Samples and noise are numbered per global batch, so batch 4 = 2 micro-batches of 2 (and, by
    the same numbering, 2 devices of 2) up to float summation order."""
    whole = short_run(tmp_path, dreambench_dir, "whole", batch_size=4, gradient_accumulation_steps=1)
    split = short_run(tmp_path, dreambench_dir, "split", batch_size=2, gradient_accumulation_steps=2)
    for name, tensor in whole.items():
        # Adam divides by sqrt(v) + 1e-8, which magnifies float-order noise of tiny gradients. The
        # fused (flash) attention kernel of the image branch blocks its sums differently per batch
        # size: 6e-5 measured (1e-5 with the math kernel); 1e-4 is still 30x below the weights'
        # change over the 3 steps.
        torch.testing.assert_close(split[name], tensor, rtol=0, atol=1e-4, msg=name)
    other = short_run(tmp_path, dreambench_dir, "other", batch_size=2, gradient_accumulation_steps=1)
    assert any(not torch.allclose(other[name], tensor) for name, tensor in whole.items())


def test_two_processes_train_like_one_with_the_whole_batch(tmp_path, dreambench_dir):
    """`python -m realcustom.train` under a launcher, data-parallel (DDP over gloo on the CPU) with
    gradient checkpointing: 2 processes x batch 2 give the weights of 1 process x batch 4 (without
    checkpointing), and only the main process writes."""
    config = short_config(tmp_path, dreambench_dir, "ddp", batch_size=2, gradient_checkpointing=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "realcustom.train", "--config", str(config), "--output-dir", str(tmp_path / "ddp")]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        command, cwd=PROJECT, env=environment, capture_output=True, text=True, timeout=180, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert [m["step"] for m in read_jsonl(tmp_path / "ddp" / "metrics.jsonl")] == [1, 2, 3]
    distributed = load_file(
        str(tmp_path / "ddp" / "checkpoint-3" / "training_state" / "trainable.safetensors")
    )
    whole = short_run(tmp_path, dreambench_dir, "whole", batch_size=4)
    for name, tensor in whole.items():
        # As for micro-batches: the fused image-attention kernel sums in a batch-size-dependent
        # order, which Adam magnifies on tiny gradients (tolerance explained there).
        torch.testing.assert_close(distributed[name], tensor, rtol=0, atol=1e-4, msg=name)
