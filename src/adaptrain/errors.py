"""Errors that name what was wrong, where, and what to do."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad setting, with the path of the field that holds it.

    Example:
        >>> str(ConfigError("trainer.precision", 'is "fp8"; expected one of "32", "16-mixed", "bf16-mixed".'))
        'trainer.precision is "fp8"; expected one of "32", "16-mixed", "bf16-mixed".'
    """

    def __init__(self, field: str, message: str, source: str | None = None) -> None:
        self.field = field
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(f"{prefix}{field} {message}")


class BatchStructureError(TypeError):
    """A loader yielded a batch the trainer cannot split into inputs and targets."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; names the epoch and step where it first appeared."""

    @classmethod
    def from_message(cls, message: str) -> NonFiniteLossError:
        """An error with its own message (validation values, where no batch or step applies)."""
        error = cls.__new__(cls)
        error.epoch = error.step = error.batch_idx = None
        FloatingPointError.__init__(error, message)
        return error

    def __init__(self, epoch: int, step: int, batch_idx: int) -> None:
        self.epoch, self.step, self.batch_idx = epoch, step, batch_idx
        super().__init__(
            f"non-finite loss (NaN or Inf) first seen at epoch {epoch}, batch {batch_idx} "
            f"(optimizer step {step}). Lower the learning rate, clip gradients "
            f"(gradient_clip_val=...), or pass nan_policy='skip' to skip such steps."
        )


class NonFiniteWeightsError(FloatingPointError):
    """A checkpoint was due, but the model's weights hold NaN or Inf: nothing was written."""


class MissingExtraError(ImportError):
    """An optional dependency is not installed; names the install command."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the '{package}' package, which is not installed. "
            f"Install it with: pip install 'adaptrain[{extra}]'"
        )


class CheckpointError(ValueError):
    """A checkpoint could not be saved, read or applied; names the file and what was wrong.

    Example:
        >>> str(CheckpointError("runs/x/last.ckpt", "does not exist."))
        'runs/x/last.ckpt: does not exist.'
    """

    def __init__(self, path: object, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class CallbackError(RuntimeError):
    """An exception raised inside a callback, re-raised with the callback and event named."""


class MetricError(RuntimeError):
    """A metric raised; names the metric and the shapes it was given."""
