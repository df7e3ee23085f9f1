from adaptrain.callbacks.adaptive.resources import ResourceMonitor
from adaptrain.callbacks.adaptive.validation import AdaptiveTrainScheduling
from adaptrain.callbacks.early_stopping import EarlyStopping
from adaptrain.callbacks.forecast import ForecastCallback
from adaptrain.core.callback import Callback, CallbackError
from adaptrain.core.progress import ProgressBar  # the trainer's default display lives with the loop

__all__ = ["AdaptiveTrainScheduling", "Callback", "CallbackError", "EarlyStopping", "ForecastCallback", "ProgressBar",
           "ResourceMonitor"]
