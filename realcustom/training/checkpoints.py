"""Checkpoints: the deliverable weights in the official key layout, plus the state to resume.

    DIR/checkpoint-STEP/
        realcustom/RealCustom_highres.safetensors   added weights, official keys (EMA when on);
                                                    .pth instead with export_format: pth
        realcustom.json                             {"base_model", "seed", "step", "stage"}
        training_state/trainable.safetensors        the online (non-EMA) trainable weights
        training_state/ema.safetensors              EMA shadow weights (when EMA is on)
        training_state/optimizer.pt                 optimizer state
        training_state/state.json                   {"step", "ema_updates"}

`load_pipeline("DIR/checkpoint-STEP")` builds the base model and applies the added weights, so
the CLI, the engines and the service take the directory as their model unchanged. Frozen
weights are not written: they are the base model's.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from realcustom.loading import LAYOUT
from realcustom.training.ema import TrainableEMA

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_DIR = "training_state"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step}"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step under `output_dir`, if any."""
    found = []
    for path in output_dir.glob("checkpoint-*"):
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / STATE_DIR / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def _to_cpu(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in weights.items()}


def save_checkpoint(
    path: Path,
    *,
    trainable: dict[str, torch.nn.Parameter],
    ema: TrainableEMA | None,
    optimizer: torch.optim.Optimizer,
    step: int,
    stage: str,
    base_model: str,
    base_seed: int,
    export_format: str = "safetensors",
) -> None:
    """Write one checkpoint (call on the main process only)."""
    online = _to_cpu(dict(trainable))
    exported = _to_cpu(ema.shadow) if ema is not None else online
    weights_file = path / f"{LAYOUT['realcustom']}.{export_format}"
    weights_file.parent.mkdir(parents=True, exist_ok=True)
    if export_format == "pth":
        torch.save(exported, weights_file)
    else:
        save_file(exported, str(weights_file))
    description = {"base_model": base_model, "seed": base_seed, "step": step, "stage": stage}
    (path / "realcustom.json").write_text(json.dumps(description, indent=2) + "\n")

    state_dir = path / STATE_DIR
    state_dir.mkdir(exist_ok=True)
    save_file(online, str(state_dir / "trainable.safetensors"))
    if ema is not None:
        save_file(_to_cpu(ema.shadow), str(state_dir / "ema.safetensors"))
    torch.save(optimizer.state_dict(), state_dir / "optimizer.pt")
    state = {"step": step, "ema_updates": None if ema is None else ema.updates}
    # state.json last: its presence marks the checkpoint complete.
    (state_dir / "state.json").write_text(json.dumps(state) + "\n")
    logger.info("saved checkpoint %s", path)


def load_checkpoint(
    path: Path,
    *,
    trainable: dict[str, torch.nn.Parameter],
    ema: TrainableEMA | None,
    optimizer: torch.optim.Optimizer,
) -> int:
    """Restore weights, EMA and optimizer from `path`; returns the completed step count."""
    state_dir = path / STATE_DIR
    state = json.loads((state_dir / "state.json").read_text())
    online = load_file(str(state_dir / "trainable.safetensors"))
    if set(online) != set(trainable):
        raise ValueError(f"{path}: trainable weights do not match this model")
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(online[name])
    if ema is not None:
        ema_file = state_dir / "ema.safetensors"
        if not ema_file.is_file():
            raise ValueError(f"{path} was trained without EMA; set training.ema_decay to null to resume it")
        ema.load_state_dict(load_file(str(ema_file)), state["ema_updates"])
    optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", map_location="cpu", weights_only=True))
    logger.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])
