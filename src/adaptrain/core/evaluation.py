"""Evaluation: the validation epoch, the sanity pass before training, ``test`` and ``predict``.

The base of :class:`~adaptrain.core.loop.TrainingLoop`, apart from the training path so each reads on
its own. It holds the ``_forward`` both run (one place moves batches, calls the model and the
criterion under the precision's autocast, and names the culprit when either fails); evaluation runs
it under ``inference_mode``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import TYPE_CHECKING, Any, Iterable

import torch

from adaptrain.core.batching import (
    batch_size_of,
    call_model,
    describe,
    detach_cpu,
    name_of,
    rebuild,
    reraise_naming,
    to_device,
    unpack_batch,
)
from adaptrain.core.losses import split_loss
from adaptrain.core.metrics import WeightedMean
from adaptrain.core.state import rng_state, set_rng_state
from adaptrain.data.loaders import LoaderSpec, loader_rng_state, set_loader_rng_state
from adaptrain.errors import NonFiniteLossError

if TYPE_CHECKING:
    from adaptrain.core.state import TrainState

_NO_PARTS: dict = {}  # a bare-tensor loss has no parts; one shared empty dict (read only), not one per batch

#: Val batches run by the sanity pass before the first step (Lightning's num_sanity_val_steps).
SANITY_VAL_BATCHES = 2


class EvaluationLoop:
    """Validation, the sanity pass, test and predict, and the forward pass that training shares."""

    state: TrainState

    def _forward(self, inputs: Any, targets: Any, loader_name: str,
                 model: Any = None) -> tuple[Any, torch.Tensor, dict]:
        """Move the batch, run the model (``model``, default: the training one) and the criterion under
        the precision's autocast (fp32 has none: no context entered, two Python calls a step saved)."""
        if self.device.type != "cpu":  # loaders yield CPU tensors: on the CPU there is nothing to move
            inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
        precision = self.state.precision
        if precision.autocasts:
            with precision.autocast():
                return self._model_and_loss(model or self._forward_model, inputs, targets, loader_name)
        return self._model_and_loss(model or self._forward_model, inputs, targets, loader_name)

    def _model_and_loss(self, model: Any, inputs: Any, targets: Any,
                        loader_name: str) -> tuple[Any, torch.Tensor, dict]:
        """Outputs, loss and loss parts of one batch; errors name the culprit."""
        try:  # a tensor (the common case) without the helper's call
            outputs = model(inputs) if isinstance(inputs, torch.Tensor) else call_model(model, inputs)
        except Exception as error:
            reraise_naming(error, f"the model ({type(self.model).__name__}) failed on inputs "
                                   f"{describe(inputs)} from {loader_name}")
        try:
            result = self.criterion(outputs, targets)
            loss, parts = (result, _NO_PARTS) if isinstance(result, torch.Tensor) else split_loss(result)
        except Exception as error:
            reraise_naming(error, f"the criterion ({name_of(self.criterion)}) failed on outputs "
                                   f"{describe(outputs)} and targets {describe(targets)} from {loader_name}")
        if loss.numel() != 1:  # shape is host-side: no sync
            raise ValueError(f"the criterion ({name_of(self.criterion)}) returned a loss of shape {list(loss.shape)} "
                             f"from {loader_name}; expected a scalar (the batch mean): use reduction='mean', "
                             "not 'none'.")
        return outputs, loss, parts

    def _validate_epoch(self) -> None:
        values = self._run_eval(self._limited(self.state.val_loader), "val", "val_loader")
        bad = sorted(key for key, value in values.items() if not math.isfinite(value))
        if bad:  # the values are on the host already: no extra sync
            message = (f"validation at epoch {self.state.epoch + 1} gave non-finite {', '.join(bad)} "
                       "(a NaN/Inf in the val data, or weights that diverged)")
            if self.nan_policy == "raise":
                raise NonFiniteLossError.from_message(message + "; pass nan_policy='skip' to keep training.")
            warnings.warn(message + "; no checkpoint ranks it as best.")
        self.state.epoch_logs.update(values)
        self.state.validated = True

    def _sanity_check(self) -> list[str]:
        """A forward pass over the first val batches before training, so a val-side mistake (shapes, the
        criterion, a metric) stops the run now, not one epoch late. It leaves every RNG as it was (a
        shuffling val loader included) and fires no events. Returns the val_ keys validation records."""
        state = self.state
        saved, loader_state = rng_state(), loader_rng_state(state.val_loader)
        loader = state.val_loader
        if getattr(loader, "persistent_workers", False) and getattr(loader, "num_workers", 0):
            # Workers forked now would live on for every validation, started before the signal handler
            # sets them up: the sanity pass reads from a non-persistent copy (same generator) instead.
            loader = LoaderSpec.from_loader(loader).build(persistent_workers=False)
        try:
            values = self._run_eval(itertools.islice(loader, SANITY_VAL_BATCHES), "val", "val_loader")
        finally:
            set_rng_state(saved)
            set_loader_rng_state(state.val_loader, loader_state)
        if not values:
            warnings.warn("fit(val_loader=...): the val loader yielded no batches; epochs will have no val_ values.")
        return list(values)

    def _limited(self, loader: Iterable) -> Iterable:
        """The loader, cut to ``limit_batches`` batches in a dry run (``fast_dev_run``)."""
        return itertools.islice(loader, self.limit_batches) if self.limit_batches else loader

    def _no_grad(self) -> Any:
        """``inference_mode`` for evaluation; ``no_grad`` under FSDP, whose unsharded parameters made
        in inference mode could not be updated in place by the next training step."""
        return torch.no_grad() if self.strategy is not None and self.strategy.name == "fsdp" else torch.inference_mode()

    def _run_eval(self, loader: Iterable, prefix: str, loader_name: str) -> dict[str, float]:
        with self._no_grad():
            return self._evaluate(loader, prefix, loader_name)

    def _evaluate(self, loader: Iterable, prefix: str, loader_name: str) -> dict[str, float]:
        self.model.eval()
        self.val_metrics.reset()
        losses: dict[str, WeightedMean] = {"loss": WeightedMean.for_device(self.device)}
        for batch in loader:
            inputs, targets = unpack_batch(batch, loader_name)
            outputs, loss, parts = self._forward(inputs, targets, loader_name, self._eval_model)
            batch_size = batch_size_of(inputs, targets)
            for name, value in {"loss": loss, **parts}.items():
                losses.setdefault(name, WeightedMean.for_device(self.device)).update(value, batch_size)
            self.val_metrics.update(outputs, targets, batch_size)
        values = {name: mean.compute() for name, mean in losses.items()}
        values.update(self.val_metrics.compute())
        return {f"{prefix}_{k}": v for k, v in values.items() if v is not None}

    def _predict(self, loader: Iterable) -> Any:
        self.model.eval()
        outputs = []
        for batch in loader:
            inputs = _prediction_inputs(batch)
            with self.precision.autocast():
                try:
                    outputs.append(detach_cpu(call_model(self._eval_model, to_device(inputs, self.device))))
                except TypeError as error:
                    pair = isinstance(batch, (tuple, list)) and len(batch) == 2
                    hint = (" A batch of two items is read as (inputs, targets); for a model with two inputs, give "
                            "batches as ((x1, x2),) or {'inputs': (x1, x2)}." if pair else "")
                    raise TypeError(f"predict: the model ({type(self.model).__name__}) failed on inputs "
                                    f"{describe(inputs)}: {error}.{hint}") from error
        return _concat(outputs)


def _prediction_inputs(batch: Any) -> Any:
    """Inputs of a predict batch: a tensor, a 1-tuple (TensorDataset(x)), a dict without targets, or
    (inputs, targets)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return batch[0]
    if isinstance(batch, dict) and "targets" not in batch:
        return batch.get("inputs", batch)
    return unpack_batch(batch, "predict loader")[0]


def _concat(outputs: list) -> Any:
    if not outputs:
        return outputs
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, dict):
        return {k: _concat([o[k] for o in outputs]) for k in first}
    if isinstance(first, (tuple, list)):
        return rebuild(first, [_concat([o[i] for o in outputs]) for i in range(len(first))])
    return outputs
