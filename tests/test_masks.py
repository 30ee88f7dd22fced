"""Mask generation beyond the golden vectors: several subjects, overlaps, per-sample scope."""

from __future__ import annotations

import math

import pytest
import torch

from realcustom.masks import generate_masks, resolve_overlaps, select_mask


def maps_for(*subject_maps: torch.Tensor) -> list[torch.Tensor]:
    """One layer whose subjects' maps are given as [h, w] tensors -> [1, S, h, w]."""
    return [torch.stack(subject_maps).unsqueeze(0)]


def test_subjects_are_independent() -> None:
    torch.manual_seed(0)
    first, second = torch.rand(8, 8), torch.rand(8, 8)
    together, _ = generate_masks(maps_for(first, second), (8, 8), ["max_norm"], 0.25, overlap="sum")
    alone_first, _ = generate_masks(maps_for(first), (8, 8), ["max_norm"], 0.25)
    alone_second, _ = generate_masks(maps_for(second), (8, 8), ["max_norm"], 0.25)
    assert torch.equal(together[:, 0], alone_first[:, 0])
    assert torch.equal(together[:, 1], alone_second[:, 0])


def test_exclusive_overlap_gives_each_pixel_to_its_strongest_subject() -> None:
    left = torch.zeros(4, 4)
    left[:, :3] = torch.linspace(1.0, 0.5, 3)  # strong on the far left
    right = torch.zeros(4, 4)
    right[:, 1:] = torch.linspace(0.5, 1.0, 3)  # strong on the far right
    masks, _ = generate_masks(maps_for(left, right), (4, 4), ["max_norm"], 0.75, overlap="exclusive")
    assert ((masks[0, 0] > 0) & (masks[0, 1] > 0)).sum() == 0, "exclusive masks must not overlap"
    assert masks[0, 0, :, 0].gt(0).all() and masks[0, 1, :, 3].gt(0).all()
    summed, _ = generate_masks(maps_for(left, right), (4, 4), ["max_norm"], 0.75, overlap="sum")
    assert ((summed[0, 0] > 0) & (summed[0, 1] > 0)).sum() > 0, "the sum policy keeps the overlap"


def test_exclusive_ties_go_to_the_first_subject() -> None:
    masks = torch.tensor([[[1.0, 0.5], [1.0, 0.7]]])  # [B=1, S=2, 2 pixels]
    resolved = resolve_overlaps(masks, "exclusive")
    assert torch.equal(resolved, torch.tensor([[[1.0, 0.0], [0.0, 0.7]]]))


def test_zero_padded_subject_gets_an_empty_mask() -> None:
    torch.manual_seed(1)
    masks, _ = generate_masks(maps_for(torch.rand(8, 8), torch.zeros(8, 8)), (8, 8), ["max_norm"], 0.25)
    assert masks[0, 1].abs().sum() == 0


def test_per_sample_scope_keeps_floor_of_scope_times_pixels() -> None:
    torch.manual_seed(2)
    score = torch.rand(3, 1, 64)
    mask = select_mask(score, ["max_norm"], torch.tensor([0.25, 0.2, 0.5]))
    assert (mask > 0).sum(dim=-1).flatten().tolist() == [16, 12, 32]


@pytest.mark.parametrize("mode", [["max_norm", "binary"], ["min_max_norm", "threshold", "binary"]])
def test_binary_modes_give_zero_one_masks(mode: list[str]) -> None:
    torch.manual_seed(3)
    masks, _ = generate_masks([torch.rand(2, 1, 8, 8), torch.rand(2, 1, 4, 4)], (8, 8), mode, 0.3)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_unknown_mode_and_policy_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown mask mode"):
        generate_masks([torch.rand(1, 1, 8, 8)], (8, 8), ["maxnorm"], 0.25)
    with pytest.raises(ValueError, match="overlap"):
        generate_masks([torch.rand(1, 1, 8, 8)], (8, 8), ["max_norm"], 0.25, overlap="union")


@pytest.mark.parametrize("mode", [["max_norm"], ["max_norm", "binary"], ["none"]])
def test_flat_map_keeps_the_earliest_positions(mode: list[str]) -> None:
    """Equal scores: the stable sort keeps the first floor(scope·h·w) positions in row-major order."""
    masks, score = generate_masks([torch.full((2, 1, 8, 8), 0.3)], (8, 8), mode, 0.25)
    expected = torch.zeros(2, 1, 64)
    expected[..., :16] = 1.0 if "binary" in mode else score.flatten(2)[..., :16]
    assert torch.equal(masks.flatten(2), expected)


def test_ties_at_the_top_k_boundary_go_to_the_earliest_positions() -> None:
    score = torch.full((1, 1, 64), 0.5)
    score[..., 40:44] = 1.0  # four clear winners, then a plateau of 60 equal scores
    mask = select_mask(score, ["max_norm", "binary"], 0.25)
    kept = mask.flatten().nonzero().flatten().tolist()
    assert kept == [*range(12), *range(40, 44)]


@pytest.mark.parametrize("mask_size", [(8, 8), (10, 10), (4, 10), (40, 64), (48, 64)])
def test_keeps_exactly_floor_of_scope_times_pixels(mask_size: tuple[int, int]) -> None:
    """The official int(h·w·scope) in Python floats for scopes 0.01 … 1.00 (0.35·40 is 14; 0.29·100 is 28)."""
    pixels = mask_size[0] * mask_size[1]
    torch.manual_seed(4)
    score = torch.rand(1, 1, pixels)
    for scope in [i / 100 for i in range(1, 101)]:
        kept = int((select_mask(score, ["max_norm"], scope) > 0).sum())
        assert kept == math.floor(pixels * scope), f"scope {scope} on {mask_size}"


def test_binary_threshold_leaves_scores_equal_to_the_threshold_as_they_are() -> None:
    """Official: below 1 − scope → 0, above → 1, equal keeps its value (at scope 1 the minimum stays 0)."""
    maps = [torch.linspace(0, 1, 64).view(1, 1, 8, 8)]
    masks, score = generate_masks(maps, (8, 8), ["min_max_norm", "threshold", "binary"], 1.0)
    assert score.flatten()[0] == 0.0 and masks.flatten()[0] == 0.0
    assert masks.flatten()[1:].eq(1.0).all()
