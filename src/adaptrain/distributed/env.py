"""The one place that knows the process's rank, world size and device (DDP through torchrun plugs in here).

Under ``torchrun`` (or ``srun``) the environment names the rank; before the process group is up,
the environment variables are what there is.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK`` from torchrun; 0 for a single process)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_global_zero() -> bool:
    """Only rank zero prints, logs and saves."""
    return rank() == 0


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` (each rank its own GPU), then MPS, then the CPU.

    Example:
        >>> default_device().type in ("cuda", "mps", "cpu")
        True
    """
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
