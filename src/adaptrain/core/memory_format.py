"""Channels-last memory format for convolutional models (``Trainer(channels_last=True)``).

2-D convolutions run faster on NHWC data on many backends (cuDNN's tensor-core kernels, oneDNN on
CPU), but only when both the weights and the activations are NHWC: otherwise each convolution
converts back and forth. :class:`ChannelsLast` converts the model's 4-D parameters once and adds a
forward pre-hook that converts 4-D floating inputs, so the loop, the loaders and the checkpoint
format are untouched (``state_dict`` keys and values are the same; only strides differ). Whether
it pays is measured by ``adaptrain tune``, never assumed: it can be slower (small images, depthwise
convolutions, some CPUs).

Example:
    >>> import torch
    >>> model = torch.nn.Conv2d(3, 4, 3)
    >>> layout = ChannelsLast(model)
    >>> model.weight.is_contiguous(memory_format=torch.channels_last)
    True
    >>> layout.remove(); model.weight.is_contiguous()
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ChannelsLast", "channels_last_applies"]


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(module, nn.Conv2d) for module in model.modules())


def _four_d_inputs(inputs: Any) -> bool:
    if isinstance(inputs, torch.Tensor):
        return inputs.dim() == 4 and inputs.is_floating_point()
    if isinstance(inputs, dict):
        return any(_four_d_inputs(v) for v in inputs.values())
    if isinstance(inputs, (tuple, list)):
        return any(_four_d_inputs(v) for v in inputs)
    return False


def channels_last_applies(model: nn.Module, inputs: Any) -> bool:
    """Whether channels-last can matter: the model has ``nn.Conv2d`` layers and some input is a 4-D float tensor.

    >>> channels_last_applies(torch.nn.Conv2d(1, 1, 1), torch.zeros(2, 1, 4, 4))
    True
    >>> channels_last_applies(torch.nn.Linear(4, 1), torch.zeros(2, 4))
    False
    """
    return _has_conv2d(model) and _four_d_inputs(inputs)


def _to_channels_last(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.contiguous(memory_format=torch.channels_last) if value.dim() == 4 and \
            value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _to_channels_last(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_to_channels_last(v) for v in value)
    return value


def _inputs_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return _to_channels_last(args), _to_channels_last(kwargs)


class ChannelsLast:
    """The model in channels-last format while this object is active; :meth:`remove` puts it back.

    Parameters keep their identity (``Module.to`` replaces ``param.data``), so the optimizer needs nothing.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        model.to(memory_format=torch.channels_last)
        self._handle = model.register_forward_pre_hook(_inputs_hook, with_kwargs=True)

    def remove(self) -> None:
        """Back to the default (contiguous) format, hook removed."""
        self._handle.remove()
        self.model.to(memory_format=torch.contiguous_format)
