"""Callbacks that change training (batch size, loader settings, validation schedule); each says what it changes."""

from adaptrain.callbacks.adaptive.resources import ResourceMonitor
from adaptrain.callbacks.adaptive.validation import AdaptiveTrainScheduling

__all__ = ["AdaptiveTrainScheduling", "ResourceMonitor"]
