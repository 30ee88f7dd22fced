"""Image cross-attention and target-word map capture, as a diffusers attention processor.

Every text cross-attention (`attn2`) of the UNet gets two bias-free projections `to_k_vision` and
`to_v_vision` on the `Attention` module itself, so official checkpoint keys
(`...attn2.to_k_vision.weight`) load unchanged. The processor:

* text branch: softmax(Q K_tᵀ/√d) V_t, with probabilities computed explicitly in fp32 when the
  guidance pass records maps (as the official code does), SDPA otherwise;
* image branch: for each subject s, softmax(Q K_sᵀ/√d) V_s multiplied by that subject's mask
  resized to the layer, summed over subjects;
* output: to_out(text + image), the sum before the shared output projection, no scale.

What a UNet call should do (record maps, inject which tokens under which masks) is set on a
shared `AttentionState` before the call, so no extra kwargs travel through diffusers' blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn


@dataclass
class AttentionState:
    """Per-call instructions for every RealCustom processor of one UNet, and what they recorded.

    latent_size: (h, w) of the UNet input latent; layer resolutions are derived from it.
    target_tokens: [B, S, 77] indicator of each subject's target tokens; when set, each layer
        records the head-mean text attention summed over those tokens ([B, S, h_l, w_l]).
    image_tokens: [B, S, T, C] projector tokens per subject (None: text only).
    image_key_values: optional per-layer precomputed (K, V) of `image_tokens`, each
        [B, S, heads, T, d]; they are constant across steps, so callers may compute them once.
    masks: [B, S, h_m, w_m] guidance masks at 1/16 of the image (None: ungated, as in training).
    full_probability_layers: layer ids whose full probabilities [B, heads, 77, h, w] are kept
        (debugging and parity tests only).
    resize_by_size: a setting of the UNet, not of a call (kept across calls): masks are resized
        to a layer with `size=` (`resize_masks_by_size`, what the ONNX exporter can trace) instead
        of the official scale factor; the same values at sizes that are multiples of 32.
    """

    latent_size: tuple[int, int] = (0, 0)
    target_tokens: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None
    image_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    masks: torch.Tensor | None = None
    full_probability_layers: frozenset[int] = frozenset()
    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    full_probabilities: dict[int, torch.Tensor] = field(default_factory=dict)
    resized_masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    resize_by_size: bool = False

    def reset(self) -> None:
        self.target_tokens = self.image_tokens = self.image_key_values = self.masks = None
        self.full_probability_layers = frozenset()
        self.maps = {}
        self.full_probabilities = {}
        self.resized_masks = {}

    def masks_for_layer(self, layer_size: tuple[int, int]) -> torch.Tensor:
        """`masks` resized to one layer ([B, S, h*w]); layers of equal size share one resize per call."""
        if layer_size not in self.resized_masks:
            resize = resize_masks_by_size if self.resize_by_size else resize_masks_to_layer
            self.resized_masks[layer_size] = resize(self.masks, layer_size)
        return self.resized_masks[layer_size]

    @contextmanager
    def instructed(self, **instructions) -> Iterator[AttentionState]:
        """Set the instructions for the calls inside the block; cleared on exit, whatever happens."""
        self.reset()
        for name, value in instructions.items():
            setattr(self, name, value)
        try:
            yield self
        finally:
            self.reset()


def layer_resolution(num_tokens: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an attention layer from its token count: the latent halved s times (ceil)."""
    height, width = latent_size
    while height * width > num_tokens:
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    if height * width != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not match latent size {latent_size}")
    return height, width


def resize_masks_to_layer(masks: torch.Tensor, layer_size: tuple[int, int]) -> torch.Tensor:
    """Official per-layer resize: bilinear with scale_factor from heights only. [B,S,h,w] -> [B,S,h*w]."""
    scale = layer_size[0] / masks.shape[-2]
    resized = masks if scale == 1 else F.interpolate(masks, scale_factor=scale, mode="bilinear")
    if tuple(resized.shape[-2:]) != layer_size:
        raise ValueError(
            f"mask {tuple(masks.shape[-2:])} cannot be resized to layer {layer_size}; "
            "use image sizes that are multiples of 32"
        )
    return resized.flatten(2)


def resize_masks_by_size(masks: torch.Tensor, layer_size: tuple[int, int]) -> torch.Tensor:
    """`resize_masks_to_layer` with size= instead of a traced scale factor (which the ONNX exporter
    cannot take). The same values: image sizes are multiples of 32, so every layer/mask ratio is
    a power of two and bilinear sampling positions coincide (the ONNX-vs-eager tests check it)."""
    if tuple(masks.shape[-2:]) == tuple(layer_size):
        return masks.flatten(2)
    return F.interpolate(masks, size=tuple(layer_size), mode="bilinear").flatten(2)


def _split_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    # [..., N, C] -> [..., heads, N, C/heads]
    return tensor.unflatten(-1, (heads, -1)).transpose(-3, -2)


def subject_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(Q K_sᵀ/√d) V_s for every subject s with the shared query: [B, heads, N, d] and
    [B, S, heads, T, d] -> [B, S, N, C]. Subjects are folded into the batch so SDPA gets 4-D
    inputs, which every fused kernel (flash, memory-efficient, cuDNN) needs."""
    batch, subjects = key.shape[:2]
    folded_query = query.unsqueeze(1).expand(batch, subjects, *query.shape[1:]).flatten(0, 1)
    out = F.scaled_dot_product_attention(
        folded_query, key.flatten(0, 1), value.flatten(0, 1)
    )  # [B*S, heads, N, d]
    return out.unflatten(0, (batch, subjects)).transpose(-3, -2).flatten(-2)


def image_key_value(attn: Attention, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of the image tokens for one layer: [B, S, T, C] -> 2 x [B, S, heads, T, d]."""
    key = _split_heads(attn.to_k_vision(image_tokens), attn.heads)
    value = _split_heads(attn.to_v_vision(image_tokens), attn.heads)
    return key, value


class RealCustomAttnProcessor:
    """Processor for one `attn2` layer; `layer_id` is its official cross_attention_id."""

    def __init__(self, layer_id: int, state: AttentionState):
        self.layer_id = layer_id
        self.state = state

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("RealCustomAttnProcessor handles text cross-attention on token sequences only")
        state = self.state
        residual = hidden_states
        num_tokens = hidden_states.shape[1]
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = _split_heads(attn.to_q(hidden_states), attn.heads)  # [B, heads, N, d]
        text_key = _split_heads(attn.to_k(encoder_hidden_states), attn.heads)
        text_value = _split_heads(attn.to_v(encoder_hidden_states), attn.heads)

        if state.target_tokens is not None:
            out = self._text_attention_recording(query, text_key, text_value, num_tokens)
        else:
            out = F.scaled_dot_product_attention(query, text_key, text_value)

        if state.image_tokens is not None or state.image_key_values is not None:
            out = out.transpose(1, 2).flatten(2) + self._image_attention(attn, query, num_tokens)
        else:
            out = out.transpose(1, 2).flatten(2)  # [B, N, C]

        out = attn.to_out[1](attn.to_out[0](out.to(query.dtype)))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _text_attention_recording(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_tokens: int
    ) -> torch.Tensor:
        # Explicit fp32 probabilities, as the official eval path computes them.
        scores = query.float() @ key.float().transpose(-1, -2) / math.sqrt(query.shape[-1])
        probs = scores.softmax(dim=-1)  # [B, heads, N, 77]
        state = self.state
        layer_size = layer_resolution(num_tokens, state.latent_size)
        # Head mean, then the sum over each subject's target tokens: [B, S, N] -> [B, S, h, w].
        per_subject = torch.einsum("bnk,bsk->bsn", probs.mean(dim=1), state.target_tokens.float())
        state.maps[self.layer_id] = per_subject.unflatten(-1, layer_size)
        if self.layer_id in state.full_probability_layers:
            state.full_probabilities[self.layer_id] = probs.transpose(-1, -2).unflatten(-1, layer_size)
        return (probs @ value.float()).to(query.dtype)

    def _image_attention(self, attn: Attention, query: torch.Tensor, num_tokens: int) -> torch.Tensor:
        state = self.state
        if state.image_key_values is not None:
            key, value = state.image_key_values[self.layer_id]
        else:
            key, value = image_key_value(attn, state.image_tokens)
        out = subject_attention(query, key, value)  # [B, S, N, C]
        if state.masks is not None:
            layer_size = layer_resolution(num_tokens, state.latent_size)
            out = out * state.masks_for_layer(layer_size).to(out.dtype).unsqueeze(-1)
        return out.sum(dim=1)


def cross_attention_layers(unet: nn.Module) -> list[Attention]:
    """All `attn2` modules in the official cross_attention_id order: down, mid, up blocks."""
    blocks = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
    layers = [
        module
        for block in blocks
        for name, module in block.named_modules()
        if name.endswith("attn2") and isinstance(module, Attention)
    ]
    if not layers:
        raise ValueError("the UNet has no text cross-attention (attn2) layers")
    return layers


def install_realcustom_attention(
    unet: nn.Module, image_token_dim: int
) -> tuple[list[Attention], AttentionState]:
    """Add to_k_vision/to_v_vision to every attn2 and set the RealCustom processors on them."""
    state = AttentionState()
    layers = cross_attention_layers(unet)
    for layer_id, attn in enumerate(layers):
        inner_dim = attn.to_k.out_features
        if not hasattr(attn, "to_k_vision"):
            attn.to_k_vision = nn.Linear(image_token_dim, inner_dim, bias=False)
            attn.to_v_vision = nn.Linear(image_token_dim, inner_dim, bias=False)
        attn.set_processor(RealCustomAttnProcessor(layer_id, state))
    return layers, state
