"""The one settings check (realcustom/settings_check.py): every limit at its exact value, and the
pipeline, the runner and the API edge applying the same rules (mask_reused_step=0 is rejected by
all of them). Also: the torch-free native size agrees with the loaded model's."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from PIL import Image

from engines.backends import select_backend
from engines.runner import Runner
from realcustom.jobs import GenerationJob, SubjectInput
from realcustom.loading import load_pipeline
from realcustom.models import SPECS
from realcustom.native_size import SPEC_SIZES, native_size
from realcustom.settings_check import Limits, SettingsError, check_generation

LIMITS = Limits(min_side=64, max_side=512, max_steps=50, max_num_images=4)


@dataclass(frozen=True)
class Request:
    width: int = 128
    height: int = 64
    num_inference_steps: int = 10
    mask_reused_step: int = 5
    mask_scope: float = 0.25
    guidance_scale: float = 3.5
    num_images: int = 1


VALID = [
    {"width": 512, "height": 64},  # max side and min side, not square
    {"width": 64, "height": 512},
    {"num_inference_steps": 50, "mask_reused_step": 50},  # max steps; reuse at the last step
    {"num_inference_steps": 10, "mask_reused_step": 10},  # mask_reused_step == steps
    {"num_inference_steps": 10, "mask_reused_step": 50},  # past the last step: never frozen
    {"num_inference_steps": 1, "mask_reused_step": 1},
    {"mask_scope": 1.0},
    {"num_images": 4},
    {"guidance_scale": 0.0},
]
INVALID = [
    ({"width": 544}, "width", "between 64 and 512"),
    ({"height": 544}, "height", "between 64 and 512"),
    ({"height": 32}, "height", "between 64 and 512"),
    ({"width": 100}, "width", "multiple of 32"),
    ({"num_inference_steps": 51, "mask_reused_step": 5}, "num_inference_steps", "at most 50"),
    ({"num_inference_steps": 0}, "num_inference_steps", "at least 1"),
    ({"mask_reused_step": 51}, "mask_reused_step", "at most 50"),
    ({"mask_reused_step": 0}, "mask_reused_step", "at least 1"),
    ({"mask_scope": 0.0}, "mask_scope", "(0, 1]"),
    ({"mask_scope": 1.01}, "mask_scope", "(0, 1]"),
    ({"num_images": 5}, "num_images", "at most 4"),
    ({"num_images": 0}, "num_images", "at least 1"),
    ({"guidance_scale": -0.1}, "guidance_scale", ">= 0"),
]


@pytest.mark.parametrize("overrides", VALID)
def test_valid_at_the_limits(overrides: dict) -> None:
    check_generation(replace(Request(), **overrides), limits=LIMITS)


@pytest.mark.parametrize(("overrides", "field", "message"), INVALID)
def test_invalid_past_the_limits(overrides: dict, field: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace("]", r"\]")) as raised:
        check_generation(replace(Request(), **overrides), limits=LIMITS)
    assert raised.value.field == field


@pytest.mark.parametrize(("overrides", "field", "message"), INVALID)
def test_every_request_of_a_batch_is_checked(overrides: dict, field: str, message: str) -> None:
    """The runner checks a batch in one call: an invalid request anywhere in it is found, valid ones
    around it pass, and the first invalid one is the one reported."""
    valid = [replace(Request(), **VALID[index]) for index in range(3)]
    check_generation(*valid, limits=LIMITS)
    invalid = replace(Request(), **overrides)
    for position in range(len(valid) + 1):
        batch = [*valid[:position], invalid, *valid[position:]]
        with pytest.raises(SettingsError) as raised:
            check_generation(*batch, limits=LIMITS)
        assert raised.value.field == field and message in str(raised.value)
    first, second = replace(Request(), width=100), replace(Request(), num_images=5)
    with pytest.raises(SettingsError) as raised:
        check_generation(Request(), first, second, limits=LIMITS)
    assert raised.value.field == "width"


def test_the_model_has_no_deployment_limits() -> None:
    check_generation(Request(width=4096, height=32, num_inference_steps=500, num_images=64))


@pytest.fixture(scope="module")
def tiny_runner() -> Runner:
    pipeline = load_pipeline("tiny")
    return Runner(pipeline, select_backend("eager", pipeline), "tiny")


# Violations of the model's own rules (no deployment limit involved).
MODEL_RULES = [
    ({"width": 100}, "multiple of 32"),
    ({"num_inference_steps": 0}, "at least 1"),
    ({"mask_reused_step": 0}, "at least 1"),
    ({"mask_scope": 0.0}, r"\(0, 1\]"),
    ({"mask_scope": 1.01}, r"\(0, 1\]"),
]


@pytest.mark.parametrize(("overrides", "message"), MODEL_RULES)
def test_edge_pipeline_and_runner_reject_alike(tiny_runner: Runner, overrides: dict, message: str) -> None:
    """What the edge rejects, the library rejects too (the API once accepted mask_reused_step=0)."""
    request = replace(Request(), **overrides)
    with pytest.raises(SettingsError, match=message):
        check_generation(request, limits=LIMITS)
    cat = Image.new("RGB", (64, 64), (120, 80, 40))
    settings = {
        "width": request.width,
        "height": request.height,
        "num_inference_steps": request.num_inference_steps,
        "mask_reused_step": request.mask_reused_step,
        "mask_scope": request.mask_scope,
    }
    with pytest.raises(ValueError, match=message):
        tiny_runner.pipeline("a cat", [(cat, "cat")], **settings)
    with pytest.raises(SettingsError, match=message):
        tiny_runner.run(
            [GenerationJob(id="j", prompt="a cat", subjects=(SubjectInput(cat, "cat"),), **settings)]
        )


def test_native_size_without_torch_matches_the_loaded_model(tmp_path: Path) -> None:
    assert {name: spec.default_size for name, spec in SPECS.items()} == SPEC_SIZES
    assert native_size("tiny") == load_pipeline("tiny").default_size == 128
    assert native_size("sdxl-random") == 1024 and native_size("sd15-random") == 512
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "realcustom.json").write_text(json.dumps({"base_model": "tiny-sd15"}))
    assert native_size(str(trained)) == 128
    released = tmp_path / "released"  # the API does not see the weights: the released SDXL
    assert native_size(str(released)) == 1024
    released.mkdir()
    (released / "realcustom.json").write_text(json.dumps({"spec": "sd15"}))
    assert native_size(str(released)) == 512
