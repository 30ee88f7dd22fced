"""Parity with the official code: every tensor of the golden fixture, within its stated tolerances."""

from __future__ import annotations

import pytest
import torch
from golden_fixture import ATOL, CASES, golden_model, load, metadata

from realcustom.attention import AttentionState
from realcustom.denoise import Conditioning, LoopSettings, LoopTrace, denoise
from realcustom.masks import generate_masks, mask_scores
from realcustom.reference import VisionFeatures
from realcustom.schedulers import DDIM, NoiseSchedule, OfficialDPMSolver

NUM_LAYERS = 14


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    difference = (actual.float() - expected.float()).abs().max().item()
    assert difference <= atol, f"{name}: max |difference| {difference:.3g} > {atol}"


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return load("inputs")


@pytest.fixture(scope="module")
def standalone() -> dict[str, torch.Tensor]:
    return load("standalone")


def projected(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    projector = golden_model().projector
    with torch.no_grad():
        positive = projector(inputs["image_features_global"], inputs["image_features_local"])
        negative = projector(
            inputs["negative_image_features_global"], inputs["negative_image_features_local"]
        )
    return positive, negative


def run_case(case: str, inputs: dict[str, torch.Tensor]) -> tuple[LoopTrace, torch.Tensor, dict]:
    settings = metadata(f"expected_{case}", "case")
    positive, negative = projected(inputs)
    batch = inputs["latents_init"].shape[0]
    cond = Conditioning(
        prompt_embeds=inputs["prompt_embeds"],
        negative_prompt_embeds=inputs["negative_prompt_embeds"],
        pooled=inputs["pooled_prompt_embeds"],
        negative_pooled=inputs["negative_pooled_prompt_embeds"],
        time_ids=inputs["add_time_ids"],
        image_tokens=positive.unsqueeze(1),
        negative_image_tokens=negative.unsqueeze(1),
        target_tokens=inputs["target_token_mask"].view(1, 1, -1).expand(batch, 1, -1),
        guidance_scale=torch.full((batch,), float(settings["guidance_scale"])),
        mask_scope=torch.full((batch,), float(settings["mask_scope"])),
    )
    loop = LoopSettings(
        settings["steps"],
        settings["scheduler"],
        tuple(settings["mask_strategy"]),
        settings["mask_reused_step"],
    )
    trace = LoopTrace(full_probability_layers=frozenset({2}))
    result = denoise(golden_model().unet, cond, inputs["latents_init"], loop, trace)
    return trace, result.latents, settings


@pytest.mark.parametrize("case", CASES)
def test_golden_denoising_loop(case: str, inputs: dict[str, torch.Tensor]) -> None:
    expected = load(f"expected_{case}")
    trace, final, settings = run_case(case, inputs)

    assert trace.stacked("timestep").tolist() == expected["timesteps"].tolist()
    assert trace.stacked("mask_recomputed").tolist() == expected["mask_recomputed"].tolist()
    if settings["scheduler"] == "dpm":
        assert OfficialDPMSolver(settings["steps"]).orders == expected["solver_order"].tolist()

    # Subject axis 1 is squeezed: the fixture has one subject.
    assert_close(trace.stacked("mask")[:, :, 0:1], expected["mask"], ATOL["mask"], "mask")
    assert_close(trace.stacked("mask_score")[:, :, 0:1], expected["mask_score"], ATOL["mask"], "mask_score")
    for layer in range(NUM_LAYERS):
        name = f"attnmap_L{layer:02d}"
        assert_close(trace.stacked(f"map_L{layer:02d}")[:, :, 0], expected[name], ATOL["map"], name)
    if "rawmap_step0_L02" in expected:
        assert_close(
            trace.steps[0]["probs_L02"], expected["rawmap_step0_L02"], ATOL["map"], "rawmap_step0_L02"
        )
    for name in ("eps_guidance", "eps_cond", "eps_uncond"):
        assert_close(trace.stacked(name), expected[name], ATOL["eps"], name)
    assert_close(trace.stacked("noise_pred"), expected["noise_pred"], ATOL["noise_pred"], "noise_pred")
    for name in ("latents", "x0"):
        assert_close(trace.stacked(name), expected[name], ATOL["latent"], name)
    assert_close(final, expected["final_x0"], ATOL["latent"], "final_x0")


def test_golden_pipeline_call_with_precomputed_inputs(inputs: dict[str, torch.Tensor]) -> None:
    """The public pipeline entry point, fed the fixture's precomputed inputs, lands on final_x0."""
    from realcustom.models import TINY, build_pipeline

    expected = load("expected_maxnorm")
    pipeline = build_pipeline(TINY)
    model = golden_model()
    pipeline.unet, pipeline.projector = model.unet, model.projector
    features = VisionFeatures(inputs["image_features_global"], inputs["image_features_local"])
    negative = VisionFeatures(
        inputs["negative_image_features_global"], inputs["negative_image_features_local"]
    )
    output = pipeline(
        "a red dog sits on grass",
        height=128,
        width=128,
        num_inference_steps=8,
        guidance_scale=3.5,
        mask_scope=0.25,
        mask_mode=["max_norm"],
        mask_reused_step=3,
        num_images_per_prompt=2,
        latents=inputs["latents_init"],
        prompt_embeds=inputs["prompt_embeds"],
        negative_prompt_embeds=inputs["negative_prompt_embeds"],
        pooled_prompt_embeds=inputs["pooled_prompt_embeds"],
        negative_pooled_prompt_embeds=inputs["negative_pooled_prompt_embeds"],
        image_features=[features],
        negative_image_features=negative,
        target_token_masks=inputs["target_token_mask"].view(1, -1),
        output_type="latent",
        return_masks=True,
    )
    assert_close(output.images, expected["final_x0"], ATOL["latent"], "final_x0")
    assert_close(output.masks[:, :, 0:1], expected["mask"], ATOL["mask"], "mask")


def test_golden_time_ids_match_official_order(inputs: dict[str, torch.Tensor]) -> None:
    from realcustom.models import TINY, build_pipeline

    assert torch.equal(build_pipeline(TINY).time_ids(2, 128, 128), inputs["add_time_ids"])


def test_golden_projector(inputs: dict[str, torch.Tensor], standalone: dict[str, torch.Tensor]) -> None:
    positive, negative = projected(inputs)
    assert_close(positive, standalone["projector.tokens_pos"], ATOL["eps"], "projector.tokens_pos")
    assert_close(negative, standalone["projector.tokens_neg"], ATOL["eps"], "projector.tokens_neg")


def head_mean_target_sums(standalone: dict[str, torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
    """[B, heads, 77, h, w] maps -> head mean, sum over target tokens -> [B, 1, h, w] per layer."""
    return [
        torch.einsum("bkhw,bsk->bshw", standalone[f"maskgen.map_L{i}"].mean(dim=1), target) for i in range(3)
    ]


MASK_VARIANTS = [name for name in metadata("standalone", "variants") if name.startswith("maskgen.out.")]


@pytest.mark.parametrize("variant", MASK_VARIANTS)
def test_golden_mask_generation(variant: str, standalone: dict[str, torch.Tensor]) -> None:
    settings = metadata("standalone", "variants")[variant]
    target = standalone["maskgen.target_token"].view(1, 1, -1)
    # [B, heads, 77, h, w] -> head mean, target-token sum -> [B, 1, h, w]
    maps = head_mean_target_sums(standalone, target.expand(2, 1, -1))
    mask, score = generate_masks(maps, (8, 8), settings["mask_mode"], settings["mask_scope"])
    assert_close(mask[:, 0:1], standalone[variant], ATOL["mask"], variant)
    score_name = variant.replace("out.", "score.")
    if score_name in standalone:
        assert_close(score[:, 0:1], standalone[score_name], ATOL["mask"], score_name)


@pytest.mark.parametrize("mode", ["max_norm", "min_max_norm", "min_max_per_channel", "none"])
def test_golden_mask_scores(mode: str, standalone: dict[str, torch.Tensor]) -> None:
    target = standalone["maskgen.target_token"].view(1, 1, -1).expand(2, 1, -1)
    maps = head_mean_target_sums(standalone, target)
    score = mask_scores(maps, (8, 8), [mode]).unflatten(-1, (8, 8))
    assert_close(score, standalone[f"maskgen.score.{mode}"], ATOL["mask"], mode)


@pytest.mark.parametrize(
    ("group", "scheduler_class"), [("dpm8", OfficialDPMSolver), ("dpm7", OfficialDPMSolver), ("ddim6", DDIM)]
)
def test_golden_schedulers(group: str, scheduler_class, standalone: dict[str, torch.Tensor]) -> None:
    prefix = f"sched.{group}"
    outputs = standalone[f"{prefix}.model_outputs"]
    scheduler = scheduler_class(outputs.shape[0])
    assert scheduler.timesteps.tolist() == standalone[f"{prefix}.timesteps"].tolist()
    if f"{prefix}.solver_order" in standalone:
        assert scheduler.orders == standalone[f"{prefix}.solver_order"].tolist()
    sample = standalone[f"{prefix}.sample_init"]
    for k, eps in enumerate(outputs):
        sample, x0 = scheduler.step(k, eps, sample)
        assert_close(sample, standalone[f"{prefix}.samples"][k], ATOL["latent"], f"{prefix}.samples[{k}]")
        assert_close(x0, standalone[f"{prefix}.x0"][k], ATOL["latent"], f"{prefix}.x0[{k}]")


def test_golden_production_schedule(standalone: dict[str, torch.Tensor]) -> None:
    scheduler = OfficialDPMSolver(25)
    assert scheduler.timesteps.tolist() == standalone["sched.dpm25.timesteps"].tolist()
    assert scheduler.orders == standalone["sched.dpm25.solver_order"].tolist()
    assert torch.equal(NoiseSchedule().alphas_cumprod(), standalone["sched.alphas_cumprod"])


@pytest.mark.parametrize("layer", ["L00", "L02"])
def test_golden_attn2_layer(layer: str, standalone: dict[str, torch.Tensor], inputs) -> None:
    settings = metadata("standalone", "variants")[f"attn2.{layer}"]
    model = golden_model()
    layer_id = settings["cross_attention_id"]
    attn = model.unet.cross_attention_layers[layer_id]
    state: AttentionState = model.unet.attention_state
    hidden = standalone[f"attn2.{layer}.hidden_states"]
    tokens = standalone["projector.tokens_pos"].unsqueeze(1)  # one subject
    mask = standalone["attn2.mask"]

    def run(**instructions) -> torch.Tensor:
        with state.instructed(**instructions), torch.no_grad():
            state.latent_size = (16, 16)  # the fixture's 128-pixel image
            return attn(hidden, encoder_hidden_states=inputs["prompt_embeds"])

    out_masked = standalone[f"attn2.{layer}.out_masked"]
    assert_close(run(image_tokens=tokens, masks=mask), out_masked, ATOL["eps"], "out_masked")
    assert_close(
        run(image_tokens=tokens), standalone[f"attn2.{layer}.out_unmasked"], ATOL["eps"], "out_unmasked"
    )
    assert_close(run(), standalone[f"attn2.{layer}.out_text_only"], ATOL["eps"], "out_text_only")
    probs_name = f"attn2.{layer}.text_probs"
    if probs_name in standalone:
        with state.instructed(
            target_tokens=torch.zeros(2, 1, 77), full_probability_layers=frozenset({layer_id})
        ):
            state.latent_size = (16, 16)
            with torch.no_grad():
                attn(hidden, encoder_hidden_states=inputs["prompt_embeds"])
            assert_close(state.full_probabilities[layer_id], standalone[probs_name], ATOL["map"], probs_name)
