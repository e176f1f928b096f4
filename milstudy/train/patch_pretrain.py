"""A "strong" (foundation-model-like) patch encoder for the CPU profile: supervised pre-training on patch labels.

ABMILX spec §4.1 "Encoder conditions": FM-like = an encoder pre-trained with patch labels on a *disjoint* synthetic
cohort (our stand-in for UNI/GigaPath features, E5/E7 of spec §4.3). ``pretrain_on_patch_labels`` fits the encoder
plus a linear head with cross-entropy on ``(patch, label)`` pairs (flip augmentation only, as the paper's E2E
recipe), then returns the encoder alone; ``save_encoder`` writes its weights atomically as safetensors so that
``build_encoder(name, weights=path)`` and ``E2EConfig(encoder_weights=path)`` load them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


def pretrain_on_patch_labels(
    encoder: nn.Module,
    patches: np.ndarray,
    labels: np.ndarray,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 1e-4,
    balance: bool = True,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[nn.Module, list[float]]:
    """Train ``encoder`` (+ a linear head, discarded) to classify patches; returns (encoder in eval mode, loss per epoch).

    patches: uint8 ``[N, p, p, 3]`` images, or float ``[N, d]`` descriptors (the S-vec tier; no augmentation);
    labels: int ``[N]`` (0 normal, 1 tumour, or more classes). ``encoder`` maps float ``[B, 3, p, p]`` in [0, 1]
    (or ``[B, d]``) to ``[B, encoder.out_dim]``. ``balance`` draws each epoch's patches with class-balanced
    weights (tumour patches are rare). Images: random horizontal/vertical flips; no colour augmentation.
    """
    patches = np.asarray(patches)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    descriptors = patches.ndim == 2 and np.issubdtype(patches.dtype, np.floating)
    if not descriptors and (patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8):
        raise ValueError(f"patches must be uint8 images [N, p, p, 3] or float descriptors [N, d], got "
                         f"{patches.dtype} {patches.shape}")
    if len(patches) != len(labels):
        raise ValueError(f"{len(patches)} patches but {len(labels)} labels")
    n_classes = int(labels.max()) + 1
    if n_classes < 2 or len(np.unique(labels)) < 2:
        raise ValueError("patch-label pre-training needs at least two classes among the labels")
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(int(encoder.out_dim), n_classes)
    encoder.to(device).train()
    head.to(device).train()
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr, weight_decay=weight_decay)
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    weights = (1.0 / counts[labels]) if balance else np.ones(len(labels))
    weights /= weights.sum()
    losses = []
    for _ in tqdm(range(epochs), desc="patch-label pre-training", disable=not progress):
        order = rng.choice(len(labels), size=len(labels), replace=balance, p=weights)
        epoch_losses = []
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            if descriptors:
                images = torch.as_tensor(patches[index], dtype=torch.float32, device=device)
            else:
                images = torch.as_tensor(patches[index]).to(device).movedim(-1, 1).float().div_(255.0)
                flip = torch.rand(2, generator=generator)
                if flip[0] < 0.5:
                    images = images.flip(-1)
                if flip[1] < 0.5:
                    images = images.flip(-2)
            loss = nn.functional.cross_entropy(head(encoder(images)), torch.as_tensor(labels[index], device=device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_losses.append(float(loss.detach()))
        losses.append(float(np.mean(epoch_losses)))
    return encoder.eval(), losses


def save_encoder(encoder: nn.Module, path: str | os.PathLike) -> Path:
    """Write the encoder's state dict as safetensors atomically (``milstudy.train.checkpoint.save_weights``)."""
    from milstudy.train.checkpoint import save_weights

    return save_weights(encoder.state_dict(), Path(path))
