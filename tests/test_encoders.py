"""Encoders: output widths, local weight round trip, clear shape-mismatch errors, order independence (spec §6.20)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from milstudy.encoders import build_encoder, file_sha256, list_encoders



@pytest.mark.parametrize(
    ("name", "size", "width"),
    [("resnet18_trunc", 32, 256), ("resnet50_trunc", 32, 1024), ("tiny_cnn", 32, 64), ("tiny_cnn_full", 32, 128)],
)
def test_output_width(name, size, width):
    encoder = build_encoder(name).eval()
    with torch.no_grad():
        out = encoder(torch.rand(2, 3, size, size))
    assert out.shape == (2, width) and encoder.out_dim == width
    assert encoder.weight_hash == "random-init-seed0"


def test_vit_and_configured_tiny_width():
    vit = build_encoder("vit_small_patch16", img_size=32, pool="avg").eval()
    assert vit(torch.rand(1, 3, 32, 32)).shape == (1, 384)
    tiny = build_encoder("tiny_cnn", widths=(8, 16, 24, 48)).eval()
    assert tiny(torch.rand(1, 3, 32, 32)).shape == (1, 24) and tiny.out_dim == 24


def test_seeded_init_is_deterministic_and_seed_dependent():
    a, b, c = build_encoder("tiny_cnn", seed=3), build_encoder("tiny_cnn", seed=3), build_encoder("tiny_cnn", seed=4)
    wa, wb, wc = (m.trunk.stem[0].weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert c.weight_hash == "random-init-seed4"


def test_safetensors_round_trip(tmp_path):
    source = build_encoder("tiny_cnn", seed=1).eval()
    path = tmp_path / "tiny.safetensors"
    save_file({f"trunk.{k}": v.contiguous() for k, v in source.trunk.state_dict().items()}, str(path))
    loaded = build_encoder("tiny_cnn", weights=path, seed=2).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))
    assert loaded.weight_hash == file_sha256(path) and len(loaded.weight_hash) == 64


def test_torch_state_dict_of_full_resnet_loads_truncated(tmp_path):
    import timm

    full = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "r18.pth"
    torch.save(full.state_dict(), path)  # has layer4.* and fc.*: dropped by truncation
    encoder = build_encoder("resnet18_trunc", weights=path)
    assert torch.equal(encoder.trunk.conv1.weight, full.conv1.weight)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    wide = build_encoder("tiny_cnn", widths=(8, 16, 32, 64))
    path = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in wide.trunk.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"stem\.0\.weight.*\(8, 3, 3, 3\).*\(16, 3, 3, 3\)"):
        build_encoder("tiny_cnn", weights=path)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_encoder("tiny_cnn", weights=tmp_path / "nope.safetensors")
    with pytest.raises(KeyError, match="tiny_cnn"):
        build_encoder("resnet_nonexistent")
    assert {"resnet18_trunc", "resnet50_trunc", "vit_small_patch16", "tiny_cnn"} <= set(list_encoders())


def test_eval_features_independent_of_patch_order():
    encoder = build_encoder("tiny_cnn").eval()
    x = torch.rand(6, 3, 32, 32)
    perm = torch.randperm(6)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x)[perm], encoder(x[perm]), rtol=1e-5, atol=1e-6)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        build_encoder("tiny_cnn")(torch.rand(2, 32, 32))


def test_uint8_images_equal_float_images_in_unit_range():
    encoder = build_encoder("tiny_cnn", seed=0).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), encoder(images.float() / 255))


def test_pinned_timm_vit_blocks_take_an_attention_mask():
    """E2E-ViT masks padded tokens through timm's ViT blocks: the pinned timm must accept ``attn_mask``."""
    import inspect

    from timm.models.vision_transformer import Attention, Block

    assert "attn_mask" in inspect.signature(Block.forward).parameters
    assert "attn_mask" in inspect.signature(Attention.forward).parameters
    block = Block(dim=16, num_heads=2).eval()
    x = torch.randn(1, 5, 16)
    keep = torch.tensor([True, True, True, False, False])
    mask = torch.zeros(1, 1, 5, 5).masked_fill(~keep.view(1, 1, 1, 5), float("-inf"))
    with torch.no_grad():
        masked = block(x, attn_mask=mask)[:, :3]
        trimmed = block(x[:, :3])
    torch.testing.assert_close(masked, trimmed, rtol=1e-5, atol=1e-5)


def test_timm_vit_checkpoint_at_224_loads_from_a_dino_teacher_file_and_runs_on_256_px(tmp_path):
    """A DINO-style file ({'teacher': {'backbone.<key>': ...}}) of a 224-px ViT loads into the same architecture
    at 256 px: the key is selected, the prefix stripped and pos_embed resampled (timm's checkpoint filter)."""
    import timm

    source = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=224).eval()
    teacher = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "dino.pth"
    torch.save({"teacher": teacher, "student": teacher, "epoch": 3}, path)
    with pytest.raises(Exception, match="weights_key"):
        build_encoder("timm:vit_small_patch16_224", weights=path, img_size=256)
    encoder = build_encoder("timm:vit_small_patch16_224", weights=path, weights_key="teacher", img_size=256).eval()
    with torch.no_grad():
        out = encoder(torch.rand(2, 3, 256, 256))
    assert out.shape == (2, 384)
    loaded = dict(encoder.named_parameters())
    block = next(k for k in loaded if k.endswith("blocks.0.attn.qkv.weight"))
    torch.testing.assert_close(loaded[block], source.state_dict()["blocks.0.attn.qkv.weight"])  # weights arrived


def test_uni_preset_has_the_published_vit_large_shapes():
    """UNI (vit_large_patch16_224, MahmoodLab model card): 1024-d, 24 blocks, pos_embed (1, 197, 1024)."""
    with torch.device("meta"):
        encoder = build_encoder("uni")
    state = {k.removeprefix("trunk."): v.shape for k, v in encoder.state_dict().items()}
    assert encoder.out_dim == 1024
    assert state["pos_embed"] == (1, 197, 1024) and state["blocks.23.mlp.fc1.weight"] == (4096, 1024)
