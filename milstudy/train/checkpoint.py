"""Checkpoints: safetensors weights + JSON state, atomic writes, RNG capture for exact resume.

Layout under a run's ``checkpoint_dir``::

    epoch_0007/              the latest epoch (older epoch folders are removed once a newer one is complete)
        model.safetensors    model weights
        ema.safetensors      EMA weights (if any)
        optimizer.pt         optimizer (+ AMP scaler) state, a plain dict of tensors/numbers: loads with weights_only
        rng.pt               torch / CUDA / numpy / python RNG states (tensors and lists: loads with weights_only)
        extra.pt             anything else the trainer needs as tensors (attention snapshots)
        state.json           epoch, history, best metric ... written LAST: a folder without it is incomplete
    best/model.safetensors   weights of the selected (best validation) epoch
    best/meta.json           its epoch and monitored value

Every file is written to a temporary name in the same folder and renamed with ``os.replace``, so a crash never
leaves a half-written file; ``latest_checkpoint`` only returns folders whose ``state.json`` exists.
"""

from __future__ import annotations

import copy
import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from milstudy.provenance import atomic_write, atomic_write_bytes

STATE_FILE = "state.json"


def atomic_write_json(obj: Any, path: Path) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            json.dump(obj, handle, indent=1, default=_json_default)

    return atomic_write(path, write)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """``torch.save`` atomically (keep ``obj`` to tensors/numbers/strings/lists/dicts: weights_only-loadable).
    Serialised in memory, then written with plain I/O, so a full disk is ``OSError(ENOSPC)`` naming ``path``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getbuffer())


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    """Save a state dict as safetensors (CPU, contiguous copies, so tied weights are stored twice); serialised in
    memory, then written atomically with plain I/O (a full disk: ``OSError(ENOSPC)`` naming ``path``)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    return atomic_write_bytes(path, save(tensors))


def load_weights(model: nn.Module, path: Path, strict: bool = True) -> nn.Module:
    """Load safetensors weights into ``model`` (clear error naming the file on mismatched keys or shapes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    tensors = load_file(str(path))
    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in tensors.items()
             if k in own and own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{path}: shape mismatch for {len(wrong)} tensors: " + "; ".join(wrong[:5]))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return model


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop may consume, as weights_only-loadable objects."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def snapshots_to_tensors(snapshots: dict[int, dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Per-epoch attention snapshots ``{epoch: {slide_id: array}}`` as a flat, weights_only-loadable dict."""
    return {f"{epoch}\t{sid}": torch.from_numpy(a) for epoch, per in snapshots.items() for sid, a in per.items()}


def snapshots_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, np.ndarray]]:
    """Inverse of :func:`snapshots_to_tensors`."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        epoch, sid = key.split("\t", 1)
        out.setdefault(int(epoch), {})[sid] = value.numpy()
    return out


def epoch_dir(checkpoint_dir: Path, epoch: int) -> Path:
    return Path(checkpoint_dir) / f"epoch_{epoch:04d}"


def save_training_checkpoint(
    checkpoint_dir: Path,
    epoch: int,
    model: nn.Module,
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    ema_model: nn.Module | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``epoch_XXXX/`` (state.json last), then delete older epoch folders. Returns the folder."""
    folder = epoch_dir(checkpoint_dir, epoch)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), folder / "model.safetensors")
    if ema_model is not None:
        save_weights(ema_model.state_dict(), folder / "ema.safetensors")
    atomic_torch_save(optimizer_state, folder / "optimizer.pt")
    atomic_torch_save(rng_state(), folder / "rng.pt")
    atomic_torch_save(extra or {}, folder / "extra.pt")
    atomic_write_json({**state, "epoch": epoch}, folder / STATE_FILE)
    for old in Path(checkpoint_dir).glob("epoch_*"):
        if old != folder and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(checkpoint_dir: Path | None) -> Path | None:
    """The newest complete ``epoch_XXXX`` folder (with ``state.json``), or None."""
    if checkpoint_dir is None or not Path(checkpoint_dir).is_dir():
        return None
    complete = sorted(p for p in Path(checkpoint_dir).glob("epoch_*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def load_training_checkpoint(
    folder: Path, model: nn.Module, ema_model: nn.Module | None = None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Load weights into ``model`` (and ``ema_model``); restore RNGs. Returns (state, optimizer_state, extra)."""
    folder = Path(folder)
    with open(folder / STATE_FILE) as handle:
        state = json.load(handle)
    load_weights(model, folder / "model.safetensors")
    if ema_model is not None and (folder / "ema.safetensors").is_file():
        load_weights(ema_model, folder / "ema.safetensors")
    optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    extra = torch.load(folder / "extra.pt", map_location="cpu", weights_only=True)
    set_rng_state(torch.load(folder / "rng.pt", map_location="cpu", weights_only=True))
    return state, optimizer_state, extra


def optimizer_state(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """What ``save_training_checkpoint`` stores as ``optimizer_state``: the optimizer and, when enabled, the AMP scaler."""
    state: dict[str, Any] = {"optimizer": optimizer.state_dict()}
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    return state


def restore_optimizer(state: dict[str, Any], optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None = None) -> None:
    """Inverse of :func:`optimizer_state`."""
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])


def load_best_state(checkpoint_dir: Path, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The weights ``save_best`` wrote under ``checkpoint_dir``, as a state dict shaped like ``model``'s (on its
    device), or None when there are none; ``model`` itself is not changed."""
    path = Path(checkpoint_dir) / "best" / "model.safetensors"
    if not path.is_file():
        return None
    return {k: v.detach().clone() for k, v in load_weights(copy.deepcopy(model), path).state_dict().items()}


def save_best(checkpoint_dir: Path, state_dict: dict[str, torch.Tensor], epoch: int, value: float) -> Path:
    """Write ``best/model.safetensors`` and ``best/meta.json``; returns the weights path."""
    path = save_weights(state_dict, Path(checkpoint_dir) / "best" / "model.safetensors")
    atomic_write_json({"epoch": epoch, "value": value}, Path(checkpoint_dir) / "best" / "meta.json")
    return path
