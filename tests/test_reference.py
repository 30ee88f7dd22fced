"""realcustom.reference: views, preprocessing and features of the tiny SigLIP + DINOv2 encoder."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from realcustom.reference import (
    CROSS_LAYER_REFERENCE_ENCODER,
    RELEASED_REFERENCE_ENCODER,
    TINY_REFERENCE_ENCODER,
    ReferenceEncoder,
    ReferenceEncoderConfig,
    VisionFeatures,
    interleave_view_tokens,
    polyphase_views,
    truncate_to_uint8_levels,
)
from realcustom.vit import DINOV2_TINY, SIGLIP_TINY

FIXTURE = Path(__file__).parent / "fixtures" / "vit_timm_tiny.safetensors"
CAT = Path(__file__).resolve().parents[1] / "examples" / "dreambench" / "cat.jpg"
TINY_CROSS_LAYER = ReferenceEncoderConfig(
    siglip=SIGLIP_TINY,
    dino=DINOV2_TINY,
    siglip_layer=2,
    dino_layer=2,
    reference_size=112,
    view_size=56,
    siglip_shallow_layers=(0, 1, 3),
    dino_shallow_layers=(1, 0, 3),
)
T, C = 16, 64  # tiny tokens per view and channels


@pytest.fixture(scope="module")
def encoder() -> ReferenceEncoder:
    torch.manual_seed(0)
    return ReferenceEncoder(TINY_REFERENCE_ENCODER).eval()


@pytest.fixture(scope="module")
def cross_layer_encoder() -> ReferenceEncoder:
    torch.manual_seed(1)
    return ReferenceEncoder(TINY_CROSS_LAYER).eval()


def reference_batch(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def test_feature_shapes(encoder, cross_layer_encoder):
    features = encoder(reference_batch(2))
    assert features.global_tokens.shape == (2, T, C)
    assert features.local_tokens.shape == (2, 4 * T, C)
    assert features.shallow_tokens is None
    cross = cross_layer_encoder(reference_batch(2))
    assert cross.shallow_tokens is not None and cross.shallow_tokens.shape == (2, 3 * T, C)


def test_real_configs_give_released_dimensions():
    config = RELEASED_REFERENCE_ENCODER
    assert (config.tokens_per_view, config.feature_dim) == (729, 2176)
    assert (config.siglip_layer, config.dino_layer, config.reference_size, config.view_size) == (
        25,
        22,
        768,
        384,
    )
    assert CROSS_LAYER_REFERENCE_ENCODER.siglip_shallow_layers == (7, 13, 19)
    assert CROSS_LAYER_REFERENCE_ENCODER.dino_shallow_layers == (4, 10, 16)
    assert TINY_REFERENCE_ENCODER.feature_dim == 64


def test_polyphase_split_on_hand_tensor():
    pixels = torch.arange(16.0).reshape(1, 1, 4, 4)
    views = polyphase_views(pixels)
    expected = [[[0, 2], [8, 10]], [[1, 3], [9, 11]], [[4, 6], [12, 14]], [[5, 7], [13, 15]]]
    assert torch.equal(views[:, 0], torch.tensor(expected, dtype=torch.float32))
    two_samples = polyphase_views(torch.stack([pixels[0], pixels[0] + 100]))
    assert torch.equal(two_samples[4:], views + 100)  # sample-major, then the four parities


def test_local_tokens_interleave_views():
    # token 4t + k is token t of view k
    per_view = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(8, 3, 1)
    joined = interleave_view_tokens(per_view)
    assert joined.shape == (2, 12, 1)
    assert torch.equal(joined[1, 4 * 2 + 3], per_view[4 + 3, 2])


def test_local_tokens_are_the_four_views_encoded(encoder):
    pixels = reference_batch(1, seed=3)
    features = encoder(pixels)
    for view in range(4):
        row, col = divmod(view, 2)
        sub_image = pixels[:, :, row::2, col::2]
        # Encoding one sub-image as a global view needs it at reference size first; instead run the
        # encoders on it directly through a 2x upsampled copy whose polyphase views all equal it.
        upsampled = sub_image.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        alone = encoder(upsampled).local_tokens[:, 0::4]
        torch.testing.assert_close(features.local_tokens[:, view::4], alone, atol=1e-5, rtol=0)


def test_global_view_is_align_corners_bilinear(encoder):
    pixels = reference_batch(1, seed=4)
    global_view = F.interpolate(pixels, size=(56, 56), mode="bilinear", align_corners=True)
    upsampled = global_view.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(
        encoder(pixels).global_tokens, encoder(upsampled).local_tokens[:, 0::4], atol=1e-5, rtol=0
    )


def test_truncation_semantics():
    levels = torch.arange(256, dtype=torch.float32) / 255
    assert torch.equal(truncate_to_uint8_levels(levels), levels)  # exact levels survive
    just_below = (torch.arange(1, 256, dtype=torch.float32) - 0.01) / 255
    assert torch.equal(truncate_to_uint8_levels(just_below) * 255, torch.arange(255, dtype=torch.float32))
    # 0.999 * 255 = 254.745 -> 254 (rounding would give 255)
    assert torch.equal(truncate_to_uint8_levels(torch.tensor([0.999])), torch.tensor([254.0]) / 255)


def test_preprocessing_matches_official(encoder):
    # Views as the official encoder hands them to timm, recorded by tools/make_vit_fixture.py.
    assert FIXTURE.is_file(), f"{FIXTURE} is missing; regenerate it with tools/make_vit_fixture.py"
    fixture = load_file(str(FIXTURE))
    captured = {}
    hooks = [
        module.patch_embed.register_forward_pre_hook(
            lambda _, args, name=name: captured.update({name: args[0]})
        )
        for name, module in (("siglip", encoder.siglip), ("dino", encoder.dino))
    ]
    try:
        encoder(fixture["preprocess.reference"].float())
    finally:
        for hook in hooks:
            hook.remove()
    views = fixture["preprocess.views"]
    assert torch.equal(torch.round((captured["siglip"] * 0.5 + 0.5) * 255).to(torch.uint8), views)
    torch.testing.assert_close(captured["siglip"][:1], fixture["preprocess.siglip_global"], atol=1e-6, rtol=0)
    torch.testing.assert_close(captured["dino"][:1], fixture["preprocess.dino_global"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "CMYK", "P", "1", "I;16"])
def test_to_tensor_accepts_any_mode(encoder, mode):
    image = Image.new("RGB", (30, 20), (200, 100, 50)).convert(mode)
    pixels = encoder.to_tensor([image, Image.new("RGB", (64, 90), (0, 0, 0))])
    assert pixels.shape == (2, 3, 112, 112) and pixels.dtype == torch.float32
    assert pixels.min() >= 0 and pixels.max() <= 1
    assert encoder(pixels).global_tokens.isfinite().all()


def test_rgba_alpha_is_dropped_not_composited(encoder):
    transparent = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    opaque = Image.new("RGB", (8, 8), (10, 20, 30))
    assert torch.equal(encoder.to_tensor([transparent]), encoder.to_tensor([opaque]))
    assert torch.allclose(encoder.to_tensor([opaque])[0, :, 0, 0], torch.tensor([10, 20, 30]) / 255)


def test_black_features_are_cached(encoder):
    first = encoder.black_features(3)
    second = encoder.black_features(1)
    assert first.global_tokens.shape == (3, T, C) and first.local_tokens.shape == (3, 4 * T, C)
    assert first.global_tokens.data_ptr() == second.global_tokens.data_ptr()
    direct = encoder(torch.zeros(1, 3, 112, 112))
    torch.testing.assert_close(second.global_tokens, direct.global_tokens, atol=0, rtol=0)
    torch.testing.assert_close(second.local_tokens, direct.local_tokens, atol=0, rtol=0)


def test_black_features_follow_dtype():
    torch.manual_seed(0)
    encoder = ReferenceEncoder(TINY_REFERENCE_ENCODER).eval()
    float_features = encoder.black_features(1)
    encoder.to(torch.bfloat16)
    bf16_features = encoder.black_features(2)
    assert bf16_features.global_tokens.dtype == torch.bfloat16
    assert float_features.global_tokens.dtype == torch.float32
    torch.testing.assert_close(
        bf16_features.global_tokens[0].float(), float_features.global_tokens[0], atol=0.1, rtol=0.05
    )


def test_dreambench_cat_encodes(encoder):
    features = encoder.encode_images([Image.open(CAT)])
    assert isinstance(features, VisionFeatures)
    assert features.global_tokens.shape == (1, T, C)
    assert features.local_tokens.isfinite().all()
    assert not torch.allclose(features.global_tokens, encoder.black_features(1).global_tokens)


def test_rejects_wrong_reference_size(encoder):
    with pytest.raises(ValueError, match="expected pixels"):
        encoder(torch.zeros(1, 3, 100, 100))


def test_config_validation():
    with pytest.raises(ValueError, match="2 \\* view_size"):
        ReferenceEncoderConfig(SIGLIP_TINY, DINOV2_TINY, 2, 2, reference_size=100, view_size=56)
