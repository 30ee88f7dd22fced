"""Adaptive Mask Guidance: turn target-word attention maps into per-subject masks.

Follows the official `mask_generation`: per layer, the head-mean attention summed over the
target tokens is resized to 1/16 of the image, layers are averaged (after an optional per-layer
normalisation), the result is normalised per sample, then the top `floor(scope·h·w)` values are
kept as a soft mask (or a threshold is applied). Mode strings are tested by membership, as there.

Several subjects: each subject's mask is computed independently from its own target tokens.
Where masks overlap, the paper is silent; by default each pixel goes to the subject with the
highest mask value there ("exclusive"), so two references never blend in one region. "sum" keeps
the overlapping masks as they are (the official multi-reference code path sums masked outputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

MASK_MODES = ("max_norm", "min_max_norm", "min_max_per_channel", "threshold", "binary")
OVERLAP_POLICIES = ("exclusive", "sum")
_EPS = 1e-6


def _min_max(values: torch.Tensor) -> torch.Tensor:
    low = values.amin(dim=-1, keepdim=True)
    high = values.amax(dim=-1, keepdim=True)
    return (values - low) / (high - low + _EPS)


def mask_scores(
    maps: Sequence[torch.Tensor], mask_size: tuple[int, int], mode: Sequence[str]
) -> torch.Tensor:
    """Normalised attention score per subject before selection: list of [B,S,h_l,w_l] -> [B,S,h*w]."""
    resized = [F.interpolate(layer_map.float(), size=mask_size, mode="bilinear") for layer_map in maps]
    stacked = torch.stack([layer_map.flatten(2) for layer_map in resized], dim=2)  # [B, S, L, h*w]
    if "min_max_per_channel" in mode:
        return _min_max(_min_max(stacked).mean(dim=2))
    score = stacked.mean(dim=2)
    if "max_norm" in mode:
        return score / (score.amax(dim=-1, keepdim=True) + _EPS)
    if "min_max_norm" in mode:
        return _min_max(score)
    return score


def select_mask(score: torch.Tensor, mode: Sequence[str], scope: torch.Tensor | float) -> torch.Tensor:
    """Top-k soft selection (or threshold), [B,S,h*w] -> [B,S,h*w]; scope may be per sample [B]."""
    # float64, as the official Python floats: a float32 scope drops pixels (float32(0.35)·40 < 14).
    scope = torch.as_tensor(scope, dtype=torch.float64, device=score.device).reshape(-1, 1, 1)
    binary = "binary" in mode
    if "threshold" in mode:
        # As the official: below 1 − scope → 0, then (binary) above it → 1; equal keeps its value.
        threshold = (1 - scope).to(score.dtype)
        kept = torch.where(score < threshold, torch.zeros_like(score), score)
        return torch.where(kept > threshold, torch.ones_like(kept), kept) if binary else kept
    # Exactly floor(scope·h·w) entries survive per subject: rank positions by descending score.
    count = torch.floor(scope * score.shape[-1])  # the official int(scope·h·w)
    order = score.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)
    keep = ranks < count
    return keep.to(score.dtype) if binary else torch.where(keep, score, torch.zeros_like(score))


def resolve_overlaps(masks: torch.Tensor, policy: str) -> torch.Tensor:
    """[B,S,h*w]: with "exclusive", each pixel keeps only its strongest subject (ties: first)."""
    if policy not in OVERLAP_POLICIES:
        raise ValueError(f"unknown overlap policy {policy!r}; use one of {OVERLAP_POLICIES}")
    if policy == "sum" or masks.shape[1] == 1:
        return masks
    winner = masks.argmax(dim=1, keepdim=True)
    return masks * (torch.arange(masks.shape[1], device=masks.device).view(1, -1, 1) == winner)


def check_mask_mode(mode: Sequence[str]) -> None:
    """Reject mode strings the official code does not know ("none" = plain layer mean)."""
    unknown = [name for name in mode if name not in MASK_MODES and name != "none"]
    if unknown:
        raise ValueError(f"unknown mask mode(s) {unknown}; choose from {MASK_MODES}")


def generate_masks(
    maps: Sequence[torch.Tensor],
    mask_size: tuple[int, int],
    mode: Sequence[str],
    scope: torch.Tensor | float,
    overlap: str = "exclusive",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks [B,S,h,w] and the scores they were selected from, from per-layer maps [B,S,h_l,w_l]."""
    check_mask_mode(mode)
    score = mask_scores(maps, mask_size, mode)
    masks = resolve_overlaps(select_mask(score, mode, scope), overlap)
    return masks.unflatten(-1, mask_size), score.unflatten(-1, mask_size)
