"""adaptrain: a PyTorch training engine that tunes itself to the hardware it runs on."""

from adaptrain.callbacks import AdaptiveTrainScheduling, EarlyStopping, ForecastCallback, ProgressBar, ResourceMonitor
from adaptrain.callbacks.checkpointing import ModelCheckpoint
from adaptrain.callbacks.signals import SignalHandler, TrainingInterrupted
from adaptrain.checkpoint.io import load_checkpoint, load_weights, save_weights
from adaptrain.cli.config import load_config
from adaptrain.core.autotune import TuneReport
from adaptrain.core.batch_options import AdaptiveBatchSize
from adaptrain.core.callback import Callback
from adaptrain.core.events import (
                              CancelBatchException,
                              CancelEpochException,
                              CancelFitException,
                              CancelStepException,
                              CancelTrainException,
                              CancelValidateException,
                              Event,
)
from adaptrain.core.history import History
from adaptrain.core.losses import MultiLoss
from adaptrain.core.lr_finder import LRFinderResult
from adaptrain.core.resume import save_checkpoint
from adaptrain.core.state import TrainState, seed_everything
from adaptrain.core.trainer import Trainer
from adaptrain.errors import (
                              BatchStructureError,
                              CallbackError,
                              CheckpointError,
                              ConfigError,
                              MetricError,
                              MissingExtraError,
                              NonFiniteLossError,
)
from adaptrain.loggers import CSVLogger, Logger, MLflowLogger, TensorBoardLogger
from adaptrain.profiling.bench import BenchTable, run_bench
from adaptrain.profiling.profile import ModelProfile, profile
from adaptrain.tuning.forecasting import Forecast, ForecastError, forecast

__version__ = "0.1.0"

__all__ = [
    "AdaptiveBatchSize",
    "AdaptiveTrainScheduling",
    "BatchStructureError",
    "CSVLogger",
    "Logger",
    "LRFinderResult",
    "MLflowLogger",
    "TensorBoardLogger",
    "load_config",
    "Callback",
    "CallbackError",
    "CheckpointError",
    "CancelBatchException",
    "CancelEpochException",
    "CancelFitException",
    "CancelStepException",
    "CancelTrainException",
    "CancelValidateException",
    "ConfigError",
    "EarlyStopping",
    "Forecast",
    "ForecastCallback",
    "ForecastError",
    "Event",
    "History",
    "MetricError",
    "ModelCheckpoint",
    "MissingExtraError",
    "ModelProfile",
    "BenchTable",
    "MultiLoss",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "ProgressBar",
    "ResourceMonitor",
    "SignalHandler",
    "TrainState",
    "TrainingInterrupted",
    "Trainer",
    "TuneReport",
    "seed_everything",
    "forecast",
    "load_checkpoint",
    "load_weights",
    "profile",
    "run_bench",
    "save_checkpoint",
    "save_weights",
]
