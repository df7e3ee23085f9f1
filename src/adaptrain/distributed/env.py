"""The one place that knows the process's rank and world size (DDP through torchrun plugs in here)."""

from __future__ import annotations

import os

import torch.distributed as dist


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_global_zero() -> bool:
    """Only rank zero prints, logs and saves."""
    return rank() == 0
