"""Per-row LoRA against fused weights: what serving adapters per row costs in one UNet forward.

A fused adapter (diffusers' `fuse_lora`) changes weights, not work: its forward costs exactly the
plain UNet's. Per-row LoRA (realcustom/lora) adds, on every targeted layer, a gather of each row's
slots and two batched matmuls over R ranks. This measures, for each (rows, rank):

* `fused_ms`: the forward with the bank installed but no adapters in the call (each hook returns
  at once: the cost of fused weights, plus one Python call per targeted layer);
* `lora_ms`: the same forward with every row using an adapter of rank R on the `--targets`
  layers (K = 1 position per row);
* `ratio` = lora_ms / fused_ms, and `flop_ratio`: the LoRA FLOPs over the plain forward's,
  counted on the meta device (exact, device-independent; independent of rows);
* `plain_ms`: the forward before any bank was installed (a check that `fused_ms` is the plain cost).

The two forwards of a (rows, rank) pair alternate, `--runs` times each after one warm-up, and their
medians are compared, so drift on a shared machine hits both alike. Eager execution (no compile, no
CUDA graph: on a GPU the launches of the extra small kernels count in; a captured step hides them),
random weights (the work does not depend on the values). CPU numbers are ratios from one run on a
shared machine, as all of this project's CPU numbers.

    python benchmarks/lora_bench.py                    # CPU: sd15-random at 256², rows 1,2 x ranks 16,64
    python benchmarks/lora_bench.py --device cuda --dtype bf16 --model sdxl --size 1024 \\
        --rows 1,2,4,8 --ranks 8,32,64,128         # what the device kit measures (tools/device_check.sh)

Writes lora-bench.{json,md} to --out (benchmarks/results by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from realcustom.lora.adapter import LoRAAdapter, LoRAModule
from realcustom.lora.bank import AdapterBank
from realcustom.models import SPECS, build_pipeline
from realcustom.unet import RealCustomUNet

RESULTS = Path(__file__).resolve().parent / "results"


def random_adapter(bank: AdapterBank, rank: int, device, dtype) -> LoRAAdapter:
    """An adapter of rank `rank` on every layer the bank serves (values do not change the work)."""
    modules = {}
    for name, layer in bank.layers.items():
        down_shape = layer.lora_down.shape[2:]
        out = layer.lora_up.shape[-1]
        up_shape = (out, rank, 1, 1) if len(down_shape) == 3 else (out, rank)
        down = torch.randn(rank, *down_shape, device=device, dtype=dtype) * 0.01
        modules[name] = LoRAModule(down, torch.randn(up_shape, device=device, dtype=dtype) * 0.01, 1.0)
    return LoRAAdapter("bench", modules)


def inputs(unet: RealCustomUNet, rows: int, size: int, device, dtype) -> tuple:
    config = unet.unet.config
    latent = size // 8
    latents = torch.randn(rows, config.in_channels, latent, latent, device=device, dtype=dtype)
    timestep = torch.full((rows,), 500, device=device)
    text = torch.randn(rows, 77, config.cross_attention_dim, device=device, dtype=dtype)
    added = None
    if unet.is_sdxl:
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=device, dtype=dtype)
        added = {
            "text_embeds": torch.randn(rows, pooled, device=device, dtype=dtype),
            "time_ids": time_ids.expand(rows, -1),
        }
    return latents, timestep, text, added


def _once(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1e3


def timed(functions: list, runs: int, device) -> list[float]:
    """Median milliseconds of each function, called in turn `runs` times after one warm-up each."""
    for fn in functions:
        fn()
    times = [[] for _ in functions]
    for _ in range(runs):
        for fn, samples in zip(functions, times, strict=True):
            samples.append(_once(fn, device))
    return [statistics.median(samples) for samples in times]


def forward(unet: RealCustomUNet, args: tuple, adapters=None):
    latents, timestep, text, added = args
    with torch.no_grad():
        if adapters is None:
            return unet.unet(latents, timestep, encoder_hidden_states=text, added_cond_kwargs=added)
        with unet.adapters.selection.selected(*adapters):
            return unet.unet(latents, timestep, encoder_hidden_states=text, added_cond_kwargs=added)


def flop_ratio(model: str, size: int, rank: int, targets: str) -> tuple[int, int]:
    """(plain forward FLOPs, LoRA FLOPs) of one row, counted on the meta device."""
    with torch.device("meta"):
        unet = build_pipeline(SPECS[model]).unet
    args = inputs(unet, 1, size, torch.device("meta"), torch.float32)
    with FlopCounterMode(display=False) as counter:
        forward(unet, args)
    plain = counter.get_total_flops()
    AdapterBank(unet, targets=targets, slots=1, rank=rank, per_row=1)
    rows = (torch.zeros(1, 1, dtype=torch.int64, device="meta"), torch.ones(1, 1, device="meta"))
    with FlopCounterMode(display=False) as counter:
        forward(unet, args, rows)
    return plain, counter.get_total_flops() - plain


def run(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    unet = build_pipeline(SPECS[args.model]).unet.to(device, dtype).requires_grad_(False)
    rows_list = [int(r) for r in args.rows.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    batches = {rows: inputs(unet, rows, args.size, device, dtype) for rows in rows_list}
    plain = {
        rows: timed([lambda b=batch: forward(unet, b)], args.runs, device)[0]
        for rows, batch in batches.items()
    }
    results = []
    for rank in ranks:
        plain_flops, lora_flops = flop_ratio(args.model, args.size, rank, args.targets)
        bank = AdapterBank(unet, targets=args.targets, slots=2, rank=rank, per_row=1)
        bank.load(random_adapter(bank, rank, device, dtype))
        for rows, batch in batches.items():
            selection = bank.rows([[]] * rows)
            selection[1].fill_(1.0)  # every row uses the adapter in slot 0
            fused, lora = timed(
                [lambda b=batch: forward(unet, b), lambda b=batch, s=selection: forward(unet, b, s)],
                args.runs,
                device,
            )
            results.append(
                {
                    "rows": rows,
                    "rank": rank,
                    "plain_ms": plain[rows],
                    "fused_ms": fused,
                    "lora_ms": lora,
                    "ratio": lora / fused,
                    "flop_ratio": lora_flops / plain_flops,
                    "layers": len(bank.layers),
                }
            )
            print(json.dumps(results[-1]), flush=True)
        bank.detach()
    return {
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "results": results,
    }


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"### {s['model']} {s['size']}², {s['dtype']}, {report['device']}, targets `{s['targets']}` "
        f"({report['results'][0]['layers']} layers), median of {s['runs']}",
        "",
        "| rows | rank | fused weights ms | per-row LoRA ms | ratio | LoRA FLOPs / plain | no bank ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['rows']} | {r['rank']} | {r['fused_ms']:.1f} | {r['lora_ms']:.1f} | {r['ratio']:.3f} | "
            f"{r['flop_ratio']:.3f} | {r['plain_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", choices=sorted(SPECS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--rows", default="1,2", help="rows per forward (comma-separated)")
    parser.add_argument("--ranks", default="16,64", help="bank ranks (comma-separated)")
    parser.add_argument("--targets", default="transformer", choices=("attention", "transformer", "all"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    table = markdown(report)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora-bench.json").write_text(json.dumps(report, indent=2) + "\n")
    command = "python benchmarks/lora_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "lora-bench.md").write_text(
        f"# Per-row LoRA vs fused weights\n\n`{command.strip()}`\n\n{table}"
    )
    return report


if __name__ == "__main__":
    main()
