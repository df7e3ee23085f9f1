"""Data parallelism on PyTorch's own engine: DDP or FSDP2 (``fully_shard``), under ``torchrun``.

:class:`Strategy` is what the trainer asks when it runs on several processes: how to wrap the
model, how to shard the loaders, when gradients synchronise, how to make the step's gradient the
exact sample-weighted mean over every rank's samples, how to reduce a value, and how to gather
and load a checkpoint. Nothing here launches processes or implements a collective: torchrun
starts the processes, ``torch.distributed`` (nccl on CUDA, gloo on the CPU) moves the tensors.

The exactness rule: each rank backpropagates its micro-batch losses weighted by ``size / R``
(``R`` the same constant on every rank), so its local gradient is ``sum_i size_i * g_i / R``;
DDP and FSDP average those over the ``N`` ranks; multiplying by ``N * R / S`` (``S`` the step's
samples over all ranks, one small all-reduce per step) gives ``sum_i size_i * g_i / S``: the mean
gradient over every sample of the step, whatever each rank's share (a short last batch on one
rank does not bias it).

Example:
    >>> resolve_strategy("auto", world_size=1), resolve_strategy("auto", world_size=2)
    (None, 'ddp')
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from adaptrain.distributed import env

STRATEGIES = ("auto", "ddp", "fsdp")


def resolve_strategy(name: str, world_size: int) -> str | None:
    """The strategy to run: None on one process; ``"auto"`` is DDP on several."""
    if name not in STRATEGIES:
        raise ValueError(f'strategy is {name!r}; expected "auto", "ddp" or "fsdp"')
    if world_size < 2:
        return None
    return "ddp" if name == "auto" else name


class StridedSampler(Sampler[int]):
    """Indices ``rank, rank + N, rank + 2N, ...`` of a data set, not padded: evaluation over N
    ranks then sees every sample exactly once (``DistributedSampler`` repeats up to N - 1 samples
    to give every rank the same count, which would bias ``val_acc``). Evaluation runs no collective
    per batch, so the ranks may hold different counts.

    Example:
        >>> list(StridedSampler(range(5), num_replicas=2, rank=1))
        [1, 3]
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int) -> None:
        self.length, self.num_replicas, self.rank = len(dataset), num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


class Strategy:
    """The running DDP / FSDP strategy of one trainer (``Trainer(strategy=...)`` on several processes)."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name, self.device = name, device
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()

    # ------------------------------------------------------------------ the model
    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        """The module the loop calls: ``DistributedDataParallel(model)``, or ``model`` sharded in
        place by ``fully_shard`` (its optimizer then points at the sharded parameters)."""
        if self.name == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        names = {id(p): name for name, p in model.named_parameters()}
        fully_shard = _fully_shard()
        for child in model.children():  # each block its own unit: its parameters gather only while it runs
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child)
        fully_shard(model)
        sharded = dict(model.named_parameters())
        for group in optimizer.param_groups:  # same groups and options, now over the sharded parameters
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        return model

    def gradient_sync(self, forward_model: torch.nn.Module, final: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on micro-steps that do not end the window (``no_sync``)."""
        if final:
            return contextlib.nullcontext()
        if self.name == "ddp":
            return forward_model.no_sync()
        return _fsdp_no_sync(forward_model)

    def step_samples(self, local_samples: int) -> int:
        """Samples of this optimizer step over every rank (one all-reduce of one number)."""
        return int(env.sum_over_ranks([float(local_samples)])[0])

    def all_reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Average gradients over ranks by hand: a window that closed without its synchronised
        backward (a loader without a length, whose last batch is known only when it is over)."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world_size

    # ------------------------------------------------------------------ the loaders' samplers
    def train_sampler(self, dataset: Any, shuffle: bool, drop_last: bool, seed: int) -> DistributedSampler:
        """This rank's share of every global batch (the loop calls ``set_epoch`` each epoch)."""
        return DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=seed,
                                  drop_last=drop_last)

    def eval_sampler(self, dataset: Any) -> StridedSampler:
        """This rank's strided share of an evaluation set (every sample seen once over the ranks)."""
        return StridedSampler(dataset, self.world_size, self.rank)

    # ------------------------------------------------------------------ checkpoints
    def model_state_dict(self, model: torch.nn.Module) -> dict[str, Any]:
        """The whole model's state (FSDP: gathered to rank zero's CPU: a collective on every rank)."""
        if self.name == "ddp":
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state_dict(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if self.name == "ddp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model(self, model: torch.nn.Module, state: dict[str, Any]) -> None:
        if self.name == "ddp":
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def load_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self.name == "ddp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _fully_shard() -> Any:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 keeps FSDP2 under _composable
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


@contextlib.contextmanager
def _fsdp_no_sync(model: torch.nn.Module) -> Iterator[None]:
    """FSDP2's ``no_sync``: keep unsharded gradients, reduce-scatter only at the window's last backward."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def start(name: str, device: torch.device) -> Strategy | None:
    """The strategy for this process: None on one process; on several, the process group started
    from torchrun's environment (``env.ensure_process_group``) and the chosen strategy."""
    chosen = resolve_strategy(name, env.world_size())
    if chosen is None or not env.ensure_process_group(device):
        return None
    return Strategy(chosen, device)
