"""The loop the :class:`~adaptrain.Trainer` runs: fit -> epoch -> train -> batch.

Evaluation (validation, the sanity pass, test, predict) is in :mod:`adaptrain.core.evaluation`; the
optimizer step (the accumulation window, micro-batches, the OOM recompute, the step stage) in
:mod:`adaptrain.core.step`.

Read top to bottom, it is the pseudocode of :mod:`adaptrain.core.events`. Every piece of progress
lives on ``self.state`` (:class:`~adaptrain.TrainState`); features plug in through events and the
state, not through branches here.

Most runs use none of what the window is for (accumulation, micro-batches, several ranks, clipping,
callbacks that act between a backward and its step): their batches take
:meth:`TrainingLoop._train_plain_batch`, the same stages in the same order with the values tracked
right after the step.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from adaptrain.core.batching import batch_size_of, detached, unpack_batch
from adaptrain.core.events import (
    CANCEL_EXCEPTIONS,
    STAGE_EVENTS,
    CancelBatchException,
    CancelEpochException,
    CancelTrainException,
    Event,
)
from adaptrain.core.history import ordered_record
from adaptrain.core.state import rng_state, set_rng_state
from adaptrain.core.step import AFTER_STEP, BEFORE_STEP, OOM_ERRORS, StepLoop
from adaptrain.data.loaders import loader_length, loader_rng_state, set_loader_rng_state, shutdown_workers
from adaptrain.errors import NonFiniteLossError

if TYPE_CHECKING:
    from adaptrain.core.state import TrainState

BEFORE_BATCH, AFTER_CANCEL_BATCH, AFTER_BATCH = STAGE_EVENTS["batch"]
AFTER_BACKWARD = Event.AFTER_BACKWARD.value


class TrainingLoop(StepLoop):
    """The loop's methods (evaluation in :class:`~adaptrain.core.evaluation.EvaluationLoop`);
    :class:`~adaptrain.Trainer` holds the arguments and the public API."""

    state: TrainState

    # ------------------------------------------------------------------ fit -> epoch
    def _fit_epochs(self) -> None:
        state = self.state
        while state.epoch < state.max_epochs and not state.should_stop:
            if state.next_train_loader is not None:
                self._install_train_loader(state.next_train_loader)
            state.epoch_logs, state.validated = {"epoch": state.epoch + 1}, False
            # A cancelled epoch still ends: counters advance and its record (what it has) is kept.
            self._with_events("epoch", self._run_epoch, on_cancel=self._end_epoch)
            self._raise_interrupt()

    def _run_epoch(self) -> None:
        state = self.state
        length = loader_length(state.train_loader)  # set before before_train: callbacks see this epoch's count
        state.num_batches = min(length, self.limit_batches) if length is not None and self.limit_batches else length
        self._with_events("train", self._train_epoch)
        if self.state.val_loader is not None:
            self._with_events("validate", self._validate_epoch)
        self._end_epoch()

    def _end_epoch(self) -> None:
        state = self.state
        # The lr the epoch's last optimizer step used (a per-step scheduler has already moved past it).
        state.epoch_logs["lr"] = state.step_lr if state.step_lr is not None else state.lr
        self._schedule.step_epoch(state)
        state.epoch += 1
        state.batch_idx = state.epoch_samples = 0
        state.history.append(ordered_record(state.epoch_logs))

    # ------------------------------------------------------------------ train phase
    def _train_epoch(self) -> None:
        state = self.state
        self.model.train()
        state.optimizer.zero_grad(set_to_none=True)  # nothing from a cancelled window leaks in
        state.window.clear()
        state.train_sums.reset()
        state.running, state.data_time, state.compute_time = {}, 0.0, 0.0
        state.in_train_phase = True
        epoch_start = time.perf_counter()
        samples_before = state.samples_seen
        batches = self._epoch_batches()
        plain_step_applies = self._plain_step_applies
        clock = time.perf_counter
        try:
            fetch_start = clock()
            for batch in self._limited(batches):
                compute_start = clock()
                state.data_time += compute_start - fetch_start
                if plain_step_applies():  # asked per batch: an OOM mid-epoch splits the next ones
                    self._train_plain_batch(batch)
                else:
                    self._train_batch(batch)
                fetch_start = clock()
                state.compute_time += fetch_start - compute_start
        except (CancelTrainException, CancelEpochException):
            self._close_train_phase(epoch_start, state.samples_seen - samples_before)
            raise
        except BaseException:
            shutdown_workers(batches)  # workers that ignore SIGTERM would otherwise block exit
            raise
        finally:
            state.in_train_phase = False
        self._close_train_phase(epoch_start, state.samples_seen - samples_before)

    def _epoch_batches(self) -> Iterator[Any]:
        """The epoch's batches; resuming mid-epoch, the sampler's order is replayed and the samples
        already trained are skipped, then the checkpoint's RNG and running sums are put back."""
        state = self.state
        resuming, skip_samples, skip_batches = state.mid_epoch, state.epoch_samples, state.batch_idx
        if resuming:
            set_rng_state(state.epoch_start_rng)
            set_loader_rng_state(state.train_loader, state.epoch_start_rng.get("loader"))
        state.epoch_start_rng = {**rng_state(), "loader": loader_rng_state(state.train_loader)}
        set_epoch = getattr(getattr(state.train_loader, "sampler", None), "set_epoch", None)
        if set_epoch is not None:  # a DistributedSampler: the epoch's order, the same on resume
            set_epoch(state.epoch)
        batches = iter(state.train_loader)
        if not resuming:
            return batches
        state.batch_idx = state.epoch_samples = 0
        # by samples (old checkpoints, without a sample count, by batches)
        while (state.epoch_samples < skip_samples) if skip_samples else (state.batch_idx < skip_batches):
            state.epoch_samples += batch_size_of(*unpack_batch(next(batches), "train_loader"))
            state.batch_idx += 1
        point, state.resume_point = state.resume_point, None
        if point is not None:
            set_rng_state(point["rng"])
            if point["progress"] is not None:  # the half-done epoch's loss/metric sums
                state.train_sums.load_state_dict(point["progress"], self.device)
            if state.batch_idx % self.log_every_n_steps == 0:
                self._refresh()  # the uninterrupted run folded its sums right after this batch
        return batches

    def _train_batch(self, batch: Any) -> None:
        """One fetched batch, counted, as the batch stage: before_batch (may replace or cancel it), its
        forward/backward into the window, the step when the window is full, after_batch. The pattern of
        :meth:`_with_events`, written out here: it runs every batch, and the wrapper cost a call each."""
        state, window, hooks = self.state, self.state.window, self._hooks
        inputs, targets = self._count_batch(batch)
        try:
            if hooks[BEFORE_BATCH]:
                inputs, targets = self._before_batch(batch, inputs, targets)
            index, samples = state.batch_idx, state.batch_samples
            window.batches.append((inputs, targets, index, samples))
            self._accumulate_or_recompute(inputs, targets, index, samples)
            if hooks[AFTER_BACKWARD]:
                self.callbacks.fire(AFTER_BACKWARD, self)
            if state.batch_idx % state.accumulate_grad_batches == 0 or state.batch_idx == state.num_batches:
                if window.samples:
                    self._step()
                else:
                    window.clear()  # every loss of the window was skipped (nan_policy="skip"): no step
            if state.batch_idx % self.log_every_n_steps == 0:
                self._refresh()
        except CancelBatchException:
            self._drop_cancelled_batch()
            self.callbacks.fire(AFTER_CANCEL_BATCH, self)
        if hooks[AFTER_BATCH]:
            self.callbacks.fire(AFTER_BATCH, self)

    def _plain_step_applies(self) -> bool:
        """Whether the next batch may take :meth:`_train_plain_batch`: no window open, none needed (no
        accumulation, no micro-batches, one process), no clipping, NaN losses raise, and no callback that
        could act between its backward and its step."""
        state, hooks = self.state, self._hooks
        return (state.accumulate_grad_batches == 1 and state.micro_batch_size is None and not state.window.batches
                and self.strategy is None and self.gradient_clip_val is None and self.nan_policy == "raise"
                and not hooks[AFTER_BACKWARD] and not hooks[BEFORE_STEP])

    def _train_plain_batch(self, batch: Any) -> None:
        """:meth:`_train_batch` where the window has nothing to do (:meth:`_plain_step_applies`): one loader
        batch is one forward/backward and one step that nothing can cancel once the backward ran, so its
        values are tracked right after the step. The same stages, values and order, without the window's
        bookkeeping: on the peer benchmark's tiny MLP, ~5 µs of the loop's ~20 µs a step. An OOM goes the
        general way (the batch into the window, the recompute with smaller micro-batches)."""
        state, hooks, optimizer = self.state, self._hooks, self.state.optimizer
        inputs, targets = self._count_batch(batch)
        try:
            if hooks[BEFORE_BATCH]:  # a cancel here comes before any backward: nothing to drop
                inputs, targets = self._before_batch(batch, inputs, targets)
            outputs = loss = parts = failed = None
            try:
                outputs, loss, parts = self._forward(inputs, targets, "train_loader")
                state.outputs, state.loss = outputs, loss
                state.precision.backward(loss)
            except OOM_ERRORS as error:
                failed = error
            if failed is not None:  # outside the except block, like the windowed path (see _retry_window)
                del outputs, loss, parts  # this frame's hold on the failed attempt's graph and activations
                state.window.batches.append((inputs, targets, state.batch_idx, state.batch_samples))
                self._retry_window(failed)
                self._step()
            else:
                state.precision.unscale(optimizer)
                self._optimizer_step()
                metrics = state.train_sums.metrics.entries  # plain losses go in undetached: item() needs no detach
                state.train_sums.add(loss, parts, detached(outputs) if metrics else None, targets if metrics else None,
                                     state.batch_samples, state.batch_idx)
                state.global_step += 1
                if hooks[AFTER_STEP]:
                    self.callbacks.fire(AFTER_STEP, self)
                if state.interrupt is not None:
                    self._raise_interrupt()
            if state.batch_idx % self.log_every_n_steps == 0:
                self._refresh()
        except CancelBatchException:  # from before_batch or after_step: no gradient waits to be dropped
            self.callbacks.fire(AFTER_CANCEL_BATCH, self)
        if hooks[AFTER_BATCH]:
            self.callbacks.fire(AFTER_BATCH, self)

    def _before_batch(self, batch: Any, inputs: Any, targets: Any) -> tuple[Any, Any]:
        """Fire before_batch, which may cancel the batch or replace it (``state.batch``): what to train on."""
        self.callbacks.fire(BEFORE_BATCH, self)
        state = self.state
        if state.batch is batch:
            return inputs, targets
        inputs, targets = unpack_batch(state.batch, "train_loader")
        state.batch_samples = batch_size_of(inputs, targets)
        return inputs, targets

    def _count_batch(self, batch: Any) -> tuple[Any, Any]:
        """The fetched batch's inputs and targets; the position moves past it (in samples and batches)."""
        state = self.state
        inputs, targets = unpack_batch(batch, "train_loader")
        samples = state.batch_samples = batch_size_of(inputs, targets)  # the position counts what was fetched
        state.batch, state.batch_idx = batch, state.batch_idx + 1
        state.epoch_samples += samples
        state.samples_seen += samples
        return inputs, targets

    def _close_train_phase(self, epoch_start: float, samples: int) -> None:
        """Step what the window holds (a loader that ran short, or a cancelled phase), record the values."""
        state = self.state
        if state.window.samples:
            self._step()
        self._refresh()
        elapsed = time.perf_counter() - epoch_start
        state.epoch_logs.update({f"train_{k}": v for k, v in state.running.items()})
        state.epoch_logs.update(epoch_time=elapsed, samples_per_s=samples / elapsed if elapsed else 0.0,
                                data_time=state.data_time, compute_time=state.compute_time)

    def _refresh(self) -> None:
        """Read running loss and metrics from the device: a host-device sync, so only every N steps."""
        state = self.state
        bad_batch = state.train_sums.fold(find_nonfinite=self.nan_policy == "raise")
        if bad_batch is not None:
            raise self._nonfinite_loss(bad_batch)
        state.running = state.train_sums.values()

    def _nonfinite_loss(self, bad_batch: int) -> NonFiniteLossError:
        """The error for a NaN/Inf loss first seen in batch ``bad_batch`` of this epoch, naming its step."""
        state = self.state
        acc = state.accumulate_grad_batches
        steps_this_epoch = state.batch_idx // acc + (1 if state.batch_idx % acc and not state.window.samples else 0)
        step = state.global_step - steps_this_epoch + math.ceil(bad_batch / acc)  # the step that used it
        return NonFiniteLossError(state.epoch + 1, step, bad_batch)

    # ------------------------------------------------------------------ stages
    def _with_events(self, stage: str, run: Callable[[], None], on_cancel: Callable[[], None] | None = None) -> None:
        """before_<stage>, the stage, after_cancel_<stage> if it was cancelled, after_<stage>."""
        before, after_cancel, after = STAGE_EVENTS[stage]
        hooks = self._hooks  # event -> the callbacks implementing it: empty events cost one lookup
        try:
            if hooks[before]:
                self.callbacks.fire(before, self)  # a before_ hook may cancel the stage
            run()
        except CANCEL_EXCEPTIONS[stage]:
            if on_cancel is not None:
                on_cancel()
            self.callbacks.fire(after_cancel, self)
        if hooks[after]:
            self.callbacks.fire(after, self)
