"""The UNet with RealCustom image cross-attention, called in its two roles.

`guidance`: text only, records each subject's target-word attention in every attn2 layer.
`generation`: text plus each subject's image tokens, gated by the subjects' masks.
Both take `adapters`, each row's LoRA slots and scales ([n, K] index and scale), when an adapter
bank (realcustom/lora/bank.py) is installed on the UNet.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from realcustom.attention import image_key_value, install_realcustom_attention

VISION_KEY_SUFFIXES = (".to_k_vision.weight", ".to_v_vision.weight")
# Each row's adapter slots [n, K] (int64) and scales [n, K] (float32), in the call's row order.
AdapterRows = tuple[torch.Tensor, torch.Tensor]


class RealCustomUNet(nn.Module):
    """A diffusers `UNet2DConditionModel` whose attn2 layers inject image tokens under masks."""

    def __init__(self, unet: UNet2DConditionModel, image_token_dim: int):
        super().__init__()
        self.unet = unet
        layers, state = install_realcustom_attention(unet, image_token_dim)
        self.cross_attention_layers = layers
        self.attention_state = state
        self.is_sdxl = unet.config.addition_embed_type == "text_time"
        self.adapters = None  # an AdapterBank once one is installed (per-row LoRA)

    @property
    def num_layers(self) -> int:
        return len(self.cross_attention_layers)

    def _forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        pooled: torch.Tensor | None,
        time_ids: torch.Tensor | None,
        adapters: AdapterRows | None = None,
    ) -> torch.Tensor:
        added = {"text_embeds": pooled, "time_ids": time_ids} if self.is_sdxl else None
        self.attention_state.latent_size = tuple(latents.shape[-2:])
        if adapters is None:
            return self.unet(latents, timestep, encoder_hidden_states=text, added_cond_kwargs=added).sample
        if self.adapters is None:
            raise ValueError("per-row adapters were given but the UNet has no adapter bank")
        with self.adapters.selection.selected(*adapters):
            return self.unet(latents, timestep, encoder_hidden_states=text, added_cond_kwargs=added).sample

    def guidance(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        pooled: torch.Tensor | None,
        time_ids: torch.Tensor | None,
        target_tokens: torch.Tensor,
        full_probability_layers: frozenset[int] = frozenset(),
        adapters: AdapterRows | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], dict[int, torch.Tensor]]:
        """Text-only pass; returns ε, the per-layer maps [B,S,h_l,w_l] in layer order, full probs kept."""
        with self.attention_state.instructed(
            target_tokens=target_tokens, full_probability_layers=full_probability_layers
        ) as state:
            eps = self._forward(latents, timestep, text, pooled, time_ids, adapters)
            maps = [state.maps[layer_id] for layer_id in range(self.num_layers)]
            return eps, maps, dict(state.full_probabilities)

    def generation(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        pooled: torch.Tensor | None,
        time_ids: torch.Tensor | None,
        image_tokens: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        image_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        adapters: AdapterRows | None = None,
    ) -> torch.Tensor:
        """Pass with image tokens [B,S,T,C] (or their per-layer K/V) under masks [B,S,h_m,w_m]."""
        with self.attention_state.instructed(
            image_tokens=image_tokens, image_key_values=image_key_values, masks=masks
        ):
            return self._forward(latents, timestep, text, pooled, time_ids, adapters)

    def image_key_values(self, image_tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's image K/V of [B,S,T,C] tokens: constant over steps, so computed once."""
        return [image_key_value(attn, image_tokens) for attn in self.cross_attention_layers]

    def vision_state_dict(self) -> dict[str, torch.Tensor]:
        """The added to_k_vision/to_v_vision weights, under their official key names."""
        return {k: v for k, v in self.unet.state_dict().items() if k.endswith(VISION_KEY_SUFFIXES)}
