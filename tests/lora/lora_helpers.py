"""Random LoRA adapters for the tiny UNet, written in each layout by the tools that write them:
peft layout through diffusers' own `save_lora_weights` (with its adapter metadata), kohya layout as
sd-scripts names its keys (diffusers' and the original SGM UNet's module names). B is random and
nonzero, so every adapter changes the UNet's output."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from safetensors.torch import save_file
from torch import nn

from realcustom.lora.formats import _sgm_names
from realcustom.unet import RealCustomUNet

# A bit of everything a LoRA targets: attention projections (self and cross), feed-forward,
# transformer projections, a 3x3 resnet conv, a 1x1 shortcut, a strided downsampler, an
# upsampler, a resnet's time projection, the time embedding and the SDXL added embedding.
TARGETS = (
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_q",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "up_blocks.0.attentions.1.proj_in",
    "up_blocks.1.attentions.0.proj_out",
    "up_blocks.1.attentions.1.transformer_blocks.1.attn1.to_v",
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.1.resnets.0.conv_shortcut",
    "down_blocks.1.downsamplers.0.conv",
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.2.resnets.1.time_emb_proj",
    "time_embedding.linear_1",
    "add_embedding.linear_2",
)
# What kohya's SGM-named files may hold that diffusers also maps (attention blocks only).
ATTENTION_TARGETS = tuple(name for name in TARGETS if "attentions" in name)


def random_lora(
    unet: RealCustomUNet, seed: int, rank: int = 4, targets=TARGETS, strength: float = 0.3
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module (A, B), drawn so that B·A is about `strength` x the layer's weight scale at alpha = rank."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(unet.unet.named_modules())
    lora = {}
    for name in targets:
        layer = modules[name]
        if isinstance(layer, nn.Linear):
            down_shape, up_shape = (rank, layer.in_features), (layer.out_features, rank)
        else:
            down_shape = (rank, layer.in_channels, *layer.kernel_size)
            up_shape = (layer.out_channels, rank, 1, 1)
        weight_scale = float(layer.weight.abs().mean())
        down = torch.randn(down_shape, generator=generator) / down_shape[1] ** 0.5
        up = torch.randn(up_shape, generator=generator) * strength * weight_scale * 3 / rank**0.5
        lora[name] = (down, up)
    return lora


def save_peft(directory: Path, lora: dict, alpha: float) -> Path:
    """diffusers' own writer: `unet.<module>.lora_A/B.weight` and the LoraConfig as metadata."""
    state = {}
    for name, (down, up) in lora.items():
        state[f"{name}.lora_A.weight"] = down
        state[f"{name}.lora_B.weight"] = up
    rank = next(iter(lora.values()))[0].shape[0]
    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(lora)}
    StableDiffusionXLPipeline.save_lora_weights(
        str(directory), unet_lora_layers=state, unet_lora_adapter_metadata=metadata
    )
    return directory / "pytorch_lora_weights.safetensors"


def save_kohya(path: Path, lora: dict, alpha: float, unet: RealCustomUNet, sgm: bool) -> Path:
    """sd-scripts' layout: `lora_unet_<name with _>.lora_down/lora_up.weight` and `.alpha`, with
    the diffusers module name (SD-1.5 files) or the SGM one (SDXL files)."""
    names = _sgm_names(unet.unet) if sgm else {name: name for name in lora}
    state = {}
    for name, (down, up) in lora.items():
        stem = "lora_unet_" + names[name].replace(".", "_")
        state[f"{stem}.lora_down.weight"] = down
        state[f"{stem}.lora_up.weight"] = up
        state[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_file(state, str(path))
    return path


def _unet_only_pipeline(unet: RealCustomUNet) -> StableDiffusionXLPipeline:
    """A diffusers pipeline around `unet`'s UNet alone: where diffusers' LoRA loaders act."""
    return StableDiffusionXLPipeline(
        vae=None,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet.unet,
        scheduler=EulerDiscreteScheduler(),
    )


def diffusers_fused(unet: RealCustomUNet, source: Path, scale: float) -> RealCustomUNet:
    """A copy of `unet` with the adapter loaded and fused by diffusers itself
    (`load_lora_weights` + `fuse_lora`): the reference for per-row LoRA."""
    fused = copy.deepcopy(unet)
    pipe = _unet_only_pipeline(fused)
    pipe.load_lora_weights(str(source), adapter_name="reference")
    pipe.fuse_lora(lora_scale=scale)
    return fused.requires_grad_(False)


def diffusers_fused_many(unet: RealCustomUNet, sources: list[tuple[Path, float]]) -> RealCustomUNet:
    """Several adapters loaded by diffusers, weighted with `set_adapters` and fused together."""
    fused = copy.deepcopy(unet)
    pipe = _unet_only_pipeline(fused)
    names = [f"adapter{i}" for i in range(len(sources))]
    for name, (source, _) in zip(names, sources, strict=True):
        pipe.load_lora_weights(str(source), adapter_name=name)
    pipe.set_adapters(names, [scale for _, scale in sources])
    pipe.fuse_lora(adapter_names=names)
    return fused.requires_grad_(False)


def tiny_conditioning(pipeline, prompt: str, target: str, guidance: float, rows: int, size: int = 64):
    """Per-sample conditioning of `rows` samples of one prompt and one red reference."""
    from PIL import Image

    from realcustom.step import Conditioning

    photo = Image.new("RGB", (64, 64), (200, 20, 20))
    text = pipeline.encode_prompt([prompt])
    negative = pipeline.negative_embeddings(1)

    def repeat(tensor):
        return None if tensor is None else tensor.expand(rows, *tensor.shape[1:]).contiguous()

    return Conditioning(
        prompt_embeds=repeat(text.tokens),
        negative_prompt_embeds=repeat(negative.tokens),
        pooled=repeat(text.pooled),
        negative_pooled=repeat(negative.pooled),
        time_ids=pipeline.time_ids(rows, size, size),
        image_tokens=repeat(torch.stack(pipeline.reference_tokens([photo])).unsqueeze(0)),
        negative_image_tokens=repeat(pipeline.black_image_tokens().unsqueeze(1)),
        target_tokens=repeat(pipeline.target_tokens(prompt, [target]).unsqueeze(0)),
        guidance_scale=torch.full((rows,), guidance),
        mask_scope=torch.full((rows,), 0.25, dtype=torch.float64),
    )


def one_of_each_kind(unet: RealCustomUNet) -> tuple[str, ...]:
    """The first layer of each kind a LoRA targets in `unet` (for UNets other than the tiny one)."""
    from realcustom.lora.bank import target_layers

    kinds = ("attn1.to_q", "attn2.to_k", "attn2.to_out.0", "ff.net.0.proj", "proj_in", "conv1")
    kinds += ("conv_shortcut", "downsamplers.0.conv", "time_emb_proj", "time_embedding.linear_1")
    layers = target_layers(unet.unet, "all")
    return tuple(next(name for name in layers if name.endswith(kind)) for kind in kinds)
