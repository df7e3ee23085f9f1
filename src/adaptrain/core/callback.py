"""The callback base class and the dispatcher that calls callbacks in order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from adaptrain.core.events import Event

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer


class Callback:
    """Base class of every callback: override methods named after :class:`~adaptrain.Event`.

    Each hook receives the trainer; the training state lives on ``trainer.state``.
    Callbacks run in ascending ``order`` (ties keep the order they were given in).
    Observers (progress, history, loggers) only read the state; callbacks that change training
    say so in their docstring. A callback with state returns it from :meth:`state_dict`, which
    checkpoints store under :attr:`state_key`.

    Example:
        >>> class PrintLoss(Callback):
        ...     def after_epoch(self, trainer):
        ...         print(trainer.state.history.records[-1]["train_loss"])
    """

    order: int = 0

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


def overrides(callback: Callback, event: str) -> bool:
    """True when ``callback`` implements ``event`` itself (not the base class's no-op)."""
    method = getattr(type(callback), event, None)
    return method is not None and method is not getattr(Callback, event, None)


class CallbackError(RuntimeError):
    """An exception raised inside a callback, re-raised with the callback and event named."""


class CallbackList:
    """Holds callbacks sorted by ``order`` and calls, per event, only those that implement it."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks: list[Callback] = []
        self._by_event: dict[str, list[Callback]] = {event.value: [] for event in Event}
        for callback in callbacks:
            self.add(callback)

    def add(self, callback: Callback) -> None:
        if not isinstance(callback, Callback):
            raise TypeError(
                f"callbacks: expected adaptrain.Callback instances; received {type(callback).__name__}."
            )
        self.callbacks.append(callback)
        self.callbacks.sort(key=lambda cb: cb.order)  # stable: ties keep insertion order
        self._by_event = {
            event.value: [cb for cb in self.callbacks if overrides(cb, event.value)] for event in Event
        }

    def fire(self, event: str, trainer: "Trainer") -> None:
        for callback in self._by_event[event]:
            try:
                getattr(callback, event)(trainer)
            except Exception as error:
                if type(error).__module__.startswith("adaptrain"):
                    raise  # Cancel* control flow, or an adaptrain error that already names its cause
                raise CallbackError(
                    f"{type(callback).__name__}.{event} raised {type(error).__name__}: {error}"
                ) from error

    def find(self, cls: type) -> list[Callback]:
        return [cb for cb in self.callbacks if isinstance(cb, cls)]

    def describe(self) -> str:
        """Which callbacks run at each event, in order (the wiring, for users to read)."""
        lines = []
        for event in Event:
            names = [type(cb).__name__ for cb in self._by_event[event.value]]
            if names:
                lines.append(f"{event.value:<24} {', '.join(names)}")
        return "\n".join(lines)
