"""TrainState: the one object that callbacks read and adaptive features change.

Everything a checkpoint must hold to resume exactly is listed in :data:`CHECKPOINT_KEYS`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from adaptrain.core.history import History
from adaptrain.core.precision import Precision

#: What a checkpoint contains, and nothing else: model, optimizer, scheduler, grad scaler,
#: counters, history, RNG states, every stateful callback's state, the running epoch's loss and
#: metric sums (mid-epoch checkpoints) and meta (format version, class names, settings).
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "precision", "counters", "history", "rng", "callbacks",
                   "progress", "meta")


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: Precision | None = None
    scheduler: Any = None
    scheduler_interval: str = "epoch"
    max_epochs: int = 1
    accumulate_grad_batches: int = 1
    epoch: int = 0  # epochs completed; the running epoch is epoch + 1 in records
    global_step: int = 0  # optimizer steps taken (skipped AMP steps included)
    batch_idx: int = 0  # train batches fetched in the running epoch
    steps_per_epoch: int | None = None
    history: History = field(default_factory=History)
    epoch_logs: dict[str, Any] = field(default_factory=dict)  # the running epoch's values so far
    running: dict[str, float] = field(default_factory=dict)  # last values read at a refresh point
    should_stop: bool = False
    stop_reason: str | None = None
    skipped_steps: int = 0  # optimizer steps skipped by the grad scaler (inf/NaN gradients)
    skipped_batches: int = 0  # batches with a non-finite loss, under nan_policy="skip"
    step_lr: float | None = None  # the lr of the last optimizer step (per-step schedulers move past it)
    data_time: float = 0.0  # seconds this epoch spent waiting for the train loader
    compute_time: float = 0.0  # seconds this epoch spent in forward/backward/step
    train_loader: Any = None
    val_loader: Any = None
    epoch_start_rng: dict[str, Any] | None = None  # replays the sampler's order on mid-epoch resume
    resume_rng: dict[str, Any] | None = None  # RNG to restore once resumed batches are skipped
    batch: Any = None
    outputs: Any = None
    loss: torch.Tensor | None = None
    exception: BaseException | None = None
    # Set by a callback (the signal handler) to stop fit: the loop raises it after every callback has
    # seen the current after_step / after_epoch, so no logger or progress bar misses that event.
    interrupt: BaseException | None = None

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def counters(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "batch_idx": self.batch_idx,
            "skipped_steps": self.skipped_steps,
            "skipped_batches": self.skipped_batches,
            "step_lr": self.step_lr,
        }

    def load_counters(self, counters: dict[str, Any]) -> None:
        for key, value in counters.items():
            setattr(self, key, value if key == "step_lr" else int(value))


def rng_state() -> dict[str, Any]:
    """The state of every random generator training draws from (python, numpy, torch, CUDA).

    Only tensors, numbers and tuples, so ``torch.load(weights_only=True)`` can read it back.
    """
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.copy()), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy(), np_state["pos"], np_state["has_gauss"],
                         np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
