"""One cost function prices every generation (admission, caps, fair scheduling)."""

from types import SimpleNamespace

import pytest

from realcustom.cost import EXTRA_SUBJECT_SHARE, generation_cost


def settings(width=1024, height=1024, steps=25, images=1):
    return SimpleNamespace(width=width, height=height, num_inference_steps=steps, num_images=images)


def test_cost_is_megapixel_steps_over_images() -> None:
    assert generation_cost(settings(), 1) == pytest.approx(1024 * 1024 / 1e6 * 25)
    assert generation_cost(settings(images=4), 1) == pytest.approx(4 * generation_cost(settings(), 1))
    assert generation_cost(settings(width=512), 1) == pytest.approx(generation_cost(settings(), 1) / 2)
    assert generation_cost(settings(steps=50), 1) == pytest.approx(2 * generation_cost(settings(), 1))


def test_each_extra_subject_adds_its_share() -> None:
    one = generation_cost(settings(), 1)
    assert generation_cost(settings(), 3) == pytest.approx(one * (1 + 2 * EXTRA_SUBJECT_SHARE))
