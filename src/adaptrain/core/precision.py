"""Precision plugins: "32", "16-mixed" (autocast + GradScaler) and "bf16-mixed" (autocast only).

Each plugin is a handful of small methods the loop calls at fixed points, so the loop itself
never branches on precision.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

PRECISIONS = ("32", "16-mixed", "bf16-mixed")
#: fp32's autocast: nullcontext holds no state, so one instance serves every forward (building one per
#: forward costs an object and a Python call per step).
_NO_AUTOCAST = contextlib.nullcontext()


def precision_support(precision: str, device_type: str, capability: tuple[int, int] | None = None) -> str | None:
    """Why ``precision`` cannot run on this device, or None when it can.

    ``capability`` is the CUDA compute capability. bf16 needs >= 8.0 (Ampere): older GPUs
    report ``torch.cuda.is_bf16_supported() == True`` but only emulate it, slowly.

    Example:
        >>> precision_support("bf16-mixed", "cuda", (7, 5))  # doctest: +ELLIPSIS
        'bf16-mixed was requested but this GPU (compute capability 7.5) has no native bfloat16 support ...'
        >>> precision_support("bf16-mixed", "cpu") is None
        True
    """
    if precision not in PRECISIONS:
        return f'precision is "{precision}"; expected one of "32", "16-mixed", "bf16-mixed".'
    if precision == "32":
        return None
    if device_type == "cuda":
        if precision == "bf16-mixed" and capability is not None and capability < (8, 0):
            return (
                f"bf16-mixed was requested but this GPU (compute capability {capability[0]}.{capability[1]}) "
                'has no native bfloat16 support (it needs >= 8.0, Ampere or newer); use "16-mixed" or "32".'
            )
        return None
    if device_type == "cpu":
        return None  # torch's CPU autocast runs both bfloat16 and float16 (GradScaler("cpu") since 2.3)
    return f'{precision} is not supported on device type "{device_type}"; use "32".'


class Precision:
    """Full fp32: every method is a no-op or the plain PyTorch call."""

    name = "32"
    #: Whether :meth:`autocast` enters a context. fp32's does not, so the loop calls the model without
    #: a ``with`` (two Python calls a step saved); a subclass that overrides ``autocast`` gets True.
    autocasts = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "autocasts" not in cls.__dict__:
            cls.autocasts = cls.autocast is not Precision.autocast

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def autocast(self) -> ContextManager[Any]:
        return _NO_AUTOCAST

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``.grad`` hold true gradients (before clipping or inspecting them)."""

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Run the optimizer step; False when it was skipped (non-finite gradients)."""
        optimizer.step()
        return True

    def cancel_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Forget a step that will not be taken (a callback cancelled it after ``unscale``)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class MixedPrecision(Precision):
    """Autocast to ``dtype``; for float16 also a GradScaler, which skips steps with inf/NaN gradients."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(device)
        self.dtype = dtype
        self.name = "16-mixed" if dtype == torch.float16 else "bf16-mixed"
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        self._unscaled = False
        self._scale: float | None = None  # the scale after the last update, read once per step

    def autocast(self) -> ContextManager[Any]:
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler and not self._unscaled:
            self.scaler.unscale_(optimizer)
            self._unscaled = True

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        if self.scaler is None:
            optimizer.step()
            return True
        # The scale only drops when the step was skipped. Reading it is a host-device sync: the scale
        # after each update is kept, so a step costs one read (after update), not two.
        scale_before = self._scale if self._scale is not None else self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        self._unscaled = False
        self._scale = self.scaler.get_scale()
        return self._scale >= scale_before

    def cancel_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler and self._unscaled:
            # GradScaler refuses a second unscale_ before update(); update() with the recorded inf
            # check is what ends its step, at the cost of one scale adjustment for the dropped step.
            self.scaler.update()
            self._scale = None
        self._unscaled = False

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
            self._scale = None


def resolve_precision(precision: str | Precision, device: torch.device) -> Precision:
    """A plugin instance as it is, or the plugin a name stands for (:func:`build_precision`)."""
    if isinstance(precision, Precision):
        return precision
    return build_precision(str(precision), device)


def build_precision(precision: str, device: torch.device) -> Precision:
    """The plugin for ``precision`` on ``device``; raises ValueError if the device cannot run it."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    reason = precision_support(str(precision), device.type, capability)
    if reason:
        raise ValueError(reason)
    if precision == "32":
        return Precision(device)
    return MixedPrecision(device, torch.float16 if precision == "16-mixed" else torch.bfloat16)
