"""One cost function prices every generation (admission, caps, fair scheduling)."""

from types import SimpleNamespace

import pytest

from realcustom.cost import (
    CFG_FREE_STEP_SHARE,
    EXTRA_SUBJECT_SHARE,
    LORA_SHARE_PER_RANK,
    generation_cost,
)


def settings(width=1024, height=1024, steps=25, images=1, guidance=3.5):
    return SimpleNamespace(
        width=width, height=height, num_inference_steps=steps, num_images=images, guidance_scale=guidance
    )


def test_cost_is_megapixel_steps_over_images() -> None:
    assert generation_cost(settings(), 1) == pytest.approx(1024 * 1024 / 1e6 * 25)
    assert generation_cost(settings(images=4), 1) == pytest.approx(4 * generation_cost(settings(), 1))
    assert generation_cost(settings(width=512), 1) == pytest.approx(generation_cost(settings(), 1) / 2)
    assert generation_cost(settings(steps=50), 1) == pytest.approx(2 * generation_cost(settings(), 1))


def test_each_extra_subject_adds_its_share() -> None:
    one = generation_cost(settings(), 1)
    assert generation_cost(settings(), 3) == pytest.approx(one * (1 + 2 * EXTRA_SUBJECT_SHARE))


def test_cfg_free_rows_cost_their_share_of_a_cfg_step() -> None:
    """guidance <= 1 drops the unconditional sample: 0.6 of a step's work; above 1 it is a CFG step."""
    with_cfg = generation_cost(settings(steps=4), 1)
    for guidance in (0.0, 0.5, 1.0):
        assert generation_cost(settings(steps=4, guidance=guidance), 1) == pytest.approx(
            CFG_FREE_STEP_SHARE * with_cfg
        )
    assert generation_cost(settings(steps=4, guidance=1.01), 1) == pytest.approx(with_cfg)
    # A 4-step CFG-free preset costs under a tenth of the 25-step default.
    assert generation_cost(settings(steps=4, guidance=0), 1) < generation_cost(settings(), 1) / 10


def test_adapters_are_charged_by_rank() -> None:
    base = generation_cost(settings(), 1)
    assert generation_cost(settings(), 1, lora_rank=64) == pytest.approx(
        base * (1 + 64 * LORA_SHARE_PER_RANK)
    )
    assert generation_cost(settings(), 1, lora_rank=64) == pytest.approx(base * 1.054)
    free = generation_cost(settings(guidance=0), 2, lora_rank=32)
    assert free == pytest.approx(
        base * CFG_FREE_STEP_SHARE * (1 + EXTRA_SUBJECT_SHARE + 32 * LORA_SHARE_PER_RANK)
    )
