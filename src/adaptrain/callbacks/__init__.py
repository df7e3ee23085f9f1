from adaptrain.core.callback import Callback, CallbackError
from adaptrain.callbacks.early_stopping import EarlyStopping
from adaptrain.callbacks.forecast import ForecastCallback
from adaptrain.callbacks.progress import ProgressBar

__all__ = ["Callback", "CallbackError", "EarlyStopping", "ForecastCallback", "ProgressBar"]
