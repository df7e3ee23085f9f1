"""One optimizer step: the retryable unit the loop (:mod:`adaptrain.core.loop`) takes per window.

Each loader batch of the accumulation window is kept (by reference) in ``state.window`` until its
step is taken; forward and backward run per micro-batch, and what a micro-batch adds to the epoch's
loss and metrics waits in the window too, to be tracked only once the step succeeded. So when a
micro-batch runs out of memory, the window's gradients are dropped and the whole step is recomputed
with smaller micro-batches (:meth:`StepLoop._recompute_window`): nothing is counted twice and no
step is lost. The retry covers the whole window (not one loader batch) because the gradients of its
earlier batches are already mixed into ``.grad``; what it costs is recomputing at most one window
after an OOM.
"""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING, Any

import torch

from adaptrain.core.batching import batch_size_of, detached, split_micro_batches, unpack_batch
from adaptrain.core.evaluation import EvaluationLoop
from adaptrain.core.events import STAGE_EVENTS, CancelStepException

if TYPE_CHECKING:
    from adaptrain.core.state import TrainState

#: The out-of-memory errors a step can recover from, matched by type, never by message text.
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)} - {None})

BEFORE_STEP, AFTER_CANCEL_STEP, AFTER_STEP = STAGE_EVENTS["step"]


class StepLoop(EvaluationLoop):
    """The step's methods; :class:`~adaptrain.core.loop.TrainingLoop` runs them batch by batch."""

    state: TrainState

    # ------------------------------------------------------------------ the window: forward/backward, OOM retry
    def _accumulate_or_recompute(self, inputs: Any, targets: Any, tag: int, batch_samples: int) -> None:
        try:
            self._accumulate(inputs, targets, tag, batch_samples)
            return
        except OOM_ERRORS as error:
            failed = error
        self._retry_window(failed)  # outside the except block, whose exception keeps the frames alive

    def _retry_window(self, error: BaseException) -> None:
        # The traceback's frames hold the failed attempt's activations, which must be freed before the
        # retry (PyTorch FAQ, "OOM handler can't free memory").
        traceback.clear_frames(error.__traceback__)
        self._recompute_window(error)

    def _accumulate(self, inputs: Any, targets: Any, tag: int, batch_samples: int) -> None:
        """Forward and backward of one loader batch, micro-batch by micro-batch, into ``.grad``."""
        state, window = self.state, self.state.window
        unsplit = state.micro_batch_size is None
        if not window.samples:  # the first batch of the window decides (a recompute starts the window again)
            split = not unsplit and batch_samples > state.micro_batch_size
            window.weighted = state.accumulate_grad_batches > 1 or split or self.strategy is not None
            # several ranks: one constant for all (see distributed.strategy: the step's exact mean over ranks)
            window.reference = (state.batch_size or 1) if self.strategy is not None else batch_samples
        if unsplit and self.strategy is None:  # the common case: one forward/backward, no helper
            self._micro_step(inputs, targets, batch_samples, tag)
            return
        micro_batches = (((inputs, targets),) if unsplit
                         else split_micro_batches(inputs, targets, state.micro_batch_size))
        pieces = len(micro_batches)
        for index, (micro_inputs, micro_targets) in enumerate(micro_batches):
            size = batch_size_of(micro_inputs, micro_targets) if pieces > 1 else batch_samples
            if self.strategy is None:
                self._micro_step(micro_inputs, micro_targets, size, tag)
                continue
            closes = tag == 0 or tag % state.accumulate_grad_batches == 0 or tag == state.num_batches
            with self.strategy.gradient_sync(self._forward_model, closes and index == pieces - 1):
                self._micro_step(micro_inputs, micro_targets, size, tag)
            window.synced = closes  # gradients all-reduce only in the window's last backward

    def _micro_step(self, micro_inputs: Any, micro_targets: Any, size: int, tag: int) -> None:
        """Forward and backward of one micro-batch of ``size`` samples; its values wait in the window for the step."""
        state, window = self.state, self.state.window
        outputs, loss, parts = self._forward(micro_inputs, micro_targets, "train_loader")
        state.outputs, state.loss = outputs, loss
        if self.nan_policy == "skip" and not torch.isfinite(loss):  # a sync, paid only in skip mode
            state.skipped_batches += 1
            return
        if state.train_sums.metrics.entries:  # metrics need the outputs at commit; nothing else does
            window.tracked.append((loss.detach(), parts, detached(outputs), micro_targets, size, tag))
        else:
            window.tracked.append((loss.detach(), parts, None, None, size, tag))
        # Weighted by its share of the window's first batch (about 1, so fp16 gradients do not grow
        # with the batch size); _step divides by samples / reference: one big batch's gradient.
        state.precision.backward(loss * (size / window.reference) if window.weighted else loss)
        window.samples += size

    def run_step(self, batch: Any, events: bool = False) -> None:
        """One optimizer step on ``batch`` through the loop's own path (micro-batches, precision, clipping,
        OOM recompute, the step stage). For measuring trials (bench, tune, batch-size search): the step
        counts (``global_step``), the epoch position does not move; wrap it in ``state.snapshot()`` /
        ``state.restore()`` when the model must come out unchanged. The step stage's events fire only with
        ``events=True`` (a trial must not make a logger open a run or a checkpoint be written)."""
        state = self.state
        self.model.train()
        state.optimizer.zero_grad(set_to_none=True)  # a half-accumulated window must not leak into the trial
        inputs, targets = unpack_batch(batch, "batch")
        state.batch, state.batch_samples = batch, batch_size_of(inputs, targets)
        state.window.clear()
        state.window.batches.append((inputs, targets, 0, state.batch_samples))
        self._accumulate_or_recompute(inputs, targets, 0, state.batch_samples)
        if state.window.samples:
            self._step(events=events)

    def _recompute_window(self, error: BaseException) -> None:
        """After an OOM: free what the failed attempt held, let the policy shrink the micro-batch
        (or re-raise), and redo the whole window's forward and backward from zero gradients."""
        state = self.state
        while True:
            state.optimizer.zero_grad(set_to_none=True)
            state.window.samples, state.window.tracked = 0, []
            state.outputs = state.loss = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.on_out_of_memory(error)  # raises when nothing smaller can be tried
            try:
                for inputs, targets, tag, samples in state.window.batches:
                    self._accumulate(inputs, targets, tag, samples)
                return
            except OOM_ERRORS as again:
                error = again
            traceback.clear_frames(error.__traceback__)

    def on_out_of_memory(self, error: BaseException) -> None:
        """Called by the step after an OOM: shrink what the step needs, or raise. Here: raise.

        The adaptive micro-batching of a later feature overrides this (halve ``micro_batch_size``).
        """
        raise error

    def _drop_cancelled_batch(self) -> None:
        """A batch cancelled after its backward but before its step: without accumulation its gradient
        would add to the next batch's (a double step), so it is dropped. With accumulation it stays in
        the window, weighted by its size like any other batch, and a window that ends at a cancelled
        batch still steps there (windows keep their boundaries whatever is cancelled)."""
        state = self.state
        if not state.window.samples:
            return
        if state.accumulate_grad_batches == 1:
            state.optimizer.zero_grad(set_to_none=True)
            state.window.clear()
        elif state.batch_idx % state.accumulate_grad_batches == 0 or state.batch_idx == state.num_batches:
            self._step()

    # ------------------------------------------------------------------ the optimizer step
    def _step(self, events: bool = True) -> None:
        """Gradients of the window made true (averaged, unscaled, clipped), then the step stage."""
        state, window, strategy = self.state, self.state.window, self.strategy
        if strategy is not None and not window.synced:  # the window ended without its synchronised backward
            strategy.all_reduce_gradients(state.optimizer)  # (a loader without len)
        if window.weighted:  # always on several ranks
            factor = (window.reference * strategy.world_size / strategy.step_samples(window.samples)
                      if strategy is not None else window.reference / window.samples)
            grads = [p.grad for group in state.optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch._foreach_mul_(grads, factor)
        state.precision.unscale(state.optimizer)  # before_step sees true gradients; GradScaler.step reuses found_inf
        if self.gradient_clip_val is not None:
            params = [p for group in state.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.gradient_clip_val)
        self._apply_step(events)
        if state.interrupt is not None:
            self._raise_interrupt()

    def _apply_step(self, events: bool) -> None:
        """The step stage: before_step (may cancel it: :meth:`_drop_step`), the optimizer and scheduler
        step, the step's values counted, after_step. The pattern of :meth:`_with_events`, written out
        here (it runs every step); without ``events`` (trials) no event fires and nothing cancels."""
        state, window, hooks = self.state, self.state.window, self._hooks
        try:
            if events and hooks[BEFORE_STEP]:
                self.callbacks.fire(BEFORE_STEP, self)
            self._optimizer_step()
            add = state.train_sums.add
            for tracked in window.tracked:  # the step succeeded: its values count
                add(*tracked)
            window.clear()
            state.global_step += 1
        except CancelStepException:
            if not events:
                raise
            self._drop_step()
            self.callbacks.fire(AFTER_CANCEL_STEP, self)
        if events and hooks[AFTER_STEP]:
            self.callbacks.fire(AFTER_STEP, self)

    def _optimizer_step(self) -> None:
        """The optimizer step, then the scheduler's (not after a step the precision skipped), grads zeroed."""
        state, optimizer = self.state, self.state.optimizer
        state.step_lr = optimizer.param_groups[0]["lr"]
        if not state.precision.step(optimizer):
            state.skipped_steps += 1  # the scheduler must not advance past a step that did not happen
        elif state.scheduler is not None and state.scheduler_interval == "step":
            state.scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def _drop_step(self) -> None:
        """``before_step`` cancelled the step: its gradients and values are dropped."""
        self.state.precision.cancel_step(self.state.optimizer)
        self.state.optimizer.zero_grad(set_to_none=True)
        self.state.window.clear()

    def _raise_interrupt(self) -> None:
        """A callback asked to stop (a signal): raise it once every callback has seen this step or epoch end."""
        if self.state.interrupt is not None:
            error, self.state.interrupt = self.state.interrupt, None
            raise error
