"""DDP helpers for the end-to-end trainer: ``torchrun --nproc_per_node=N -m milstudy.train.e2e --config C.yaml``.

``init_from_env()`` starts the process group from torchrun's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``): NCCL on CUDA (one GPU per local rank), gloo on CPU. ``current()`` describes this process (a
single process when not launched by torchrun). Slides are split over ranks with a ``DistributedSampler`` reseeded
every epoch; rank 0 logs and writes files. BatchNorm statistics are per rank unless ``sync_bn`` (CUDA only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DistributedSampler, RandomSampler, Sampler


@dataclass
class DistInfo:
    """This process: ``rank`` of ``world_size``, its ``device``; ``enabled`` = a process group is running."""

    enabled: bool
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> DistInfo:
    """The running process group's view of this process (single-process defaults when none is initialised)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        backend = torch_dist.get_backend()
        device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
        return DistInfo(True, torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, device)
    return DistInfo(False, 0, 1, 0, torch.device("cpu"))


def init_from_env(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE > 1``); no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 or torch_dist.is_initialized():
        return current()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return current()


def shutdown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (device_ids on CUDA). ``find_unused_parameters``: for models
    whose branches a step may skip (CLAM's instance classifiers: per class, or none for survival targets)."""
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def epoch_sampler(n_items: int, dist: DistInfo, seed: int, epoch: int) -> Sampler:
    """Shuffled order of ``n_items`` slides for ``epoch``: this rank's shard under DDP, all of them otherwise."""
    indices = range(n_items)
    if dist.enabled:
        sampler = DistributedSampler(indices, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return sampler
    return RandomSampler(indices, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def agree_nonempty(good: list) -> list:
    """Under DDP every rank must take part in each step: if any rank has no readable slide in this batch, all skip it."""
    flag = torch.tensor([1 if good else 0], dtype=torch.int64)
    if torch_dist.get_backend() == "nccl":
        flag = flag.cuda()
    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MIN)
    return good if int(flag.item()) == 1 else []


def broadcast_flag(value: bool) -> bool:
    """Rank 0's ``value`` on every rank (e.g. an early-stopping decision)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return value
    flag = torch.tensor([1 if value else 0], dtype=torch.int64)
    if torch_dist.get_backend() == "nccl":
        flag = flag.cuda()
    torch_dist.broadcast(flag, src=0)
    return bool(flag.item())


def sync_buffers(model: nn.Module) -> None:
    """Broadcast rank 0's buffers (BatchNorm running statistics) so every rank evaluates the identical model.

    DDP broadcasts buffers at the start of each forward, so after the last training step the ranks' running
    statistics differ by one local update; call this before validation so selection agrees across ranks.
    """
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return
    for buffer in model.buffers():
        torch_dist.broadcast(buffer.data, src=0)
