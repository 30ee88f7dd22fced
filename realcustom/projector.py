"""The Cross-layer Cross-scale Projector (CCP): vision features -> image tokens.

`ReleasedProjector` has the semantics and parameter names of the official
`ProjectorHighResMinAttn` (what the released checkpoint holds). `CrossLayerProjector` is the
paper's design with both branches: the detail (cross-scale) branch is added to the base tokens and
the structural (cross-layer, shallow features) branch is appended as extra tokens. The released
shallow class overwrites its detail branch; ours keeps it, as the paper draws it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class MinAttention(nn.Module):
    """Bare multi-head cross-attention: LayerNorm on both sides, bias-free q/k/v, no output projection."""

    def __init__(self, dim: int, dim_head: int):
        super().__init__()
        if dim % dim_head:
            raise ValueError(f"vision_dim {dim} is not a multiple of dim_head {dim_head}")
        self.heads = dim // dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, num_queries, dim = queries.shape
        context = self.norm2(context)
        query = self.to_q(self.norm1(queries))
        key = self.to_k(context)
        value = self.to_v(context)
        # [B, T, C] -> [B, heads, T, C/heads]
        query, key, value = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value)
        return out.transpose(1, 2).reshape(batch, num_queries, dim)


def _token_mlp(vision_dim: int, out_dim: int) -> nn.Sequential:
    # Indices 0, 2, 4, 5 carry weights: the official checkpoint keys are projector.{0,2,4,5}.*
    return nn.Sequential(
        nn.Linear(vision_dim, vision_dim * 4),
        nn.GELU(),
        nn.Linear(vision_dim * 4, out_dim),
        nn.GELU(),
        nn.Linear(out_dim, out_dim),
        nn.LayerNorm(out_dim),
    )


@dataclass(frozen=True)
class ProjectorConfig:
    """Projector hyper-parameters (released SDXL: vision_dim 2176, out_dim 2048, dim_head 64)."""

    vision_dim: int = 2176
    out_dim: int = 2048
    dim_head: int = 64
    cross_layer: bool = False

    def build(self) -> nn.Module:
        cls = CrossLayerProjector if self.cross_layer else ReleasedProjector
        return cls(self.vision_dim, self.out_dim, self.dim_head)


class ReleasedProjector(nn.Module):
    """tokens = projector_base(G) + MLP(MinAttention(G, L)); G global, L local (high-res) tokens."""

    def __init__(self, vision_dim: int, out_dim: int, dim_head: int):
        super().__init__()
        self.min_attention = MinAttention(vision_dim, dim_head)
        self.projector = _token_mlp(vision_dim, out_dim)
        self.projector_base = nn.Linear(vision_dim, out_dim)

    def forward(
        self,
        global_tokens: torch.Tensor,
        local_tokens: torch.Tensor,
        shallow_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        detail = self.projector(self.min_attention(global_tokens, local_tokens))
        return self.projector_base(global_tokens) + detail  # [B, T, out_dim]


class CrossLayerProjector(ReleasedProjector):
    """The paper's CCP: [base(G) + detail(G, L) ; structure(G, shallow)] -> 2T tokens."""

    def __init__(self, vision_dim: int, out_dim: int, dim_head: int):
        super().__init__(vision_dim, out_dim, dim_head)
        self.shallow_attention = MinAttention(vision_dim, dim_head)
        self.shallow_projector = _token_mlp(vision_dim, out_dim)

    def forward(
        self,
        global_tokens: torch.Tensor,
        local_tokens: torch.Tensor,
        shallow_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if shallow_tokens is None:
            raise ValueError("the cross-layer projector needs shallow features; configure shallow_layers")
        detailed = super().forward(global_tokens, local_tokens)
        structure = self.shallow_projector(self.shallow_attention(global_tokens, shallow_tokens))
        return torch.cat([detailed, structure], dim=1)  # [B, 2T, out_dim]
