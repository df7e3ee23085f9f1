"""The trainer on several processes: DDP / FSDP plugged into ``fit`` (the strategy is
:mod:`adaptrain.distributed.strategy`'s; this module applies it to the trainer's model and loaders).

Under ``torchrun`` the user's one-process script runs unchanged on every rank: at ``fit`` the
process group starts from torchrun's environment, the model is wrapped (after it is on its device,
and after the batch-size search, whose probes are local), the train loader gets a
``DistributedSampler`` (its shuffle and drop_last kept, seeded by ``Trainer(seed=...)``, ``set_epoch``
every epoch) and the val loader a strided, unpadded share. Each rank's loader batch size is the
per-rank batch: a global batch is ``batch_size x world_size``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from adaptrain.data.loaders import LoaderSpec
from adaptrain.distributed import strategy as strategies
from adaptrain.distributed.strategy import StridedSampler
from adaptrain.errors import ConfigError

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer


def setup(trainer: Trainer) -> None:
    """Start the strategy (once per trainer) and shard this fit's loaders; a no-op on one process."""
    if trainer.strategy is None:
        trainer.strategy = strategies.start(trainer.strategy_name, trainer.device)
        if trainer.strategy is None:
            return
        if trainer.nan_policy == "skip":
            raise ConfigError("nan_policy", 'is "skip", which would let ranks skip different batches and wait on '
                              'each other forever; use "raise" on several processes.')
        state = trainer.state
        wrapped = trainer.strategy.wrap(trainer.model, state.optimizer)
        trainer._forward_model = trainer._compile(wrapped)
        if trainer.strategy.name == "fsdp":  # FSDP gathers parameters in every forward: evaluation goes through it
            trainer._eval_model = trainer._forward_model
        # DDP: evaluation runs the module itself: its wrapper would broadcast buffers at every forward, and
        # the ranks' unpadded val shares may differ by a batch
        state.strategy = trainer.strategy
    state = trainer.state
    state.train_loader = shard_train(trainer, state.train_loader)
    if state.val_loader is not None:
        state.val_loader = shard_eval(trainer, state.val_loader)


def shard_train(trainer: Trainer, loader: Any) -> Any:
    """``loader`` reading this rank's share (unchanged when it has a DistributedSampler already)."""
    if trainer.strategy is None or not isinstance(loader, DataLoader) or \
            isinstance(loader.sampler, DistributedSampler):
        return loader
    sampler = trainer.strategy.train_sampler(loader.dataset, shuffle=isinstance(loader.sampler, RandomSampler),
                                             drop_last=loader.drop_last, seed=trainer.seed or 0)
    return LoaderSpec.from_loader(loader).with_sampler(sampler)


def shard_eval(trainer: Trainer, loader: Any) -> Any:
    """An evaluation loader reading this rank's share. DDP: strided and unpadded (every sample once
    over the ranks: ``val_acc`` equals one process's). FSDP: ``DistributedSampler`` without shuffle,
    since every forward gathers parameters and the ranks must run as many batches: when the set does
    not divide by the world size, up to N - 1 samples count twice (torch's padding)."""
    if trainer.strategy is None or not isinstance(loader, DataLoader) or loader.batch_size is None or \
            isinstance(loader.sampler, (DistributedSampler, StridedSampler)) or not hasattr(loader.dataset, "__len__"):
        return loader
    strategy = trainer.strategy
    sampler = strategy.eval_sampler(loader.dataset) if strategy.name == "ddp" else \
        strategy.train_sampler(loader.dataset, shuffle=False, drop_last=False, seed=0)
    return LoaderSpec.from_loader(loader).with_sampler(sampler)
