"""Text conditioning: SDXL's two CLIP encoders, or SD-1.5's one.

SDXL (as the official code builds it): the penultimate hidden states of CLIP ViT-L and OpenCLIP
bigG, without the final norm, concatenated on channels (768 + 1280 = 2048); the pooled vector is
the *unprojected* pooler output of the bigG encoder. SD-1.5: CLIP ViT-L's last hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch
from torch import nn
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from realcustom.tokenizer import CLIP_CONTEXT_LENGTH


def default_negative_prompt() -> str:
    return resources.files("realcustom").joinpath("assets/negative_prompt.txt").read_text().strip()


@dataclass
class TextEmbeddings:
    """tokens [B, 77, D]; pooled [B, P] (SDXL) or None (SD-1.5)."""

    tokens: torch.Tensor
    pooled: torch.Tensor | None


class TextEncoder(nn.Module):
    """One (SD-1.5) or two (SDXL) CLIP text encoders with their tokenizers."""

    def __init__(self, tokenizers: list[PreTrainedTokenizerBase], encoders: list[CLIPTextModel]):
        super().__init__()
        if len(tokenizers) != len(encoders) or len(encoders) not in (1, 2):
            raise ValueError("give one tokenizer per encoder: one encoder (SD-1.5) or two (SDXL)")
        self.tokenizers = tokenizers
        self.encoders = nn.ModuleList(encoders)

    @property
    def is_sdxl(self) -> bool:
        return len(self.encoders) == 2

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer used to locate target phrases (both SDXL tokenizers share one BPE)."""
        return self.tokenizers[0]

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbeddings:
        device = self.encoders[0].device
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=CLIP_CONTEXT_LENGTH,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2] if self.is_sdxl else output.last_hidden_state)
            pooled = output.pooler_output
        return TextEmbeddings(torch.cat(hidden, dim=-1), pooled if self.is_sdxl else None)
