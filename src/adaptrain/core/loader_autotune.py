"""Loader tuning applied to the running job (``Trainer(auto_num_workers=True)``): placeholder, being built.

The decisions are :mod:`adaptrain.tuning.loader_tuning`'s; this callback measures and applies them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adaptrain.core.callback import Callback

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer


class LoaderAutotune(Callback):
    """Tunes the train loader's workers and prefetch depth at the start of ``fit`` (added by the trainer)."""

    order = -90  # before every other callback's before_fit: they see the loader the run trains with

    def before_fit(self, trainer: Trainer) -> None:
        return None
