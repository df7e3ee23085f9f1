"""Loaders the trainer can rebuild with changes, and the loader state that exact resume needs.

PyTorch cannot change a ``DataLoader``'s batch size or worker count in place, so adaptive
features (batch size, worker tuning) rebuild it: :class:`LoaderSpec` reads every setting of a
loader and builds a new one with a few of them changed. The dataset, the sampler object (and with
it the shuffle generator), ``collate_fn`` and ``worker_init_fn`` are kept as the same objects, so
a rebuilt loader yields the same batches in the same order as the original would have.

Why not ``torchdata``'s ``StatefulDataLoader``: it resumes by samples seen, but it is a
``DataLoader`` subclass users would have to build themselves; the trainer takes the user's own
loader as it is and replays its sampler instead (:func:`loader_rng_state`), which needs nothing
from them.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> loader = DataLoader(TensorDataset(torch.arange(10.)), batch_size=4, shuffle=True,
    ...                     generator=torch.Generator().manual_seed(0))
    >>> bigger = LoaderSpec.from_loader(loader).build(batch_size=5)
    >>> bigger.batch_size, bigger.sampler is loader.sampler, len(bigger)
    (5, True, 2)
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

#: What :meth:`LoaderSpec.build` may change; everything else is kept as the original loader had it.
CHANGEABLE = ("batch_size", "num_workers", "prefetch_factor", "pin_memory", "persistent_workers")


class LoaderError(TypeError):
    """A loader the trainer cannot rebuild; names what it is and what is needed instead."""


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    """Every setting of a ``DataLoader``, to build it again with some of them changed."""

    dataset: Any
    batch_size: int | None
    sampler: Any
    batch_sampler: Any  # a custom batch sampler (None when the loader batches by batch_size)
    drop_last: bool
    num_workers: int
    collate_fn: Any
    pin_memory: bool
    timeout: float
    worker_init_fn: Any
    multiprocessing_context: Any
    generator: torch.Generator | None
    prefetch_factor: int | None
    persistent_workers: bool
    extra: dict[str, Any]  # settings only newer torch versions have (in_order), passed through as they are

    @classmethod
    def from_loader(cls, loader: Any) -> LoaderSpec:
        """Read a ``DataLoader``'s settings; :class:`LoaderError` for anything else (a plain iterable)."""
        if not isinstance(loader, DataLoader):
            raise LoaderError(f"the train loader is a {type(loader).__name__}, which cannot be rebuilt with another "
                              "batch size or worker count; pass a torch.utils.data.DataLoader.")
        custom_batches = loader.batch_size is None and loader.batch_sampler is not None
        extra = {name: getattr(loader, name) for name in ("in_order",) if hasattr(loader, name)}
        return cls(dataset=loader.dataset, batch_size=loader.batch_size,
                   sampler=None if isinstance(loader.dataset, IterableDataset) else loader.sampler,
                   batch_sampler=loader.batch_sampler if custom_batches else None, drop_last=loader.drop_last,
                   num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                   timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                   multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                   prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers, extra=extra)

    def build(self, **changes: Any) -> DataLoader:
        """A new ``DataLoader`` with ``changes`` (keys of :data:`CHANGEABLE`) and everything else kept.

        Raises:
            LoaderError: an unknown setting, or a batch size change on a loader with its own batch sampler.
        """
        unknown = sorted(set(changes) - set(CHANGEABLE))
        if unknown:
            raise LoaderError(f"LoaderSpec.build({', '.join(unknown)}=...): only {', '.join(CHANGEABLE)} can change.")
        if "batch_size" in changes and self.batch_sampler is not None and changes["batch_size"] != self.batch_size:
            raise LoaderError(f"the train loader batches with its own {type(self.batch_sampler).__name__}, so its "
                              "batch size cannot be changed; build it with batch_size=... (and sampler=... if you "
                              "need one).")
        spec = dataclasses.replace(self, **changes)
        workers = spec.num_workers
        kwargs: dict[str, Any] = dict(
            num_workers=workers, collate_fn=spec.collate_fn, pin_memory=spec.pin_memory, timeout=spec.timeout,
            worker_init_fn=spec.worker_init_fn,
            multiprocessing_context=spec.multiprocessing_context if workers else None,
            generator=spec.generator, prefetch_factor=(spec.prefetch_factor or 2) if workers else None,
            persistent_workers=spec.persistent_workers and workers > 0, **spec.extra)
        if spec.batch_sampler is not None:
            return DataLoader(spec.dataset, batch_sampler=spec.batch_sampler, **kwargs)
        return DataLoader(spec.dataset, batch_size=spec.batch_size, sampler=spec.sampler, drop_last=spec.drop_last,
                          **kwargs)

    def with_sampler(self, sampler: Any) -> DataLoader:
        """A new ``DataLoader`` drawing indices from ``sampler`` (a ``DistributedSampler``: this rank's
        share), batched as before, everything else kept."""
        if self.batch_sampler is not None or self.batch_size is None:
            raise LoaderError("the loader batches with its own batch sampler, so its sampler cannot be replaced; "
                              "give it a DistributedSampler yourself, or build it with batch_size=....")
        return dataclasses.replace(self, sampler=sampler).build()

    def settings(self) -> dict[str, Any]:
        """The changeable settings as they are now (what ``trainer.loader_settings`` reports)."""
        return {name: getattr(self, name) for name in CHANGEABLE}


def loader_settings(loader: Any) -> dict[str, Any]:
    """A DataLoader's worker settings as torch runs them ({} for anything else).

    Example:
        >>> loader_settings(DataLoader(range(4), num_workers=0))
        {'num_workers': 0, 'prefetch_factor': None, 'pin_memory': False, 'persistent_workers': False}
    """
    if not isinstance(loader, DataLoader):
        return {}
    return {"num_workers": loader.num_workers, "prefetch_factor": loader.prefetch_factor,
            "pin_memory": loader.pin_memory, "persistent_workers": loader.persistent_workers}


def loader_batch_size(loader: Any) -> int | None:
    """The batch size a loader yields: its ``batch_size``, or its batch sampler's (None if neither says).

    Example:
        >>> loader_batch_size(DataLoader(range(10), batch_size=4)), loader_batch_size(range(3))
        (4, None)
    """
    if not isinstance(loader, DataLoader):
        return None
    size = loader.batch_size if loader.batch_size is not None else getattr(loader.batch_sampler, "batch_size", None)
    return size if isinstance(size, int) else None


def loader_length(loader: Any) -> int | None:
    """``len(loader)``, or None for a loader without one (an iterable dataset)."""
    try:
        return len(loader)
    except TypeError:
        return None


def shutdown_workers(batches: Any) -> None:
    """Stop a DataLoader iterator's worker processes now (no-op for other iterators).

    A traceback keeps a failed epoch's iterator alive; workers that ignore SIGTERM (see
    ``callbacks/signals.py``) would otherwise block interpreter exit.
    """
    getattr(batches, "_shutdown_workers", lambda: None)()


# ---------------------------------------------------------------------- the loader's own RNG
def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a DataLoader's shuffling draws from (its own, its sampler's)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None))
    found: list[torch.Generator] = []
    for owner in owners:
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def loader_rng_state(loader: Any) -> list[torch.Tensor] | None:
    """States of the loader's own generators (None when it draws from the global torch RNG only).

    Example:
        >>> loader = DataLoader(range(8), shuffle=True, generator=torch.Generator().manual_seed(0))
        >>> saved = loader_rng_state(loader)
        >>> first = list(loader)
        >>> set_loader_rng_state(loader, saved); list(loader) == first
        True
    """
    return [g.get_state() for g in _loader_generators(loader)] or None


def set_loader_rng_state(loader: Any, states: list[torch.Tensor] | None) -> None:
    """Inverse of :func:`loader_rng_state`; warns when the loader's generators do not match the saved ones."""
    generators = _loader_generators(loader)
    if states is None and not generators:
        return
    if states is None or len(states) != len(generators):
        warnings.warn(f"resume: the checkpoint holds {len(states or [])} train-loader generator state(s), this "
                      f"loader has {len(generators)}; its shuffle order will differ from the interrupted run's.")
        return
    for generator, saved in zip(generators, states):
        generator.set_state(saved)


def is_default_batching(loader: Any) -> bool:
    """True when the loader batches by ``batch_size`` (torch's own BatchSampler), so its batch size can change."""
    return isinstance(loader, DataLoader) and loader.batch_size is not None and \
        type(loader.batch_sampler) is BatchSampler
