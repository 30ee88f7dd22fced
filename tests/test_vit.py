"""realcustom.vit against outputs recorded from real timm (tools/make_vit_fixture.py)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from realcustom.vit import (
    DINOV2_L_REG4_384,
    DINOV2_TINY,
    SIGLIP_SO400M_384,
    SIGLIP_TINY,
    VisionTransformer,
    ViTConfig,
    convert_timm_state_dict,
    load_timm_state_dict,
    resample_pos_embed,
)

FIXTURE = Path(__file__).parent / "fixtures" / "vit_timm_tiny.safetensors"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def fixture() -> dict[str, torch.Tensor]:
    # Missing fixture is a failure, not a skip: these tests are the only check against timm.
    assert FIXTURE.is_file(), f"{FIXTURE} is missing; regenerate it with tools/make_vit_fixture.py"
    return load_file(str(FIXTURE))


def entries(fixture: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in fixture.items() if key.startswith(prefix)}


def timm_outputs(fixture: dict[str, torch.Tensor], label: str, depth: int) -> list[torch.Tensor]:
    return [fixture[f"{label}_out.{index}"] for index in range(depth)]


def meta_checkpoint(fixture: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    timm_layout = entries(fixture, "dino.")
    shared = {k: v for k, v in timm_layout.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    return shared | entries(fixture, "dino_meta.")


def max_difference(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    assert [o.shape for o in ours] == [t.shape for t in theirs]
    return max((o - t).abs().max().item() for o, t in zip(ours, theirs, strict=True))


def run_all_blocks(model: VisionTransformer, pixels: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.block_outputs(pixels, range(model.config.depth))


@pytest.mark.parametrize(
    ("label", "config", "checkpoint"),
    [
        ("siglip", SIGLIP_TINY, lambda f: entries(f, "siglip.")),  # open_clip layout
        ("dino", DINOV2_TINY, lambda f: entries(f, "dino.")),  # timm layout, 5x5 -> 4x4 grid
        ("dino_meta", DINOV2_TINY, meta_checkpoint),  # Meta layout, 5x5 -> 4x4 grid
    ],
)
def test_block_outputs_match_timm(fixture, label, config, checkpoint):
    model = VisionTransformer(config).eval()
    load_timm_state_dict(model, checkpoint(fixture))
    ours = run_all_blocks(model, fixture["input"])
    assert max_difference(ours, timm_outputs(fixture, label, config.depth)) <= TOLERANCE


def test_loads_checkpoint_files(fixture, tmp_path):
    bin_file = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(entries(fixture, "siglip."), bin_file)
    safetensors_file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in entries(fixture, "dino.").items()}, str(safetensors_file))
    for config, path, label in ((SIGLIP_TINY, bin_file, "siglip"), (DINOV2_TINY, safetensors_file, "dino")):
        model = VisionTransformer(config).eval()
        load_timm_state_dict(model, path)
        ours = run_all_blocks(model, fixture["input"])
        assert max_difference(ours, timm_outputs(fixture, label, config.depth)) <= TOLERANCE


def test_selected_blocks_come_in_requested_order(fixture):
    model = VisionTransformer(DINOV2_TINY).eval()
    load_timm_state_dict(model, entries(fixture, "dino."))
    with torch.no_grad():
        deep, shallow = model.block_outputs(fixture["input"], [-2, 0])
    assert deep.shape == (2, DINOV2_TINY.num_patches, DINOV2_TINY.embed_dim)
    torch.testing.assert_close(deep, fixture["dino_out.2"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(shallow, fixture["dino_out.0"], atol=TOLERANCE, rtol=0)


def test_pos_embed_resampling_matches_timm(fixture):
    # timm resampled the 5x5 checkpoint grid to the model's 4x4 one (bicubic, anti-aliased).
    converted = convert_timm_state_dict(entries(fixture, "dino."), DINOV2_TINY)
    torch.testing.assert_close(
        converted["pos_embed"], fixture["dino_resampled_pos_embed"], atol=TOLERANCE, rtol=0
    )
    assert resample_pos_embed(converted["pos_embed"], 4) is converted["pos_embed"]


def test_rejects_foreign_checkpoint(fixture):
    model = VisionTransformer(SIGLIP_TINY)
    with pytest.raises(RuntimeError, match=r"size mismatch|Unexpected key"):
        load_timm_state_dict(model, entries(fixture, "dino."))


def test_unused_heads_are_dropped(fixture):
    converted = convert_timm_state_dict(entries(fixture, "siglip."), SIGLIP_TINY)
    assert not any(key.startswith(("attn_pool.", "norm.", "text.", "logit")) for key in converted)
    assert set(converted) == set(VisionTransformer(SIGLIP_TINY).state_dict())


@pytest.mark.parametrize(
    ("config", "parameters", "tokens"),
    [(SIGLIP_SO400M_384, 412_984_944, 729), (DINOV2_L_REG4_384, 303_713_280, 729)],
)
def test_real_configs(config: ViTConfig, parameters: int, tokens: int):
    # Built on the meta device: the shapes of the real models without allocating them.
    with torch.device("meta"):
        model = VisionTransformer(config)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert config.num_patches == tokens
    assert model.pos_embed.shape == (1, tokens, config.embed_dim)


def test_tiny_widths_fit_the_tiny_projector():
    assert SIGLIP_TINY.embed_dim + DINOV2_TINY.embed_dim == 64
    assert SIGLIP_TINY.num_patches == DINOV2_TINY.num_patches == 16
