"""Checkpoint files: atomic writes, safe loads, safetensors weights, and checks that a checkpoint fits a run.

This layer knows files and state dicts, not the trainer: what a checkpoint holds is built by
:meth:`adaptrain.TrainState.state_dict` (``core``), which sits above it.
"""

from adaptrain.checkpoint.io import (
                                     CheckpointError,
                                     atomic_write,
                                     link_atomic,
                                     load_checkpoint,
                                     load_weights,
                                     save_weights,
)

__all__ = ["CheckpointError", "atomic_write", "link_atomic", "load_checkpoint", "load_weights", "save_weights"]
