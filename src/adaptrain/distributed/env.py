"""The one place that knows the process's rank, world size and device (DDP through torchrun plugs in here).

Under ``torchrun`` (or ``srun``) the environment names the rank; before the process group is up,
the environment variables are what there is.
"""

from __future__ import annotations

import atexit
import datetime
import gc
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


#: Collectives that wait longer than this fail instead of hanging (a rank that died, a deadlock).
DEFAULT_TIMEOUT_S = float(os.environ.get("ADAPTRAIN_DIST_TIMEOUT_S", 300))


def launched() -> bool:
    """True under a launcher that started several processes (torchrun, or srun with torchrun's variables)."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def ensure_process_group(device: torch.device | None = None) -> bool:
    """Start the process group torchrun's environment describes (once; nccl on CUDA, gloo on the CPU).

    Returns True when this process is part of a group of more than one. Idempotent: the CLI calls
    it before making the run folder (rank zero makes it, the others are told where), the trainer
    at ``fit``. A collective that waits longer than ``ADAPTRAIN_DIST_TIMEOUT_S`` (300 s) fails.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if not launched():
        return False
    device = device or default_device()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S))
    # The group adaptrain started is ended before the interpreter tears down, as the CLI does (NCCL
    # warns about a group never destroyed).
    atexit.register(end_process_group)
    return True


def end_process_group() -> None:
    """Destroy the default process group if it is still up (a local call: no collective).

    Garbage is collected first, while the interpreter is whole. A finished trainer is a reference
    cycle (trainer, state, callbacks), so its DDP wrapper, whose reducer holds the group, outlived
    ``destroy_process_group`` (seen in every 2-rank CLI run) and was freed in interpreter teardown,
    where gloo's threads release tensors that need the GIL: a rank then aborts after its work is
    done ("terminate called without an active exception", SIGABRT; pytorch/pytorch#179291).
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def broadcast_object(value: object, src: int = 0) -> object:
    """``value`` as rank ``src`` has it, on every rank (a no-op on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over every rank (float64; ``values`` itself on one process).

    Every rank must call it at the same point (it is a collective).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_reduction_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def max_over_ranks(value: int) -> int:
    """The largest ``value`` over every rank (``value`` itself on one process); a collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_reduction_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def barrier() -> None:
    """Wait until every rank is here (a no-op on one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _reduction_device() -> torch.device:
    """Where a reduction's tensor must live: this rank's GPU under nccl, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
