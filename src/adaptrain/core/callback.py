"""The callback base class (a no-op method per event) and the dispatcher that calls callbacks in order."""

from __future__ import annotations

import difflib
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from adaptrain.core.events import Event
from adaptrain.errors import CallbackError, CheckpointError

if TYPE_CHECKING:
    from pathlib import Path

    from adaptrain.core.trainer import Trainer

EVENTS = tuple(event.value for event in Event)


class Callback:
    """Base class of every callback: override methods named after :class:`~adaptrain.Event`.

    Each hook receives the trainer; the training state lives on ``trainer.state``.
    Callbacks run in ascending ``order`` (ties keep the order they were given in); only the hooks a
    callback overrides are called, so the others cost nothing. Observers (progress, history, loggers)
    only read the state; callbacks that change training say so in their docstring. A callback with
    state returns it from :meth:`state_dict`, which checkpoints store under :attr:`state_key`.
    Metrics sent with :meth:`Trainer.log_metrics <adaptrain.Trainer.log_metrics>` reach every
    callback that overrides :meth:`log_metrics` (the loggers).

    Example:
        >>> class PrintLoss(Callback):
        ...     def after_epoch(self, trainer):
        ...         print(trainer.state.history.records[-1]["train_loss"])
    """

    order: int = 0

    # ------------------------------------------------------------------ events (see adaptrain.Event)
    def before_fit(self, trainer: Trainer) -> None: ...
    def after_cancel_fit(self, trainer: Trainer) -> None: ...
    def after_fit(self, trainer: Trainer) -> None: ...
    def before_epoch(self, trainer: Trainer) -> None: ...
    def after_cancel_epoch(self, trainer: Trainer) -> None: ...
    def after_epoch(self, trainer: Trainer) -> None: ...
    def before_train(self, trainer: Trainer) -> None: ...
    def after_cancel_train(self, trainer: Trainer) -> None: ...
    def after_train(self, trainer: Trainer) -> None: ...
    def before_batch(self, trainer: Trainer) -> None: ...
    def after_cancel_batch(self, trainer: Trainer) -> None: ...
    def after_batch(self, trainer: Trainer) -> None: ...
    def after_backward(self, trainer: Trainer) -> None: ...
    def before_step(self, trainer: Trainer) -> None: ...
    def after_cancel_step(self, trainer: Trainer) -> None: ...
    def after_step(self, trainer: Trainer) -> None: ...
    def before_validate(self, trainer: Trainer) -> None: ...
    def after_cancel_validate(self, trainer: Trainer) -> None: ...
    def after_validate(self, trainer: Trainer) -> None: ...
    def exception(self, trainer: Trainer) -> None: ...

    # ------------------------------------------------------------------ not events
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Receive metrics sent with ``trainer.log_metrics`` (loggers write them)."""

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: class name, unique per class."""
        return type(self).__qualname__

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CheckpointSaver(Callback):
    """A callback that writes checkpoints; ``fit(ckpt_path="last")`` resumes from its :meth:`last_path`,
    and the signal handler saves through :meth:`save_now`."""

    def last_path(self, trainer: Trainer) -> Path:
        raise NotImplementedError

    def save_now(self, trainer: Trainer) -> Path:
        """Write the last checkpoint for the current point (a step or epoch boundary); returns its path."""
        raise NotImplementedError


def overrides(callback: Callback, name: str) -> bool:
    """True when ``callback`` implements ``name`` itself (not the base class's no-op)."""
    method = getattr(type(callback), name, None)
    return method is not None and method is not getattr(Callback, name, None)


def misspelled_hooks(callback: Callback) -> list[str]:
    """Methods of ``callback`` that look like a misspelled event, each with the closest event.

    Example:
        >>> class Typo(Callback):
        ...     def after_epoc(self, trainer): ...
        >>> misspelled_hooks(Typo())
        ['Typo.after_epoc is not an event and is never called; did you mean after_epoch?']
    """
    found = []
    for cls in type(callback).__mro__:
        if cls in (Callback, object):
            break
        for name, value in vars(cls).items():
            if name.startswith("_") or name in EVENTS or not callable(value) or hasattr(Callback, name):
                continue
            close = difflib.get_close_matches(name, EVENTS, n=1, cutoff=0.75)
            if close or name.startswith(("before_", "after_")):
                hint = f"; did you mean {close[0]}?" if close else f"; events are: {', '.join(EVENTS)}."
                found.append(f"{type(callback).__name__}.{name} is not an event and is never called{hint}")
    return found


class CallbackList:
    """Holds callbacks sorted by ``order`` and calls, per event, only those that implement it."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks: list[Callback] = []
        self.hooks: dict[str, list[Callback]] = {event: [] for event in EVENTS}  # event -> who implements it
        self._sinks: list[Callback] = []
        for callback in callbacks:
            self.add(callback)

    def __iter__(self):
        return iter(self.callbacks)

    def add(self, callback: Callback) -> None:
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks: expected adaptrain.Callback instances; received {type(callback).__name__}.")
        for problem in misspelled_hooks(callback):
            warnings.warn(problem, stacklevel=3)
        self.callbacks.append(callback)
        self.callbacks.sort(key=lambda cb: cb.order)  # stable: ties keep insertion order
        self.hooks.update({event: [cb for cb in self.callbacks if overrides(cb, event)] for event in EVENTS})
        self._sinks = [cb for cb in self.callbacks if overrides(cb, "log_metrics")]

    def fire(self, event: str, trainer: Trainer) -> None:
        for callback in self.hooks[event]:
            try:
                getattr(callback, event)(trainer)
            except Exception as error:
                if type(error).__module__.startswith("adaptrain"):
                    raise  # Cancel* control flow, or an adaptrain error that already names its cause
                raise CallbackError(f"{type(callback).__name__}.{event} raised {type(error).__name__}: {error}"
                                    ) from error

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        for sink in self._sinks:
            sink.log_metrics(metrics, step)

    def find(self, cls: type) -> list[Callback]:
        return [cb for cb in self.callbacks if isinstance(cb, cls)]

    def describe(self) -> str:
        """Which callbacks run at each event, in order (the wiring, for users to read)."""
        lines = []
        for event in EVENTS:
            names = [type(cb).__name__ for cb in self.hooks[event]]
            if names:
                lines.append(f"{event:<24} {', '.join(names)}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ checkpointed state
    def state_dicts(self) -> dict[str, Any]:
        """``{state_key: state_dict}`` of every callback with state."""
        states: dict[str, Any] = {}
        for callback in self.callbacks:
            state = callback.state_dict()
            if state:
                if callback.state_key in states:
                    raise CheckpointError("checkpoint", f"two callbacks share state_key {callback.state_key!r}; give "
                                          "one of them its own state_key so both states are saved.")
                states[callback.state_key] = state
        return states

    def load_state_dicts(self, states: Mapping[str, Any], source: str = "checkpoint") -> None:
        by_key = {callback.state_key: callback for callback in self.callbacks}
        for key, state in states.items():
            if key in by_key:
                by_key[key].load_state_dict(state)
            else:
                warnings.warn(f"{source}: holds the state of callback {key!r}, which this trainer does not have; "
                              "it is ignored.")
