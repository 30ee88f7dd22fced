"""benchmarks/floor.py: FLOP accounting on the meta device, checked against real calls and arithmetic."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from realcustom.models import SPECS, build_pipeline

ROOT = Path(__file__).resolve().parents[2]
STEPS, REUSED = 3, 2  # two MASK_UPDATE steps, one MASK_REUSE step: both kinds, few calls


def _floor_module():
    spec = importlib.util.spec_from_file_location("floor_benchmark", ROOT / "benchmarks" / "floor.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through the module registry
    spec.loader.exec_module(module)
    return module


floor = _floor_module()


@pytest.fixture(scope="module")
def tiny():
    return {
        batch: floor.floor(floor.FloorSettings("tiny", batch=batch, steps=STEPS, mask_reused_step=REUSED))
        for batch in (1, 2)
    }


def attention_geometry(model: str, size: int) -> list[tuple[int, int]]:
    """(query tokens N, inner width C) of every attn2 layer, read with hooks from one meta guidance call."""
    pipeline = floor.meta_pipeline(model)
    unet, latent = pipeline.unet, size // 8
    geometry: dict[int, tuple[int, int]] = {}

    def recorder(layer_id: int, attn):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            geometry[layer_id] = (hidden.shape[1], attn.to_k_vision.out_features)

        return hook

    hooks = [
        attn.register_forward_pre_hook(recorder(i, attn), with_kwargs=True)
        for i, attn in enumerate(unet.cross_attention_layers)
    ]
    meta = torch.device("meta")
    text = pipeline.encode_prompt(["a photo of a cat"])
    with torch.no_grad():
        unet.guidance(
            torch.zeros(1, 4, latent, latent, device=meta),
            torch.zeros(1, device=meta),
            text.tokens,
            text.pooled,
            pipeline.time_ids(1, size, size),
            torch.zeros(1, 1, 77, device=meta),
        )
    for hook in hooks:
        hook.remove()
    return [geometry[i] for i in range(len(geometry))]


def test_step_kinds_follow_the_mask_schedule(tiny):
    result = tiny[1]
    assert (result["update_steps"], result["reuse_steps"]) == (REUSED, STEPS - REUSED)
    defaults = floor.FloorSettings()
    assert (defaults.steps, defaults.update_steps, defaults.reuse_steps) == (25, 12, 13)
    assert floor.FloorSettings(steps=4, mask_reused_step=12).update_steps == 4
    per_step, parts = result["per_step"], result["parts"]
    assert per_step["mask_update"] == parts["guidance_pass"] + parts["generation_pass"]
    assert per_step["mask_reuse"] == parts["generation_pass"]
    assert per_step["mask_update"] > per_step["mask_reuse"] > 0


@pytest.mark.parametrize("model", ["tiny", "tiny-sd15"])
def test_cfg_free_generation_is_one_plain_forward_plus_image_attention(model):
    """Fast mode: the generation pass runs the B conditional rows only, and the image K/V of the
    references only (no black-image K/V without an unconditional pass)."""
    spec, batch = SPECS[model], 2
    with_cfg = floor.floor(floor.FloorSettings(model, batch=batch, steps=1))["parts"]
    parts = floor.floor(floor.FloorSettings(model, batch=batch, steps=1, cfg=False))["parts"]
    layers = attention_geometry(model, spec.default_size)
    image_attention = sum(4 * batch * n * spec.vision.siglip.num_patches * c for n, c in layers)
    assert parts["generation_pass"] == parts["plain_unet_forward"] + image_attention
    assert 2 * parts["image_kv"] == with_cfg["image_kv"]
    assert parts["guidance_pass"] == with_cfg["guidance_pass"]


def test_per_row_lora_adds_its_low_rank_matmuls_to_both_passes():
    """The bank's gathered low-rank matmuls are counted in both passes (and not in the plain UNet)."""
    plain = floor.floor(floor.FloorSettings("tiny", steps=1, cfg=False))["parts"]
    lora = floor.floor(floor.FloorSettings("tiny", steps=1, cfg=False, lora_rank=4))["parts"]
    pipeline = floor.meta_pipeline("tiny")
    from realcustom.lora.bank import target_layers

    assert len(target_layers(pipeline.unet.unet, "transformer")) > 0
    for name in ("guidance_pass", "generation_pass"):
        assert lora[name] > plain[name], name
    assert lora["plain_unet_forward"] == plain["plain_unet_forward"]


def test_total_is_the_sum_of_its_parts(tiny):
    for batch, result in tiny.items():
        parts, per_step, per_batch = result["parts"], result["per_step"], result["per_batch"]
        assert result["total"] == sum(per_batch.values())
        assert result["per_image"] == result["total"] / batch
        assert per_batch["mask_update_steps"] == REUSED * per_step["mask_update"]
        assert per_batch["mask_reuse_steps"] == (STEPS - REUSED) * per_step["mask_reuse"]
        for name in ("text_encoders", "reference_encoder", "projector", "image_kv", "vae_decode"):
            assert per_batch[name] == parts[name] > 0, name
        for rate_name, rate in floor.RATES.items():
            assert result["floor_ms"][rate_name] == pytest.approx(result["total"] / rate / 1e9)


def test_flops_scale_linearly_with_batch(tiny):
    one, two = tiny[1]["parts"], tiny[2]["parts"]
    once_per_process = {"negative_prompt", "black_image_tokens"}
    for name in one.keys() - once_per_process:
        assert two[name] == 2 * one[name], name
    for name in once_per_process:
        assert two[name] == one[name], name
    assert tiny[2]["per_image"] == tiny[1]["per_image"]


@pytest.mark.parametrize("model", ["tiny", "tiny-sd15"])
def test_passes_are_plain_forwards_plus_the_realcustom_attention_work(model):
    """Exact identities (the counter sums integers), with N_l, C_l read from the layers themselves:

    generation(2B) = 2 x plain(B) + Σ_l 4·2B·S·N_l·T·C_l   (QKᵀ and PV against T image tokens)
    guidance(B)    = plain(B) + Σ_l 2·B·S·N_l·77           (the target-token map einsum)
    The explicit fp32 text attention of the guidance pass costs what SDPA costs in the plain pass.
    """
    spec = SPECS[model]
    batch, subjects = 2, 1
    result = floor.floor(floor.FloorSettings(model, batch=batch, subjects=subjects, steps=1))
    parts = result["parts"]
    image_tokens = spec.vision.siglip.num_patches
    layers = attention_geometry(model, spec.default_size)
    image_attention = sum(4 * 2 * batch * subjects * n * image_tokens * c for n, c in layers)
    maps = sum(2 * batch * subjects * n * 77 for n, _ in layers)
    assert parts["generation_pass"] == 2 * parts["plain_unet_forward"] + image_attention
    assert parts["guidance_pass"] == parts["plain_unet_forward"] + maps


def test_floor_equals_what_a_real_pipeline_call_counts(tiny):
    """The tiny pipeline with real CPU weights, end to end (text, reference, loop, VAE decode).

    Its first call also computes the once-per-process parts (negative prompt, black-image tokens);
    the second call is exactly the floor's per-image total.
    """
    pipeline = build_pipeline(SPECS["tiny"])
    photo = Image.new("RGB", (96, 96), (180, 120, 60))

    def call():
        return pipeline(
            "a photo of a cat in the snow",
            [(photo, "cat")],
            num_inference_steps=STEPS,
            mask_reused_step=REUSED,
        )

    first, _ = floor.count_flops(call)
    second, _ = floor.count_flops(call)
    parts = tiny[1]["parts"]
    assert second == tiny[1]["total"]
    assert first - second == parts["negative_prompt"] + parts["black_image_tokens"]


@pytest.mark.slow
def test_full_size_sdxl_on_meta_matches_the_published_counts():
    """SDXL 1024² at the default 25 steps / mask_reused_step 12, no weights allocated.

    The shared performance doc states one stock UNet forward at 6.76 TFLOP and the VAE decode at
    10.5 TFLOP (both rounded): the meta count must agree, which also shows attention is counted
    (without it a forward would be 0.78 TFLOP lower). The generation pass is 2x a plain forward plus
    the image attention (exact identity in the tiny test); for SDXL, T = 729 image tokens make that
    4.5 %; the bound of 10 % holds with up to twice as many image tokens (cross-layer projector).
    """
    result = floor.floor(floor.FloorSettings("sdxl"))
    parts = result["parts"]
    assert result["settings"]["size"] == 1024
    assert (result["update_steps"], result["reuse_steps"]) == (12, 13)
    assert parts["plain_unet_forward"] / 1e12 == pytest.approx(6.76, rel=2e-3)
    assert parts["vae_decode"] / 1e12 == pytest.approx(10.5, rel=5e-3)
    assert 2 < parts["generation_pass"] / parts["plain_unet_forward"] < 2 * 1.10
    assert result["per_step"]["mask_update"] > result["per_step"]["mask_reuse"]
    # 62 UNet-forward equivalents dominate; encoders, projector, K/V and the VAE are a few percent.
    assert 62 * parts["plain_unet_forward"] < result["total"] < 1.1 * 62 * parts["plain_unet_forward"]


def test_main_writes_json_and_markdown(tmp_path):
    report = floor.main(
        [
            "--models",
            "tiny",
            "--batch",
            "2",
            "--steps",
            "2",
            "--mask-reused-step",
            "1",
            "--fast-models",
            "tiny",
            "--fast-lora-rank",
            "8",
            "--out-dir",
            str(tmp_path),
        ]
    )
    written = json.loads((tmp_path / "floor.json").read_text())
    assert written["models"][0]["total"] == report["models"][0]["total"]
    assert written["models"][0]["settings"]["batch"] == 2
    table = (tmp_path / "floor.md").read_text()
    assert "MASK_UPDATE step" in table and "MASK_REUSE step" in table and "ms @ 790 TFLOP/s" in table
    fast = [model["settings"] for model in written["models"][1:]]
    assert [(s["steps"], s["cfg"], s["lora_rank"]) for s in fast] == [(4, False, 0), (4, False, 8)]
    assert "no CFG (fast mode)" in table and "per-row LoRA rank 8" in table


@pytest.mark.parametrize(
    "settings", [{"batch": 0}, {"steps": 0}, {"mask_reused_step": 0}, {"size": 100}, {"model": "sd3"}]
)
def test_bad_settings_are_refused(settings):
    with pytest.raises(ValueError):
        floor.FloorSettings(**settings)
