"""LoRA key layouts -> the canonical `LoRAAdapter` (realcustom/lora/adapter.py).

Three layouts, told apart by their keys:

* `peft` (what diffusers' `save_lora_weights` writes today): `unet.<module>.lora_A.weight` and
  `.lora_B.weight` (also without the `unet.` prefix, or with peft's `base_model.model.`); alpha
  comes from the file's `lora_adapter_metadata` (`unet.lora_alpha`, `unet.alpha_pattern`,
  `unet.use_rslora`), else from `<module>.alpha` keys, else alpha = rank (scale 1), as diffusers
  does.
* `diffusers-legacy`: `<module>.lora.down.weight` / `.lora.up.weight`, or the attention-processor
  form `<attn>.processor.to_q_lora.down.weight` (`to_out_lora` is `to_out.0`); alpha from
  `<stem>.alpha` keys when present.
* `kohya` (sd-scripts, most community files): `lora_unet_<module with _ for .>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`. The module part is either diffusers' name (SD-1.5 files) or the
  original SGM UNet's (`input_blocks_4_1_...`, `in_layers_2`: SDXL files); both are resolved
  against the UNet's own module names, so no heuristic guesses where an underscore splits words.

Text-encoder weights (`lora_te*_`, `text_encoder*.`) are refused by default (only the UNet takes
per-row LoRA here); `text_encoder="skip"` drops them and records how many. LyCORIS variants (LoHa,
LoKr, Tucker `lora_mid`), DoRA and LoRA biases are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from realcustom.lora.adapter import LoRAAdapter, LoRAError, LoRAModule

METADATA_KEY = "lora_adapter_metadata"
_PEFT = re.compile(r"^(?P<stem>.+)\.lora_(?P<part>A|B)\.weight$")
_LEGACY = re.compile(r"^(?P<stem>.+)\.lora\.(?P<part>down|up)\.weight$")
_PROCESSOR = re.compile(
    r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"
)
_KOHYA = re.compile(r"^(?P<stem>lora_unet_.+)\.lora_(?P<part>down|up)\.weight$")
_ALPHA = re.compile(r"^(?P<stem>.+)\.alpha$")
_UNET_PREFIXES = ("unet.", "base_model.model.")
_TEXT_PREFIXES = (
    "lora_te_",
    "lora_te1_",
    "lora_te2_",
    "text_encoder.",
    "text_encoder_2.",
    "te.",
    "te1.",
    "te2.",
)
# Refused outright, with the reason.
_UNSUPPORTED = {
    "hada_": "LoHa (LyCORIS) adapters are not LoRA",
    "lokr_": "LoKr (LyCORIS) adapters are not LoRA",
    "lora_mid": "Tucker-decomposed (LyCORIS lora_mid) convolutions are not supported",
    "dora_scale": "DoRA adapters are not supported",
    "lora_magnitude_vector": "DoRA adapters are not supported",
    "lora_B.bias": "LoRA biases are not supported",
    "lora_up.bias": "LoRA biases are not supported",
}
_PART = {"A": "down", "B": "up", "down": "down", "up": "up"}


@dataclass
class _Stem:
    """The tensors found for one targeted module."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)


def parse_state_dict(
    state: Mapping[str, torch.Tensor],
    unet: nn.Module,
    *,
    name: str,
    metadata: Mapping[str, str] | None = None,
    source: str = "",
    text_encoder: str = "reject",
) -> LoRAAdapter:
    """The canonical adapter of a LoRA state dict for `unet` (a diffusers UNet2DConditionModel).

    Raises `LoRAError` naming the offending key for anything it cannot map exactly."""
    if text_encoder not in ("reject", "skip"):
        raise ValueError(f"text_encoder must be 'reject' or 'skip', got {text_encoder!r}")
    where = f"LoRA {name!r} ({source or 'in memory'})"
    if not state:
        raise LoRAError(f"{where} holds no tensors")
    for key in state:
        for marker, reason in _UNSUPPORTED.items():
            if marker in key:
                raise LoRAError(f"{where}: {reason} (key {key!r})")
    text_keys = [key for key in state if key.startswith(_TEXT_PREFIXES)]
    if text_keys and text_encoder == "reject":
        raise LoRAError(
            f"{where} holds {len(text_keys)} text-encoder weights (e.g. {text_keys[0]!r}); only UNet LoRA "
            "is served: load it with text_encoder='skip' to drop them (it then acts on the UNet only)"
        )
    unet_state = {key: value for key, value in state.items() if key not in set(text_keys)}
    layout = _layout(unet_state, where)
    stems = _group(unet_state, layout, where)
    names = _module_names(unet, layout)
    peft_alpha = _peft_alphas(metadata, where) if layout == "peft" else None
    modules: dict[str, LoRAModule] = {}
    for stem, found in stems.items():
        module = names.get(stem)
        if module is None:
            raise LoRAError(f"{where}: key {found.keys[0]!r} names no Linear/Conv2d layer of this UNet")
        if found.down is None or found.up is None:
            missing = "down (A)" if found.down is None else "up (B)"
            raise LoRAError(f"{where}: {module} has no {missing} weight (keys {found.keys})")
        if module in modules:
            raise LoRAError(f"{where}: {module} appears twice (keys {found.keys})")
        rank = found.down.shape[0]
        alpha = found.alpha
        if peft_alpha is not None:
            alpha, rslora = peft_alpha(module)
            scale = (alpha if alpha is not None else rank) / (math.sqrt(rank) if rslora else rank)
        else:
            scale = 1.0 if alpha is None else alpha / rank
        down, up = found.down, found.up
        if down.ndim == 4 and up.ndim == 2:  # some files store 1x1 conv LoRA as matrices
            up = up[:, :, None, None]
        modules[module] = LoRAModule(down=down, up=up, scale=float(scale))
    return LoRAAdapter(name, modules, source, layout, {"text_encoder": len(text_keys)} if text_keys else {})


def _layout(state: Mapping[str, torch.Tensor], where: str) -> str:
    weights = [key for key in state if not _ALPHA.match(key)]
    layouts = {
        "peft": sum(bool(_PEFT.match(k)) for k in weights),
        "diffusers-legacy": sum(bool(_LEGACY.match(k) or _PROCESSOR.match(k)) for k in weights),
        "kohya": sum(bool(_KOHYA.match(k)) for k in weights),
    }
    found = [layout for layout, count in layouts.items() if count]
    if len(found) != 1:
        what = "mixes LoRA layouts " + ", ".join(found) if found else "has no LoRA weights in a known layout"
        raise LoRAError(f"{where} {what} (peft lora_A/lora_B, diffusers lora.down/up, kohya lora_unet_*)")
    layout = found[0]
    stray = [key for key in weights if not _matches(key, layout)]
    if stray:
        raise LoRAError(f"{where}: {len(stray)} keys are not {layout} LoRA weights (e.g. {stray[0]!r})")
    return layout


def _matches(key: str, layout: str) -> bool:
    if layout == "peft":
        return bool(_PEFT.match(key))
    if layout == "kohya":
        return bool(_KOHYA.match(key))
    return bool(_LEGACY.match(key) or _PROCESSOR.match(key))


def _group(state: Mapping[str, torch.Tensor], layout: str, where: str) -> dict[str, _Stem]:
    stems: dict[str, _Stem] = {}
    for key, tensor in state.items():
        alpha = _ALPHA.match(key)
        if alpha:
            stem = _strip(alpha["stem"]) if layout != "kohya" else alpha["stem"]
            if tensor.numel() != 1:
                raise LoRAError(f"{where}: alpha {key!r} is not a scalar ({tuple(tensor.shape)})")
            stems.setdefault(stem, _Stem()).alpha = float(tensor.float())
            stems[stem].keys.append(key)
            continue
        if layout == "peft":
            match = _PEFT.match(key)
            stem = _strip(match["stem"])
        elif layout == "kohya":
            match = _KOHYA.match(key)
            stem = match["stem"]
        elif match := _PROCESSOR.match(key):
            projection = "to_out.0" if match["proj"] == "to_out" else match["proj"]
            stem = f"{_strip(match['attn'])}.{projection}"
        else:
            match = _LEGACY.match(key)
            stem = _strip(match["stem"])
        entry = stems.setdefault(stem, _Stem())
        entry.keys.append(key)
        setattr(entry, _PART[match["part"]], tensor)
    orphans = [stem for stem, found in stems.items() if found.down is None and found.up is None]
    if orphans:
        raise LoRAError(f"{where}: alpha without weights for {orphans[0]!r}")
    return stems


def _strip(stem: str) -> str:
    for prefix in _UNET_PREFIXES:
        if stem.startswith(prefix):
            return stem[len(prefix) :]
    return stem


def _peft_alphas(metadata: Mapping[str, str] | None, where: str):
    """Per-module (alpha or None, rslora) from diffusers' `lora_adapter_metadata` (peft's LoraConfig
    under a `unet.` prefix); None when the file has none (then alpha keys or rank decide)."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise LoRAError(f"{where}: unreadable {METADATA_KEY} ({error})") from error
    config = {key.removeprefix("unet."): value for key, value in config.items()}
    if config.get("use_dora"):
        raise LoRAError(f"{where}: DoRA adapters are not supported (metadata use_dora)")
    alpha, patterns = config.get("lora_alpha"), config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))

    def lookup(module: str) -> tuple[float | None, bool]:
        # peft: a pattern applies when the module's name ends with it (at a dot).
        for pattern, value in patterns.items():
            if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
                return float(value), rslora
        return (None if alpha is None else float(alpha)), rslora

    return lookup


def _module_names(unet: nn.Module, layout: str) -> dict[str, str]:
    """How each layout spells every Linear/Conv2d of `unet` -> its module name."""
    layers = [name for name, module in unet.named_modules() if isinstance(module, nn.Linear | nn.Conv2d)]
    if layout != "kohya":
        return {name: name for name in layers}
    sgm = _sgm_names(unet)
    names = {"lora_unet_" + name.replace(".", "_"): name for name in layers}
    names.update({"lora_unet_" + sgm[name].replace(".", "_"): name for name in layers if name in sgm})
    return names


_RESNET_SGM = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3"}
_RESNET_SGM["conv_shortcut"] = "skip_connection"


def _sgm_names(unet: nn.Module) -> dict[str, str]:
    """The original (SGM/LDM) UNet's name of every layer of a diffusers UNet that has one."""
    blocks = {
        "conv_in": "input_blocks.0.0",
        "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    resnets: set[str] = set()
    index = 1
    for d, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            blocks[f"down_blocks.{d}.resnets.{j}"] = f"input_blocks.{index}.0"
            resnets.add(f"down_blocks.{d}.resnets.{j}")
            if getattr(block, "attentions", None):
                blocks[f"down_blocks.{d}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if block.downsamplers:
            blocks[f"down_blocks.{d}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    if unet.mid_block is not None:
        for j, sgm in ((0, "middle_block.0"), (1, "middle_block.2")):
            blocks[f"mid_block.resnets.{j}"] = sgm
            resnets.add(f"mid_block.resnets.{j}")
        blocks["mid_block.attentions.0"] = "middle_block.1"
    index = 0
    for u, block in enumerate(unet.up_blocks):
        has_attention = bool(getattr(block, "attentions", None))
        for j in range(len(block.resnets)):
            blocks[f"up_blocks.{u}.resnets.{j}"] = f"output_blocks.{index}.0"
            resnets.add(f"up_blocks.{u}.resnets.{j}")
            if has_attention:
                blocks[f"up_blocks.{u}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == len(block.resnets) - 1 and block.upsamplers:
                blocks[f"up_blocks.{u}.upsamplers.0.conv"] = (
                    f"output_blocks.{index}.{2 if has_attention else 1}.conv"
                )
            index += 1
    names = {}
    for name, module in unet.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        prefix = next(
            (p for p in sorted(blocks, key=len, reverse=True) if name == p or name.startswith(p + ".")), None
        )
        if prefix is None:
            continue
        rest = name[len(prefix) + 1 :]
        if prefix in resnets:
            rest = _RESNET_SGM.get(rest, rest)
        names[name] = blocks[prefix] + ("." + rest if rest else "")
    return names
