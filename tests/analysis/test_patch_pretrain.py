"""Patch-label pre-training of the "strong" encoder learns the patch classes and round-trips through a weights file."""

import numpy as np
import pytest
import torch

from milstudy.analysis.embedding import knn_purity
from milstudy.encoders import build_encoder
from milstudy.train.patch_pretrain import pretrain_on_patch_labels, save_encoder


def _patches(n: int = 96, seed: int = 0):
    rng = np.random.default_rng(seed)
    patches = rng.integers(90, 160, size=(n, 16, 16, 3), dtype=np.uint8)
    labels = (np.arange(n) % 4 == 0).astype(np.int64)  # 25 % "tumour": a faint red cast
    patches[labels == 1, :, :, 0] = np.clip(patches[labels == 1, :, :, 0].astype(int) + 30, 0, 255)
    return patches, labels


def test_pretraining_lowers_the_loss_and_separates_the_classes(tmp_path):
    torch.manual_seed(0)
    patches, labels = _patches()
    encoder = build_encoder("tiny_cnn", seed=0)
    images = torch.as_tensor(patches).movedim(-1, 1).float() / 255
    with torch.no_grad():
        before = knn_purity(encoder.eval()(images).numpy(), labels, k=5)
    encoder, losses = pretrain_on_patch_labels(encoder, patches, labels, epochs=6, batch_size=32, lr=3e-3,
                                               progress=False)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        features = encoder(images)
    assert knn_purity(features.numpy(), labels, k=5) > max(before, 0.9)
    path = save_encoder(encoder, tmp_path / "strong.safetensors")
    reloaded = build_encoder("tiny_cnn", weights=path, seed=123).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), features)
    assert not list(tmp_path.glob(".*tmp"))


def test_pretraining_on_descriptors_learns_three_classes_and_rejects_other_shapes():
    """The S-vec tier: float descriptors ``[N, d]`` through the descriptor MLP (no image augmentation)."""
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 3
    descriptors = rng.normal(size=(300, 12)).astype(np.float32)
    descriptors[:, 0] += 1.5 * labels  # one direction carries the class
    encoder = build_encoder("descriptor_mlp", seed=0, in_dim=12, widths=(16, 16))
    with torch.no_grad():
        before = knn_purity(encoder.eval()(torch.as_tensor(descriptors)).numpy(), labels, k=5)
    encoder, losses = pretrain_on_patch_labels(encoder, descriptors, labels, epochs=8, batch_size=32, lr=3e-3,
                                               progress=False)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        after = knn_purity(encoder(torch.as_tensor(descriptors)).numpy(), labels, k=5)
    assert after > before + 0.1
    with pytest.raises(ValueError, match="float descriptors"):
        pretrain_on_patch_labels(encoder, descriptors[None], labels, epochs=1, progress=False)
    with pytest.raises(ValueError, match="float descriptors"):
        pretrain_on_patch_labels(encoder, descriptors.astype(np.int64), labels, epochs=1, progress=False)
