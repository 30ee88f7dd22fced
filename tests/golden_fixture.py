"""Loading the golden fixture (tensors from the official code on tiny random weights).

Every constant the golden tests use comes from the fixture directory: `manifest.json` (size, N,
prompt, seeds, attn2 layer table, case settings, tensor names and shapes), the tensors themselves,
`unet_config.json` / `projector_config.json`, and the tolerance table of its README (§8), the one
place the harness states tolerances. `REALCUSTOM_GOLDEN_DIR` selects another fixture made by the
same harness. Loading checks the files against the manifest, so a test never compares against a
tensor, setting or layer that the manifest does not announce.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from realcustom.loading import split_realcustom_state_dict
from realcustom.projector import ProjectorConfig
from realcustom.unet import RealCustomUNet

DEFAULT_GOLDEN_DIR = Path(__file__).resolve().parent / "fixtures" / "golden" / "realcustom_tiny_sdxl"

# README §8 names two groups in words; these are the tensor names they stand for.
_TOLERANCE_GROUPS_IN_WORDS = {"projector tokens": "projector.tokens_*", "attn2 outputs": "attn2.*.out_*"}
_TOLERANCE_TABLE_TITLE = "Recommended absolute tolerances"
_RAW_MAP = re.compile(r"rawmap_step(\d+)_L(\d+)")


def golden_dir() -> Path:
    path = Path(os.environ.get("REALCUSTOM_GOLDEN_DIR", DEFAULT_GOLDEN_DIR))
    assert (path / "manifest.json").is_file(), (
        f"golden fixture not found at {path} (set REALCUSTOM_GOLDEN_DIR)"
    )
    return path


@dataclass(frozen=True)
class GoldenCase:
    """One `expected_<name>` loop run, as the manifest describes it."""

    name: str
    scheduler: str
    steps: int
    guidance_scale: float
    mask_strategy: tuple[str, ...]
    mask_scope: float
    mask_reused_step: int
    raw_map_layers: frozenset[int]  # layers whose full text-attention probabilities were saved
    tensors: dict[str, tuple[int, ...]]  # every expected tensor: name -> shape

    @classmethod
    def from_manifest(cls, key: str, entry: dict) -> GoldenCase:
        entry = dict(entry)
        tensors = {name: tuple(shape) for name, shape in entry.pop("tensors").items()}
        raw_map_layers = frozenset(entry.pop("save_raw_maps", ()))
        fields = {"name", "scheduler", "steps", "guidance_scale", "mask_strategy", "mask_scope"}
        fields.add("mask_reused_step")
        unknown = set(entry) - fields
        assert not unknown, f"case {key!r}: settings {sorted(unknown)} are not applied by the golden tests"
        assert entry["name"] == key, f"case {key!r} is named {entry['name']!r} inside the manifest"
        saved = {int(match[2]) for name in tensors if (match := _RAW_MAP.fullmatch(name))}
        assert saved == raw_map_layers, (
            f"case {key!r}: raw maps of layers {saved}, save_raw_maps {raw_map_layers}"
        )
        return cls(
            name=key,
            scheduler=entry["scheduler"],
            steps=entry["steps"],
            guidance_scale=entry["guidance_scale"],
            mask_strategy=tuple(entry["mask_strategy"]),
            mask_scope=entry["mask_scope"],
            mask_reused_step=entry["mask_reused_step"],
            raw_map_layers=raw_map_layers,
            tensors=tensors,
        )

    def settings(self) -> dict:
        """The settings as the case file's metadata states them."""
        settings = {
            "name": self.name,
            "scheduler": self.scheduler,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "mask_strategy": list(self.mask_strategy),
            "mask_scope": self.mask_scope,
            "mask_reused_step": self.mask_reused_step,
        }
        if self.raw_map_layers:
            settings["save_raw_maps"] = sorted(self.raw_map_layers)
        return settings


@dataclass
class GoldenModel:
    unet: RealCustomUNet
    projector: torch.nn.Module


def parse_tolerances(readme: str) -> list[tuple[str, float]]:
    """(tensor-name pattern, atol) rows of README §8's table; "exact" is 0."""
    lines = readme.splitlines()
    starts = [i for i, line in enumerate(lines) if _TOLERANCE_TABLE_TITLE in line]
    assert starts, f"the fixture's README has no {_TOLERANCE_TABLE_TITLE!r} table"
    rows = []
    for line in lines[starts[0] + 1 :]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        names, value = (cell.strip() for cell in line.strip("|").split("|"))
        if value == "atol" or set(value) <= set("-: "):
            continue  # header and separator
        number = re.match(r"exact|[0-9.]+(e-?[0-9]+)?", value)
        assert number, f"README tolerance {value!r} for {names!r} is not a number"
        atol = 0.0 if number[0] == "exact" else float(number[0])
        for item in (item.strip() for item in names.split(",")):
            pattern = item.strip("`") if item.startswith("`") else _TOLERANCE_GROUPS_IN_WORDS.get(item)
            assert pattern, f"README tolerance row names {item!r}, which matches no tensor name"
            rows.append((pattern, atol))
    assert rows, f"the fixture's README {_TOLERANCE_TABLE_TITLE!r} table is empty"
    return rows


class GoldenFixture:
    """One fixture directory, read through its manifest."""

    def __init__(self, root: Path):
        self.root = root
        self.manifest = json.loads((root / "manifest.json").read_text())
        self.n: int = self.manifest["n"]
        self.height: int = self.manifest["height"]
        self.width: int = self.manifest["width"]
        self.prompt: str = self.manifest["prompt"]
        self.target_phrase: str = self.manifest["target_phrase"]
        self.seeds: dict[str, int] = self.manifest["seeds"]
        self.layers: list[dict] = sorted(
            self.manifest["attn2_layers"], key=lambda row: row["cross_attention_id"]
        )
        ids = [row["cross_attention_id"] for row in self.layers]
        assert ids == list(range(len(ids))), f"attn2 layer ids {ids} are not 0..{len(ids) - 1}"
        self.cases = {
            key: GoldenCase.from_manifest(key, entry) for key, entry in self.manifest["cases"].items()
        }
        self.standalone_shapes = {name: tuple(shape) for name, shape in self.manifest["standalone"].items()}
        self.standalone_variants: dict[str, dict] = self.manifest["standalone_variants"]
        self.tolerances = parse_tolerances((root / "README.md").read_text())

    def atol(self, name: str) -> float:
        """README §8 tolerance of a tensor, by its full name or else its last dotted part."""
        for candidate in (name, name.rsplit(".", 1)[-1]):
            values = {atol for pattern, atol in self.tolerances if fnmatch.fnmatchcase(candidate, pattern)}
            assert len(values) <= 1, f"README gives {name!r} several tolerances {sorted(values)}"
            if values:
                return values.pop()
        raise AssertionError(f"the fixture's README states no tolerance for {name!r}")

    def _load_checked(self, stem: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        tensors = load_file(str(self.root / f"{stem}.safetensors"))
        found = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
        assert found == shapes, (
            f"{stem}.safetensors disagrees with manifest.json: only in the file "
            f"{sorted(set(found) - set(shapes))}, only in the manifest {sorted(set(shapes) - set(found))}, "
            f"other shape {sorted(name for name in set(found) & set(shapes) if found[name] != shapes[name])}"
        )
        return tensors

    def metadata(self, stem: str) -> dict[str, str]:
        with safe_open(str(self.root / f"{stem}.safetensors"), "pt") as handle:
            return handle.metadata() or {}

    def expected(self, case: str) -> dict[str, torch.Tensor]:
        stem = f"expected_{case}"
        stated = json.loads(self.metadata(stem)["case"])
        assert stated == self.cases[case].settings(), f"{stem} metadata {stated} disagrees with manifest.json"
        return self._load_checked(stem, self.cases[case].tensors)

    @cached_property
    def inputs(self) -> dict[str, torch.Tensor]:
        stated = self.metadata("inputs")
        manifest = {
            "prompt": self.prompt,
            "target_phrase": self.target_phrase,
            "seed": str(self.seeds["noise"]),
        }
        assert stated == manifest, f"inputs metadata {stated} disagrees with manifest.json {manifest}"
        tensors = load_file(str(self.root / "inputs.safetensors"))
        assert tensors["latents_init"].shape[0] == self.n, "latents_init rows differ from the manifest's n"
        return tensors

    @cached_property
    def standalone(self) -> dict[str, torch.Tensor]:
        stated = json.loads(self.metadata("standalone")["variants"])
        assert stated == self.standalone_variants, "standalone metadata disagrees with manifest.json"
        return self._load_checked("standalone", self.standalone_shapes)

    def standalone_names(self, pattern: str) -> list[str]:
        """Standalone tensor names matching a regular expression, in manifest order."""
        return [name for name in self.standalone_shapes if re.fullmatch(pattern, name)]

    @cached_property
    def model(self) -> GoldenModel:
        """UNet and projector from the fixture's configs and weights, checked against the layer table."""
        config = json.loads((self.root / "unet_config.json").read_text())
        config.pop("image_prompt_settings")
        projector_params = json.loads((self.root / "projector_config.json").read_text())["params"]
        projector_config = ProjectorConfig(
            projector_params["vision_dim"], projector_params["out_dim"], projector_params["dim_head"]
        )
        unet = RealCustomUNet(UNet2DConditionModel.from_config(config), projector_config.out_dim)
        weights = load_file(str(self.root / "weights.safetensors"))
        assert len(weights) == self.manifest["num_state_dict_keys"], "weights.safetensors key count"
        vision, projector_weights = split_realcustom_state_dict(weights)
        unet.unet.load_state_dict(vision, strict=True)
        projector = projector_config.build()
        projector.load_state_dict(projector_weights, strict=True)
        assert unet.num_layers == len(self.layers), (
            f"manifest.json lists {len(self.layers)} attn2 layers; "
            f"the UNet built from unet_config.json has {unet.num_layers}"
        )
        for row in self.layers:
            module = unet.unet.get_submodule(row["module"])
            assert module is unet.cross_attention_layers[row["cross_attention_id"]], (
                f"attn2 layer {row['cross_attention_id']} is {row['module']} in the manifest, "
                "another module in our layer order"
            )
        return GoldenModel(unet.eval(), projector.eval())


@cache
def golden() -> GoldenFixture:
    return GoldenFixture(golden_dir())
