"""Trainer: fit / validate / test / predict, the loop, and the events it fires."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch

from adaptrain.distributed import env as distributed
from adaptrain.core.batching import rebuild, batch_size_of, call_model, describe, detach_cpu, split_batch, to_device
from adaptrain.core.callback import Callback, CallbackList
from adaptrain.callbacks.progress import ProgressBar
from adaptrain.errors import NonFiniteLossError
from adaptrain.core.events import CANCEL_EXCEPTIONS, CancelEpochException, CancelTrainException, Event
from adaptrain.core.history import History
from adaptrain.core.losses import as_criterion, split_loss
from adaptrain.core.metrics import MetricSet, WeightedMean
from adaptrain.core.precision import PRECISIONS, build_precision
from adaptrain.core.scheduling import LRSchedule
from adaptrain.checkpoint.compat import load_epoch_progress, loader_rng_state, set_loader_rng_state
from adaptrain.core.state import TrainState, rng_state, seed_everything, set_rng_state

class Trainer:
    """Trains any ``nn.Module``: one loop, extended by callbacks.

    Args:
        model: the module to train; moved to ``device``.
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters.
        criterion: ``fn(outputs, targets) -> loss`` (a tensor, or a dict with ``"loss"`` and parts),
            or a dict/list of per-output losses (see :class:`~adaptrain.MultiLoss` for weights).
        metrics: name -> torchmetrics ``Metric`` or callable ``fn(outputs, targets)``; or output key ->
            {name: metric} for one output of a multi-output model.
        scheduler: an LR scheduler; a factory ``f(optimizer, total_steps=...)`` (e.g.
            ``functools.partial(OneCycleLR, max_lr=0.1)``: total steps are filled in from the loader
            length, epochs and accumulation); or a dict ``{"scheduler": ..., "interval": "step"|"epoch",
            "monitor": "val_loss"}``. OneCycleLR/CyclicLR step per optimizer step, others per epoch;
            ReduceLROnPlateau is fed its monitored value.
        precision: ``"32"``, ``"16-mixed"`` (autocast + GradScaler) or ``"bf16-mixed"``.
        accumulate_grad_batches: optimizer step every N batches, with gradients equal to one batch
            N times larger (each batch weighted by its size, so a short last window is exact too).
        max_epochs: epochs to train.
        callbacks: extra :class:`~adaptrain.Callback` objects.
        device: ``"auto"`` (CUDA, then MPS, then CPU), or any ``torch.device`` string.
        gradient_clip_val: clip the gradient norm to this value (after unscaling).
        seed: seeds python, numpy and torch at ``fit``: two CPU runs are then bit-identical.
        nan_policy: ``"raise"`` stops at the next sync point with the epoch and batch where the
            loss first became NaN/Inf (steps taken in between already changed the weights; resume
            from a checkpoint); ``"skip"`` skips such batches and counts them (one sync per batch).
        compile: wrap the model's forward in ``torch.compile``.
        progress: show the progress bar (plain lines when stdout is not a terminal).
        log_every_n_steps: batches between reads of running loss and metrics (host-device syncs).

    Example:
        >>> import torch, torch.nn as nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
        >>> model = nn.Linear(4, 1)
        >>> trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(),
        ...                   max_epochs=2, progress=False, seed=0)
        >>> history = trainer.fit(DataLoader(data, batch_size=16))
        >>> [r["epoch"] for r in history.records]
        [1, 2]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Any,
        metrics: Mapping[str, Any] | None = None,
        scheduler: Any = None,
        precision: str = "32",
        accumulate_grad_batches: int = 1,
        max_epochs: int = 1,
        callbacks: Iterable[Callback] | None = None,
        device: str | torch.device = "auto",
        gradient_clip_val: float | None = None,
        seed: int | None = None,
        nan_policy: str = "raise",
        compile: bool = False,
        progress: bool = True,
        log_every_n_steps: int = 20,
    ) -> None:
        _check_args(model, optimizer, precision, accumulate_grad_batches, max_epochs, gradient_clip_val,
                    nan_policy, log_every_n_steps)
        self.device = _resolve_device(device)
        self.model = model.to(self.device)
        self.criterion = as_criterion(criterion)
        self.metric_specs = dict(metrics or {})
        self.precision_name = str(precision)
        self.gradient_clip_val = gradient_clip_val
        self.seed = seed
        self.nan_policy = nan_policy
        self.log_every_n_steps = log_every_n_steps
        self._forward_model = torch.compile(model) if compile else model
        self._schedule = LRSchedule(scheduler)
        self.state = TrainState(model=self.model, optimizer=optimizer, device=self.device,
                                max_epochs=max_epochs, accumulate_grad_batches=accumulate_grad_batches)
        self.train_metrics = MetricSet(self.metric_specs, self.device)
        self.val_metrics = MetricSet(self.metric_specs, self.device)
        callbacks = list(callbacks or [])
        if progress and not any(isinstance(cb, ProgressBar) for cb in callbacks):
            callbacks.append(ProgressBar())
        self.callbacks = CallbackList(callbacks)
        self.is_global_zero = distributed.is_global_zero()
        self._resume_progress: dict[str, Any] | None = None  # a mid-epoch checkpoint's loss/metric sums

    # ------------------------------------------------------------------ public API
    def fit(self, train_loader: Iterable, val_loader: Iterable | None = None,
            ckpt_path: str | None = None) -> History:
        """Train for ``max_epochs`` (or until a callback stops it) and return the :class:`History`.

        ``ckpt_path`` (a path, or ``"last"``) resumes a run exactly where its checkpoint left it.
        """
        state = self.state
        if state.epoch >= state.max_epochs and ckpt_path is None:
            warnings.warn(f"fit(): this trainer already ran its {state.max_epochs} epochs; nothing to do. Raise "
                          "trainer.state.max_epochs to train more, or build a new Trainer.")
            return state.history
        state.train_loader, state.val_loader = train_loader, val_loader
        state.should_stop, state.stop_reason = False, None
        if self.seed is not None:
            seed_everything(self.seed)
        # Everything that can be wrong is checked here, before the first step.
        state.precision = build_precision(self.precision_name, self.device)
        state.steps_per_epoch = _steps_per_epoch(train_loader, state.accumulate_grad_batches)
        self._schedule.setup(state)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # pays off when input shapes stay fixed
        if ckpt_path is not None:
            from adaptrain.checkpoint.io import restore_trainer

            restore_trainer(self, ckpt_path)
        try:
            self._with_events("fit", self._fit_epochs)
            self._raise_interrupt()  # a signal seen in after_fit
        except BaseException as error:
            state.exception = error
            self.callbacks.fire(Event.EXCEPTION.value, self)
            raise
        return state.history

    def validate(self, loader: Iterable) -> dict[str, float]:
        """Evaluate on ``loader``; returns ``{"val_loss": ..., "val_<metric>": ...}``."""
        return self._evaluate(loader, "val", "val_loader")

    def test(self, loader: Iterable) -> dict[str, float]:
        """Like :meth:`validate`, with keys prefixed ``test_``."""
        return self._evaluate(loader, "test", "test_loader")

    @torch.inference_mode()
    def predict(self, loader: Iterable) -> Any:
        """Model outputs over ``loader`` (batches of inputs, or (inputs, targets)), concatenated on CPU."""
        self.model.eval()
        outputs = []
        for batch in loader:
            inputs = _prediction_inputs(batch)
            with self._precision().autocast():
                outputs.append(detach_cpu(call_model(self._forward_model, to_device(inputs, self.device))))
        return _concat(outputs)

    def print(self, *args: Any) -> None:
        """Print on rank zero only, through the progress bar's console when there is one."""
        if not self.is_global_zero:
            return
        bars = self.callbacks.find(ProgressBar)
        (bars[0].print if bars else print)(*args)

    # ------------------------------------------------------------------ the loop
    def _fit_epochs(self) -> None:
        state = self.state
        while state.epoch < state.max_epochs and not state.should_stop:
            state.epoch_logs = {"epoch": state.epoch + 1}
            # A cancelled epoch still ends: counters advance and its record (what it has) is kept.
            self._with_events("epoch", self._run_epoch, on_cancel=self._end_epoch)
            self._raise_interrupt()

    def _run_epoch(self) -> None:
        state = self.state
        self._with_events("train", self._train_epoch)
        if state.val_loader is not None:
            self._with_events("validate", self._validate_epoch)
        self._end_epoch()

    def _end_epoch(self) -> None:
        state = self.state
        # The lr the epoch's last optimizer step used (a per-step scheduler has already moved past it).
        state.epoch_logs["lr"] = state.step_lr if state.step_lr is not None else state.lr
        self._schedule.step_epoch(state)
        state.epoch += 1
        state.batch_idx = 0
        state.history.append(_ordered_record(state.epoch_logs))

    def _train_epoch(self) -> None:
        state = self.state
        self.model.train()
        state.optimizer.zero_grad(set_to_none=True)  # nothing from a cancelled window leaks in
        self.train_metrics.reset()
        self._losses: dict[str, WeightedMean] = {"loss": WeightedMean()}
        self._window_samples = 0
        self._num_batches = _length(state.train_loader)
        state.running = {}
        state.data_time = state.compute_time = 0.0
        skip = state.batch_idx
        if skip:  # resuming mid-epoch: replay the sampler's order, then skip what was already trained
            set_rng_state(state.epoch_start_rng)
            set_loader_rng_state(state.train_loader, state.epoch_start_rng.get("loader"))
        state.epoch_start_rng = {**rng_state(), "loader": loader_rng_state(state.train_loader)}  # + own generator
        epoch_start = time.perf_counter()
        samples = 0
        batches = iter(state.train_loader)
        for _ in range(skip):
            next(batches)
        if skip and state.resume_rng is not None:
            set_rng_state(state.resume_rng)
            state.resume_rng = None
        if skip and self._resume_progress is not None:  # the half-done epoch's loss/metric sums
            load_epoch_progress(self, self._resume_progress)
            if skip % self.log_every_n_steps == 0:
                self._refresh()  # the uninterrupted run folded its sums right after this batch
        self._resume_progress = None
        self._samples = 0
        try:
            fetch_start = time.perf_counter()
            for batch in batches:
                compute_start = time.perf_counter()
                state.data_time += compute_start - fetch_start
                state.batch, state.batch_idx = batch, state.batch_idx + 1
                self._last_batch_size = 0
                self._with_events("batch", self._train_batch, on_cancel=self._drop_unstepped_batch)
                self._samples += self._last_batch_size
                fetch_start = time.perf_counter()
                state.compute_time += fetch_start - compute_start
        except (CancelTrainException, CancelEpochException):
            self._close_train_phase(epoch_start)
            raise
        except BaseException:
            # Release loader workers now: the traceback keeps the iterator alive, and workers that
            # ignore SIGTERM (see callbacks/signals.py) would otherwise block interpreter exit.
            getattr(batches, "_shutdown_workers", lambda: None)()
            raise
        self._close_train_phase(epoch_start)

    def _close_train_phase(self, epoch_start: float) -> None:
        """Step what the window holds (a loader that ran short, or a cancelled phase), record the values."""
        state = self.state
        if self._window_samples:
            self._optimizer_step()
        self._refresh()
        elapsed = time.perf_counter() - epoch_start
        state.epoch_logs.update({f"train_{k}": v for k, v in state.running.items()})
        state.epoch_logs.update(epoch_time=elapsed, samples_per_s=self._samples / elapsed if elapsed else 0.0)

    def _drop_unstepped_batch(self) -> None:
        """A batch cancelled after its backward but before its step: without accumulation its gradient
        would add to the next batch's (a double step), so it is dropped. With accumulation it stays in
        the window, weighted by its size like any other batch."""
        if self.state.accumulate_grad_batches == 1 and self._window_samples:
            self.state.optimizer.zero_grad(set_to_none=True)
            self._window_samples = 0

    def _train_batch(self) -> None:
        state = self.state
        inputs, targets, outputs, loss, parts = self._forward(state.batch, "train_loader")
        batch_size = self._last_batch_size = batch_size_of(inputs, targets)
        state.outputs, state.loss = outputs, loss
        if self.nan_policy == "skip" and not torch.isfinite(loss):  # a sync, paid only in skip mode
            state.skipped_batches += 1
        else:
            self._track(loss, parts, outputs, targets, batch_size)
            scale = batch_size if state.accumulate_grad_batches > 1 else 1
            state.precision.backward(loss * scale if scale != 1 else loss)
            self._window_samples += batch_size
            self.callbacks.fire(Event.AFTER_BACKWARD.value, self)
        window_full = state.batch_idx % state.accumulate_grad_batches == 0
        if (window_full or state.batch_idx == self._num_batches) and self._window_samples:
            self._optimizer_step()
        if state.batch_idx % self.log_every_n_steps == 0:
            self._refresh()

    def _forward(self, batch: Any, loader_name: str) -> tuple[Any, Any, Any, torch.Tensor, dict]:
        """Split and move the batch, run the model and the criterion; errors name the culprit."""
        inputs, targets = split_batch(batch, loader_name)
        inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
        with self.state.precision.autocast():
            try:
                outputs = call_model(self._forward_model, inputs)
            except Exception as error:
                _reraise_naming(error, f"the model ({type(self.model).__name__}) failed on inputs "
                                       f"{describe(inputs)} from {loader_name}")
            try:
                loss, parts = split_loss(self.criterion(outputs, targets))
            except Exception as error:
                _reraise_naming(error, f"the criterion ({_name(self.criterion)}) failed on outputs "
                                       f"{describe(outputs)} and targets {describe(targets)} from {loader_name}")
        return inputs, targets, outputs, loss, parts

    def _optimizer_step(self) -> None:
        state = self.state
        optimizer = state.optimizer
        if state.accumulate_grad_batches > 1:
            # Each batch's loss was scaled by its size: dividing by the window's samples gives the
            # gradient of one big batch, also for a short last window.
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch._foreach_mul_(grads, 1.0 / self._window_samples)
        state.precision.unscale(optimizer)  # before_step sees true gradients; GradScaler.step reuses found_inf
        if self.gradient_clip_val is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.gradient_clip_val)
        self.callbacks.fire(Event.BEFORE_STEP.value, self)
        state.step_lr = optimizer.param_groups[0]["lr"]
        stepped = state.precision.step(optimizer)
        if not stepped:
            state.skipped_steps += 1  # the scheduler must not advance past a step that did not happen
        elif state.scheduler is not None and state.scheduler_interval == "step":
            state.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self._window_samples = 0
        state.global_step += 1
        self.callbacks.fire(Event.AFTER_STEP.value, self)
        self._raise_interrupt()

    def _track(self, loss: torch.Tensor, parts: dict, outputs: Any, targets: Any, batch_size: int) -> None:
        """Accumulate loss, parts and metrics on the device; remember where a loss first went NaN/Inf."""
        self._losses["loss"].update(loss, batch_size, tag=self.state.batch_idx)
        for name, part in parts.items():
            self._losses.setdefault(name, WeightedMean()).update(part, batch_size)
        self.train_metrics.update(outputs, targets, batch_size)

    def check_finite(self) -> None:
        """Raise :class:`~adaptrain.NonFiniteLossError` if a loss tracked so far this epoch was NaN/Inf.

        A host-device sync: call it where one is paid anyway (before writing a checkpoint).
        """
        if self.nan_policy == "raise" and getattr(self, "_losses", None):
            self._refresh()

    def _raise_interrupt(self) -> None:
        """A callback asked to stop (a signal): raise it once every callback has seen this step or epoch end."""
        if self.state.interrupt is not None:
            error, self.state.interrupt = self.state.interrupt, None
            raise error

    def _refresh(self) -> None:
        """Read running loss and metrics from the device: a host-device sync, so only every N steps."""
        state = self.state
        bad_batch = self._losses["loss"].flush(find_nonfinite=self.nan_policy == "raise")
        if bad_batch is not None:
            acc = state.accumulate_grad_batches
            steps_this_epoch = state.batch_idx // acc + (1 if state.batch_idx % acc and not self._window_samples else 0)
            step = state.global_step - steps_this_epoch + math.ceil(bad_batch / acc)  # the step that used it
            raise NonFiniteLossError(state.epoch + 1, step, bad_batch)
        running = {name: mean.compute() for name, mean in self._losses.items()}
        running = {k: v for k, v in running.items() if v is not None}
        running.update(self.train_metrics.compute())
        state.running = running

    def _validate_epoch(self) -> None:
        self.state.epoch_logs.update(self._run_eval(self.state.val_loader, "val", "val_loader"))

    def _evaluate(self, loader: Iterable, prefix: str, loader_name: str) -> dict[str, float]:
        if self.state.precision is None:
            self.state.precision = build_precision(self.precision_name, self.device)
        results: dict[str, float] = {}  # not state.epoch_logs: a call from a callback mid-fit must not clobber it
        if prefix != "val":  # test() fires no validate events: callbacks watching validation are not fooled
            return self._run_eval(loader, prefix, loader_name)
        self._with_events("validate", lambda: results.update(self._run_eval(loader, prefix, loader_name)))
        return results

    @torch.inference_mode()
    def _run_eval(self, loader: Iterable, prefix: str, loader_name: str) -> dict[str, float]:
        self.model.eval()
        self.val_metrics.reset()
        losses: dict[str, WeightedMean] = {"loss": WeightedMean()}
        for batch in loader:
            inputs, targets, outputs, loss, parts = self._forward(batch, loader_name)
            batch_size = batch_size_of(inputs, targets)
            for name, value in {"loss": loss, **parts}.items():
                losses.setdefault(name, WeightedMean()).update(value, batch_size)
            self.val_metrics.update(outputs, targets, batch_size)
        values = {name: mean.compute() for name, mean in losses.items()}
        values.update(self.val_metrics.compute())
        return {f"{prefix}_{k}": v for k, v in values.items() if v is not None}

    # ------------------------------------------------------------------ events and scheduling
    def _with_events(self, stage: str, run: Callable[[], None], on_cancel: Callable[[], None] | None = None) -> None:
        """before_<stage>, the stage, after_cancel_<stage> if it was cancelled, after_<stage>."""
        try:
            self.callbacks.fire(f"before_{stage}", self)  # a before_ hook may cancel the stage
            run()
        except CANCEL_EXCEPTIONS[stage]:
            if on_cancel is not None:
                on_cancel()
            self.callbacks.fire(f"after_cancel_{stage}", self)
        self.callbacks.fire(f"after_{stage}", self)

    def _precision(self):
        if self.state.precision is None:
            self.state.precision = build_precision(self.precision_name, self.device)
        return self.state.precision


# ---------------------------------------------------------------------- helpers (pure)
def _check_args(model, optimizer, precision, accumulate, max_epochs, clip, nan_policy, log_every) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Trainer(model=...): expected a torch.nn.Module; received {type(model).__name__}.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"Trainer(optimizer=...): expected a torch.optim.Optimizer; received {type(optimizer).__name__}.")
    if str(precision) not in PRECISIONS:
        raise ValueError(f'Trainer(precision="{precision}"): expected one of "32", "16-mixed", "bf16-mixed".')
    for name, value in (("accumulate_grad_batches", accumulate), ("max_epochs", max_epochs),
                        ("log_every_n_steps", log_every)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Trainer({name}={value!r}): expected an integer >= 1.")
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
        raise ValueError(f"Trainer(gradient_clip_val={clip!r}): expected a positive number or None.")
    if nan_policy not in ("raise", "skip"):
        raise ValueError(f'Trainer(nan_policy="{nan_policy}"): expected "raise" or "skip".')


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f'Trainer(device="{device}"): expected "auto", "cpu", "cuda" or "cuda:N".') from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f'Trainer(device="{device}"): CUDA is not available on this machine; use "auto" or "cpu".')
    return resolved


def _prediction_inputs(batch: Any) -> Any:
    """Inputs of a predict batch: a tensor, a 1-tuple (TensorDataset(x)), a dict without targets, or (inputs, targets)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return batch[0]
    if isinstance(batch, dict) and "targets" not in batch:
        return batch.get("inputs", batch)
    return split_batch(batch, "predict loader")[0]


def _reraise_naming(error: Exception, where: str) -> None:
    """Raise the same kind of error with the place named. Subclasses (OOM, adaptrain's own errors)
    pass unchanged, with a note, so handlers that catch them (an OOM back-off) still can."""
    if type(error) in (RuntimeError, ValueError, TypeError, IndexError, KeyError):
        raise type(error)(f"{where}: {error}") from error
    if hasattr(error, "add_note"):
        error.add_note(where)
    raise error


def _name(obj: Any) -> str:
    return getattr(obj, "__name__", type(obj).__name__)


def _ordered_record(logs: dict[str, Any]) -> dict[str, Any]:
    """epoch, lr, train_*, val_*, then the rest (times, forecasts): the column order of the CSV."""
    rank = {"epoch": 0, "lr": 1}
    return dict(sorted(logs.items(), key=lambda kv: rank.get(kv[0], 2 if kv[0].startswith("train_")
                                                              else 3 if kv[0].startswith("val_") else 4)))


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _steps_per_epoch(loader: Iterable, accumulate: int) -> int | None:
    length = _length(loader)
    if length == 0:
        raise ValueError("fit(train_loader=...): the loader is empty; expected at least one batch.")
    return math.ceil(length / accumulate) if length is not None else None


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
