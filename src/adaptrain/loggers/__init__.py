"""Loggers: observer callbacks that record runs in the run folder, MLflow and TensorBoard.

Importing this package imports neither mlflow nor tensorboard: each logger imports its library
when it is created, and raises :class:`~adaptrain.MissingExtraError` naming the install command
when the extra is missing.
"""

from adaptrain.loggers.base import Logger, RunInfo
from adaptrain.loggers.csv_logger import CSVLogger
from adaptrain.loggers.mlflow_logger import MLflowLogger
from adaptrain.loggers.tensorboard_logger import TensorBoardLogger

#: The names a config's ``loggers`` section may use instead of a class_path.
BUILTIN_LOGGERS = {
    "csv": "adaptrain.loggers.CSVLogger",
    "mlflow": "adaptrain.loggers.MLflowLogger",
    "tensorboard": "adaptrain.loggers.TensorBoardLogger",
}

__all__ = ["BUILTIN_LOGGERS", "CSVLogger", "Logger", "MLflowLogger", "RunInfo", "TensorBoardLogger"]
