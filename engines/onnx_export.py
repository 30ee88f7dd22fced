"""ONNX export of the projector and of the UNet in its two RealCustom++ roles, per static shape.

Graphs (names are the ONNX input/output names):

* projector:  global_tokens [N,Tg,Cv], local_tokens [N,Tl,Cv] (, shallow_tokens) -> image_tokens [N,T,C]
* guidance:   latents [B,4,h,w], timestep [B] (float32), text [B,77,D], target_tokens [B,S,77]
              (, pooled [B,P], time_ids [B,6] on SDXL) ->
              layer_maps [B,S,L,h/2,w/2]: every attn2 layer's target-token map (head mean, summed
              over each subject's target tokens), bilinearly resized to the mask resolution as
              `realcustom.masks.mask_scores` does first; masks are then computed in torch from
              `layer_maps.unbind(2)` (the resize to the same size is exact, so masks equal eager).
              The guidance pass's ε is not an output (the loop never uses it), so TensorRT can
              prune the UNet's tail after the last attn2 layer.
* generation: latents [2B,4,h,w], timestep [2B], text [2B,77,D], masks [2B,S,h/2,w/2]
              (, pooled, time_ids), then either image_k_00, image_v_00, ... [2B,S,heads,T,d]
              per attn2 layer (variant "kv", what the loop uses: K/V computed once per request)
              or image_tokens [2B,S,T,C] (variant "tokens") -> eps [2B,4,h,w].

With an adapter bank on the UNet (per-row LoRA, realcustom/lora/bank.py), both UNet roles take the
LoRA as inputs after their own: `lora_index` [n,K] int64 and `lora_scale` [n,K] (each row's slots
and scales; n = B for guidance, 2B for generation: the unconditional half repeats the rows'
adapters), then `lora_down_NNN` [slots,R,in(,kh,kw)] and `lora_up_NNN` [slots,R,out] for every
targeted layer in the bank's order. An engine bound to the bank's own buffers uses an adapter
loaded later into a free slot with no rebuild and no refit.

Graphs are always exported in fp32 (a bf16 pipeline is exported from an fp32 copy): ONNX
rejects bf16 Conv at opset 17, and TensorRT picks reduced precision itself from the builder's
BF16/FP16 flag (engines/tensorrt/builder.py). Every graph input and output is therefore fp32.

Shapes are static (one graph per bucket: TensorRT builds its best kernels for fixed shapes, and
CUDA graphs need fixed shapes anyway). Graphs whose weights exceed 2 GB (the protobuf limit; SDXL's
UNet is ~10 GB in fp32) are saved with external data in one `<stem>.data` file next to the graph.
The TorchScript-based exporter is used (`dynamo=False`): it needs no extra packages.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from engines.static_loop import Bucket
from realcustom.pipeline import RealCustomPipeline

logger = logging.getLogger(__name__)

OPSET = 17
PROTOBUF_LIMIT = 2 * 1024**3
GRAPHS = ("projector", "guidance", "generation")


class ProjectorGraph(nn.Module):
    def __init__(self, projector: nn.Module):
        super().__init__()
        self.projector = projector

    def forward(self, global_tokens, local_tokens, shallow_tokens=None):
        return self.projector(global_tokens, local_tokens, shallow_tokens)


class GuidanceGraph(nn.Module):
    """`RealCustomUNet.guidance` -> layer maps stacked at the mask resolution (no ε)."""

    def __init__(self, unet, mask_size: tuple[int, int]):
        super().__init__()
        self.unet = unet
        self.mask_size = mask_size
        # Set by AdapterInputs around a call (an attribute, not an argument: the exporter turns
        # every argument of forward into a graph input).
        self.adapters = None

    def forward(self, latents, timestep, text, target_tokens, pooled=None, time_ids=None):
        _, maps, _ = self.unet.guidance(
            latents, timestep, text, pooled, time_ids, target_tokens, adapters=self.adapters
        )
        resized = [F.interpolate(m.float(), size=self.mask_size, mode="bilinear") for m in maps]
        return torch.stack(resized, dim=2)


class GenerationGraph(nn.Module):
    """`RealCustomUNet.generation` with image K/V per layer (variant "kv") or image tokens."""

    def __init__(self, unet, is_sdxl: bool, variant: str):
        super().__init__()
        if variant not in ("kv", "tokens"):
            raise ValueError(f"generation variant must be 'kv' or 'tokens', got {variant!r}")
        self.unet = unet
        self.is_sdxl = is_sdxl
        self.variant = variant
        self.adapters = None  # set by AdapterInputs around a call

    def forward(self, latents, timestep, text, masks, *rest):
        adapters = self.adapters
        pooled, time_ids = (rest[0], rest[1]) if self.is_sdxl else (None, None)
        image = rest[2:] if self.is_sdxl else rest
        if self.variant == "tokens":
            return self.unet.generation(
                latents, timestep, text, pooled, time_ids, image[0], masks, adapters=adapters
            )
        pairs = [(image[i], image[i + 1]) for i in range(0, len(image), 2)]
        return self.unet.generation(
            latents, timestep, text, pooled, time_ids, masks=masks, image_key_values=pairs, adapters=adapters
        )


class AdapterInputs(nn.Module):
    """A UNet-role graph whose per-row LoRA is input: `lora_index`, `lora_scale` and every targeted
    layer's slot buffers come last. While tracing, each layer's buffers are swapped for the inputs,
    so the graph reads the slots it is given, never the values they held at export."""

    def __init__(self, graph: nn.Module, bank):
        super().__init__()
        self.graph = graph
        self.layers = list(bank.layers.values())  # (not registered: the graph holds them already)

    def forward(self, *inputs):
        count = 2 + 2 * len(self.layers)
        own, (index, scale, *slots) = inputs[:-count], inputs[-count:]
        saved = [(layer.lora_down, layer.lora_up) for layer in self.layers]
        try:
            for layer, down, up in zip(self.layers, slots[0::2], slots[1::2], strict=True):
                layer.lora_down, layer.lora_up = down, up
            self.graph.adapters = (index, scale)
            return self.graph(*own)
        finally:
            self.graph.adapters = None
            for layer, (down, up) in zip(self.layers, saved, strict=True):
                layer.lora_down, layer.lora_up = down, up


def adapter_inputs(bank, rows: int) -> tuple[list[str], list[torch.Tensor]]:
    """Names and example values of the LoRA inputs of a pass over `rows` rows (the bank's slots)."""
    generator = torch.Generator("cpu").manual_seed(1)
    slots = len(bank.slots)
    layer = next(iter(bank.layers.values()))
    index = torch.randint(0, slots, (rows, bank.per_row), generator=generator).to(layer.lora_down.device)
    scale = torch.rand(rows, bank.per_row, generator=generator).to(layer.lora_down.device)
    names, values = ["lora_index", "lora_scale"], [index, scale]
    for number, layer in enumerate(bank.layers.values()):
        names += [f"lora_down_{number:03d}", f"lora_up_{number:03d}"]
        values += [layer.lora_down, layer.lora_up]
    return names, values


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: what it is and the static shape it was exported for."""

    graph: str  # projector | guidance | generation
    bucket: Bucket
    variant: str = "kv"  # generation only

    @property
    def stem(self) -> str:
        extra = f"-{self.variant}" if self.graph == "generation" else ""
        return f"{self.graph}{extra}-{self.bucket}"


@torch.no_grad()
def example_inputs(
    pipeline: RealCustomPipeline, spec: GraphSpec
) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Input names and deterministic example tensors (random values, the graph's exact shapes)."""
    unet = pipeline.unet
    device, dtype = pipeline.device, pipeline.dtype
    generator = torch.Generator("cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

    bucket = spec.bucket
    channels, h, w = pipeline.latent_shape(bucket.height, bucket.width)
    config = unet.unet.config
    tokens = pipeline.black_image_tokens()  # [1, T, C]
    num_tokens, token_dim = tokens.shape[1:]
    if spec.graph == "projector":
        features = pipeline.reference_encoder.black_features(bucket.batch)
        names = ["global_tokens", "local_tokens"]
        values = [features.global_tokens, features.local_tokens]
        if features.shallow_tokens is not None:
            names.append("shallow_tokens")
            values.append(features.shallow_tokens)
        return names, tuple(rand(*v.shape) for v in values)

    batch = bucket.batch if spec.graph == "guidance" else 2 * bucket.batch
    subjects = bucket.subjects
    latents = rand(batch, channels, h, w)
    timestep = torch.full((batch,), 999.0, device=device)
    text = rand(batch, 77, config.cross_attention_dim)
    sdxl = []
    if unet.is_sdxl:
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        time_ids = torch.tensor([bucket.width, bucket.height, 0, 0, bucket.width, bucket.height])
        sdxl = [rand(batch, pooled_dim), time_ids.to(device, dtype).expand(batch, -1).contiguous()]
    lora_names, lora = adapter_inputs(unet.adapters, batch) if unet.adapters is not None else ([], [])
    if spec.graph == "guidance":
        target = torch.zeros(batch, subjects, 77)
        for s in range(subjects):
            target[:, s, 2 + s] = 1
        names = ["latents", "timestep", "text", "target_tokens"] + (["pooled", "time_ids"] if sdxl else [])
        return names + lora_names, (latents, timestep, text, target.to(device, dtype), *sdxl, *lora)

    masks = torch.rand(batch, subjects, h // 2, w // 2, generator=generator).to(device, dtype)
    names = ["latents", "timestep", "text", "masks"] + (["pooled", "time_ids"] if sdxl else [])
    image_tokens = rand(batch, subjects, num_tokens, token_dim)
    if spec.variant == "tokens":
        return [*names, "image_tokens", *lora_names], (
            latents,
            timestep,
            text,
            masks,
            *sdxl,
            image_tokens,
            *lora,
        )
    kv_names, kv = [], []
    for layer, (key, value) in enumerate(unet.image_key_values(image_tokens)):
        kv_names += [f"image_k_{layer:02d}", f"image_v_{layer:02d}"]
        kv += [key.contiguous(), value.contiguous()]
    return names + kv_names + lora_names, (latents, timestep, text, masks, *sdxl, *kv, *lora)


def graph_module(pipeline: RealCustomPipeline, spec: GraphSpec) -> tuple[nn.Module, list[str]]:
    bucket = spec.bucket
    if spec.graph == "projector":
        return ProjectorGraph(pipeline.projector), ["image_tokens"]
    if spec.graph == "guidance":
        _, h, w = pipeline.latent_shape(bucket.height, bucket.width)
        graph, outputs = GuidanceGraph(pipeline.unet, (h // 2, w // 2)), ["layer_maps"]
    elif spec.graph == "generation":
        graph, outputs = GenerationGraph(pipeline.unet, pipeline.unet.is_sdxl, spec.variant), ["eps"]
    else:
        raise ValueError(f"unknown graph {spec.graph!r}; choose from {GRAPHS}")
    bank = pipeline.unet.adapters
    return (graph if bank is None else AdapterInputs(graph, bank)), outputs


@contextlib.contextmanager
def _exportable_attention(pipeline: RealCustomPipeline):
    """Masks resized with size= while this pipeline's UNet is traced (a setting of its own attention
    state, restored after: nothing module-wide changes)."""
    state = pipeline.unet.attention_state
    previous, state.resize_by_size = state.resize_by_size, True
    try:
        yield
    finally:
        state.resize_by_size = previous


def _weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Save `model` as `path` plus one `<stem>.data` file holding every tensor over 1 KiB."""
    data_name = f"{path.stem}.data"
    (path.parent / data_name).unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )


@torch.no_grad()
def export_graph(
    pipeline: RealCustomPipeline,
    spec: GraphSpec,
    path: Path,
    external_data: bool | None = None,
    opset: int = OPSET,
) -> Path:
    """Export one graph (in fp32) to `path`. external_data: None = only when the weights exceed 2 GB."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pipeline = fp32_pipeline(pipeline)
    module, output_names = graph_module(pipeline, spec)
    input_names, inputs = example_inputs(pipeline, spec)
    large = _weight_bytes(module) >= PROTOBUF_LIMIT
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        raw = Path(scratch) / path.name
        with warnings.catch_warnings(), _exportable_attention(pipeline):
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
            torch.onnx.export(
                module.eval(),
                inputs,
                str(raw),
                dynamo=False,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                do_constant_folding=True,
            )
        if external_data or (external_data is None and large):
            # The exporter may scatter external tensors over many files: gather them into one.
            save_with_external_data(onnx.load(str(raw), load_external_data=True), path)
        else:
            shutil.move(str(raw), path)
    logger.info("exported %s -> %s", spec.stem, path)
    return path


def fp32_pipeline(pipeline: RealCustomPipeline) -> RealCustomPipeline:
    """The pipeline itself when it is fp32, else an fp32 copy (what every graph is exported from)."""
    if pipeline.dtype == torch.float32:
        return pipeline
    return copy.deepcopy(pipeline).float()


def export_key(
    pipeline: RealCustomPipeline, model_id: str, specs: list[GraphSpec], opset: int = OPSET
) -> str:
    """Directory key of one export: model identity, dtype, graph specs, opset, torch version."""
    material = json.dumps(
        {
            "model": model_id,
            "unet": dict(pipeline.unet.unet.config),
            "dtype": str(torch.float32),  # graphs are always fp32 (fp32_pipeline)
            "graphs": [asdict(s) for s in specs],
            "adapters": _bank_layout(pipeline.unet.adapters),
            "opset": opset,
            "torch": torch.__version__,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _bank_layout(bank) -> dict | None:
    """What an adapter bank changes in the graphs' inputs (not which adapters it holds)."""
    if bank is None:
        return None
    return {"layers": list(bank.layers), "slots": len(bank.slots), "rank": bank.rank, "per_row": bank.per_row}


def graph_specs(buckets: list[Bucket], variant: str = "kv") -> list[GraphSpec]:
    """Projector (per distinct batch of reference images: one per bucket batch) + both UNet roles."""
    specs = []
    for bucket in buckets:
        specs += [
            GraphSpec("projector", Bucket(bucket.batch, bucket.height, bucket.width, 1)),
            GraphSpec("guidance", bucket),
            GraphSpec("generation", bucket, variant),
        ]
    return list(dict.fromkeys(specs))


def export_all(
    pipeline: RealCustomPipeline,
    model_id: str,
    buckets: list[Bucket],
    root: Path,
    variant: str = "kv",
    external_data: bool | None = None,
) -> Path:
    """Export every graph of every bucket into <root>/<export key>/ with a manifest; reuses a
    complete earlier export of the same key. Returns the export directory."""
    specs = graph_specs(buckets, variant)
    directory = Path(root) / export_key(pipeline, model_id, specs)
    manifest_path = directory / "manifest.json"
    if manifest_path.is_file():
        logger.info("ONNX export %s already complete", directory)
        return directory
    pipeline = fp32_pipeline(pipeline)
    entries = []
    for spec in specs:
        path = export_graph(pipeline, spec, directory / f"{spec.stem}.onnx", external_data)
        input_names, inputs = example_inputs(pipeline, spec)
        entries.append(
            {
                **asdict(spec),
                "stem": spec.stem,
                "file": path.name,
                "inputs": {name: list(t.shape) for name, t in zip(input_names, inputs, strict=True)},
            }
        )
    manifest = {"model": model_id, "dtype": str(pipeline.dtype), "opset": OPSET, "graphs": entries}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return directory
