"""adaptrain: a PyTorch training engine that tunes itself to the hardware it runs on."""

from adaptrain.callbacks import Callback, CallbackError, EarlyStopping, ProgressBar
from adaptrain.errors import BatchStructureError, ConfigError, MissingExtraError, NonFiniteLossError
from adaptrain.events import (
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    CancelTrainException,
    CancelValidateException,
    Event,
)
from adaptrain.config import load_config
from adaptrain.history import History
from adaptrain.loggers import CSVLogger, Logger, MLflowLogger, TensorBoardLogger
from adaptrain.losses import MultiLoss
from adaptrain.metrics import MetricError
from adaptrain.profiling import ModelProfile, profile
from adaptrain.bench import BenchTable, run_bench
from adaptrain.state import TrainState, seed_everything
from adaptrain.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "BatchStructureError",
    "CSVLogger",
    "Logger",
    "MLflowLogger",
    "TensorBoardLogger",
    "load_config",
    "Callback",
    "CallbackError",
    "CancelBatchException",
    "CancelEpochException",
    "CancelFitException",
    "CancelTrainException",
    "CancelValidateException",
    "ConfigError",
    "EarlyStopping",
    "Event",
    "History",
    "MetricError",
    "MissingExtraError",
    "ModelProfile",
    "BenchTable",
    "MultiLoss",
    "NonFiniteLossError",
    "ProgressBar",
    "TrainState",
    "Trainer",
    "seed_everything",
    "profile",
    "run_bench",
]
