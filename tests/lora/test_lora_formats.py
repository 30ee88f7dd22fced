"""Adapters from safetensors files in every layout -> one canonical form, checked against the UNet.

Each layout's file is loaded twice: by our loader and by diffusers' own `load_lora_weights` +
`fuse_lora`; every targeted layer's weight delta must agree (so key mapping, alpha handling and
conv layouts agree with diffusers). Then every way a file can be wrong gives a clear error.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from lora_helpers import ATTENTION_TARGETS, TARGETS, diffusers_fused, random_lora, save_kohya, save_peft
from safetensors.torch import save_file

from realcustom.lora.adapter import LoRAAdapter, LoRAError, LoRAModule, check_adapter
from realcustom.lora.files import load_adapter, resolve_source
from realcustom.lora.formats import _sgm_names, parse_state_dict
from realcustom.models import SPECS, build_pipeline


@pytest.fixture(scope="module")
def unet():
    return build_pipeline(SPECS["tiny"]).unet.requires_grad_(False)


def fused_deltas(unet, source, scale: float = 1.0) -> dict[str, torch.Tensor]:
    fused = dict(diffusers_fused(unet, source, scale).unet.named_modules())
    base = dict(unet.unet.named_modules())
    deltas = {}
    for name, layer in base.items():
        if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
            other = fused[name]
            weight = other.base_layer.weight if hasattr(other, "base_layer") else other.weight
            deltas[name] = weight.detach() - layer.weight
    return deltas


def assert_matches_diffusers(adapter: LoRAAdapter, unet, source, targets) -> None:
    assert sorted(adapter.modules) == sorted(targets)
    for name, delta in fused_deltas(unet, source).items():
        if name in adapter.modules:
            ours = adapter.modules[name].delta()
            assert float(ours.abs().max()) > 1e-3, f"{name}: the random adapter should change the layer"
            torch.testing.assert_close(ours, delta, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert float(delta.abs().max()) == 0, (
                f"diffusers changed {name}, which the adapter does not target"
            )


def test_peft_layout_written_by_diffusers(unet, tmp_path):
    lora = random_lora(unet, seed=1, rank=4)
    path = save_peft(tmp_path, lora, alpha=8)  # scale alpha / r = 2, read from the file's metadata
    adapter = load_adapter(path, unet.unet, name="style")
    assert (adapter.name, adapter.layout, adapter.rank) == ("style", "peft", 4)
    assert {module.scale for module in adapter.modules.values()} == {2.0}
    assert_matches_diffusers(adapter, unet, path, TARGETS)


@pytest.mark.parametrize("sgm", [False, True], ids=["diffusers-names", "sgm-names"])
def test_kohya_layout(unet, tmp_path, sgm):
    # diffusers' kohya conversion drops `add_embedding` under diffusers names (its SDXL "emb" rule
    # strips the layer index): compared on what it maps.
    targets = TARGETS if sgm else tuple(name for name in TARGETS if "add_embedding" not in name)
    lora = random_lora(unet, seed=2, rank=8, targets=targets)
    path = save_kohya(tmp_path / "kohya.safetensors", lora, alpha=4, unet=unet, sgm=sgm)
    adapter = load_adapter(path, unet.unet)
    assert (adapter.name, adapter.layout) == ("kohya", "kohya")
    assert {module.scale for module in adapter.modules.values()} == {0.5}
    assert_matches_diffusers(adapter, unet, path, targets)


def test_kohya_sgm_resnet_and_embedding_names(unet, tmp_path):
    """SDXL kohya files name resnet layers as the original UNet did: pinned by hand for the tiny UNet
    (one resnet per down block, two per up block), independently of diffusers' mapping."""
    sgm = _sgm_names(unet.unet)
    assert sgm["down_blocks.0.resnets.0.conv1"] == "input_blocks.1.0.in_layers.2"
    assert sgm["down_blocks.1.resnets.0.conv_shortcut"] == "input_blocks.3.0.skip_connection"
    assert sgm["down_blocks.1.downsamplers.0.conv"] == "input_blocks.4.0.op"
    assert sgm["mid_block.resnets.1.conv2"] == "middle_block.2.out_layers.3"
    assert sgm["up_blocks.0.upsamplers.0.conv"] == "output_blocks.1.2.conv"
    assert sgm["up_blocks.2.resnets.1.time_emb_proj"] == "output_blocks.5.0.emb_layers.1"
    assert sgm["add_embedding.linear_2"] == "label_emb.0.2"
    lora = random_lora(unet, seed=3, rank=4, targets=TARGETS)
    path = save_kohya(tmp_path / "sgm.safetensors", lora, alpha=4, unet=unet, sgm=True)
    adapter = load_adapter(path, unet.unet)
    assert sorted(adapter.modules) == sorted(TARGETS)
    for name, (down, up) in lora.items():
        torch.testing.assert_close(adapter.modules[name].down, down, rtol=0, atol=0)
        torch.testing.assert_close(adapter.modules[name].up, up, rtol=0, atol=0)


def test_legacy_diffusers_layouts(unet):
    """`<module>.lora.down/up.weight` and the attention-processor form map to the same modules."""
    lora = random_lora(unet, seed=4, rank=2, targets=ATTENTION_TARGETS[:2])
    (q_name, (q_down, q_up)), (out_name, (out_down, out_up)) = lora.items()
    attn = q_name.removesuffix(".to_q")
    state = {
        f"unet.{attn}.processor.to_q_lora.down.weight": q_down,
        f"unet.{attn}.processor.to_q_lora.up.weight": q_up,
        f"unet.{out_name}.lora.down.weight": out_down,
        f"unet.{out_name}.lora.up.weight": out_up,
        f"unet.{out_name}.alpha": torch.tensor(1.0),
    }
    adapter = parse_state_dict(state, unet.unet, name="legacy")
    assert adapter.layout == "diffusers-legacy"
    assert adapter.modules[q_name].scale == 1.0 and adapter.modules[out_name].scale == 0.5
    torch.testing.assert_close(adapter.modules[q_name].down, q_down, rtol=0, atol=0)


def test_peft_alpha_pattern_and_rank_stabilised_scale(unet):
    lora = random_lora(unet, seed=5, rank=4, targets=ATTENTION_TARGETS[:2])
    state = {f"unet.{n}.lora_{p}.weight": t for n, (a, b) in lora.items() for p, t in (("A", a), ("B", b))}
    first, second = ATTENTION_TARGETS[:2]
    metadata = {"unet.lora_alpha": 8, "unet.alpha_pattern": {second: 2}, "unet.use_rslora": True}
    adapter = parse_state_dict(
        state, unet.unet, name="rs", metadata={"lora_adapter_metadata": json.dumps(metadata)}
    )
    assert adapter.modules[first].scale == pytest.approx(8 / 2)  # alpha / √r
    assert adapter.modules[second].scale == pytest.approx(2 / 2)
    without = parse_state_dict(state, unet.unet, name="plain")  # no metadata: alpha = r, as diffusers
    assert {module.scale for module in without.modules.values()} == {1.0}


def test_text_encoder_weights_are_refused_or_skipped(unet):
    lora = random_lora(unet, seed=6, rank=2, targets=ATTENTION_TARGETS[:1])
    ((name, (down, up)),) = lora.items()
    stem = "lora_unet_" + name.replace(".", "_")
    state = {
        f"{stem}.lora_down.weight": down,
        f"{stem}.lora_up.weight": up,
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 16),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(32, 2),
    }
    with pytest.raises(LoRAError, match=r"2 text-encoder weights .* text_encoder='skip'"):
        parse_state_dict(state, unet.unet, name="te")
    adapter = parse_state_dict(state, unet.unet, name="te", text_encoder="skip")
    assert list(adapter.modules) == [name] and adapter.skipped == {"text_encoder": 2}


BAD_FILES = {
    "unknown layer": ({"lora_unet_down_blocks_9_x.lora_down.weight": (2, 4)}, "names no Linear/Conv2d layer"),
    "LoHa": ({"lora_unet_conv_in.hada_w1_a": (2, 4)}, "LoHa"),
    "DoRA": ({"unet.conv_in.lora_A.weight": (2, 4, 3, 3), "unet.conv_in.dora_scale": (1,)}, "DoRA"),
    "no LoRA at all": ({"model.weight": (2, 2)}, "no LoRA weights in a known layout"),
    "mixed layouts": (
        {"unet.conv_in.lora_A.weight": (2, 4, 3, 3), "lora_unet_conv_in.lora_down.weight": (2, 4, 3, 3)},
        "mixes LoRA layouts",
    ),
    "missing up": ({"unet.conv_in.lora_A.weight": (2, 4, 3, 3)}, r"conv_in has no up \(B\) weight"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_state_dicts_name_the_problem(unet, case):
    shapes, message = BAD_FILES[case]
    state = {key: torch.zeros(shape) for key, shape in shapes.items()}
    with pytest.raises(LoRAError, match=message):
        parse_state_dict(state, unet.unet, name="bad", source="bad.safetensors")


def module(down_shape, up_shape, dtype=torch.float32, value=0.1):
    return LoRAModule(
        torch.full(down_shape, value, dtype=dtype), torch.full(up_shape, value, dtype=dtype), 1.0
    )


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        (module((2, 99), (32, 2)), r"do not fit the layer \(expected A \(2, 32\)"),  # another base model
        (module((2, 32), (32, 3)), "A has rank 2 but B"),
        (LoRAModule(torch.zeros(2, 32, dtype=torch.int32), torch.zeros(32, 2), 1.0), "int32"),
        (module((2, 32), (32, 2), value=float("nan")), "NaN or infinite"),
        (module((8, 32), (32, 8)), "rank 8, above the largest served rank 4"),
    ],
)
def test_adapters_that_do_not_fit_the_unet_are_refused(unet, lora, message):
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    with pytest.raises(LoRAError, match=message):
        check_adapter(LoRAAdapter("bad", {name: lora}), unet.unet, max_rank=4)


def test_sources_are_safetensors_files_names_or_hub_ids(unet, tmp_path, monkeypatch):
    lora = random_lora(unet, seed=7, rank=2, targets=ATTENTION_TARGETS[:1])
    save_kohya(tmp_path / "watercolor.safetensors", lora, alpha=2, unet=unet, sgm=False)
    assert load_adapter("watercolor", unet.unet, lora_dir=tmp_path).name == "watercolor"
    (tmp_path / "pickled.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(LoRAError, match="safetensors files only"):
        resolve_source(str(tmp_path / "pickled.bin"))
    with pytest.raises(LoRAError, match="not downloaded from URLs"):
        resolve_source("https://example.com/a.safetensors")
    with pytest.raises(LoRAError, match="no adapter 'nothing-here'"):
        resolve_source("nothing-here", tmp_path)
    (tmp_path / "damaged.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoRAError, match="not a readable safetensors file"):
        load_adapter(tmp_path / "damaged.safetensors", unet.unet)
    # A hub id, served from the local hub cache (offline: nothing here reaches the network).
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--styles" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(snapshot / "ignored.safetensors"))
    (snapshot / "style.safetensors").write_bytes((tmp_path / "watercolor.safetensors").read_bytes())
    (cache / "models--someone--styles" / "refs").mkdir()
    (cache / "models--someone--styles" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    adapter = load_adapter("someone/styles/style.safetensors", unet.unet)
    assert adapter.name == "style" and adapter.source == str(snapshot / "style.safetensors")
    with pytest.raises(LoRAError, match=r"could not fetch adapter 'someone/missing/x\.safetensors'"):
        load_adapter("someone/missing/x.safetensors", unet.unet)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
