"""One rule table for the trainer's plain settings, used by ``Trainer(...)`` and by the CLI's config checks.

Each rule says what a setting must be, in words a message can quote ("an integer >= 1"). Integers
are bounded by what the code can use (a seed torch accepts, an epoch count a run can reach), so a
typo with 30 digits is an error, not a run that never ends.

Example:
    >>> check_setting("accumulate_grad_batches", 0)
    'expected an integer >= 1'
    >>> check_setting("precision", "bf16-mixed") is None
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from adaptrain.core.batch_options import AdaptiveBatchSize
from adaptrain.core.precision import PRECISIONS
from adaptrain.errors import ConfigError

MAX_EPOCHS = 10**6
MAX_COUNT = 2**31 - 1  # batches, steps: what an int32 counter holds
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer


@dataclass(frozen=True)
class Rule:
    expected: str  # what the value must be, quotable in a message
    accepts: Callable[[Any], bool]
    too_large: tuple[int, str] | None = None  # (limit, why): an upper bound, named only when it is what failed


def _integer(low: int, high: int, why: str) -> Rule:
    return Rule(f"an integer >= {low}", lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high,
                (high, why))


def _choice(*options: str) -> Rule:
    words = ", ".join(f'"{o}"' for o in options)
    return Rule(f"one of {words}" if len(options) > 2 else " or ".join(f'"{o}"' for o in options),
                lambda v: str(v) in options)


def _positive_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)


TRAINER_RULES: dict[str, Rule] = {
    "precision": _choice(*PRECISIONS),
    "accumulate_grad_batches": _integer(1, MAX_COUNT, "a batch count"),
    "max_epochs": _integer(1, MAX_EPOCHS, "more than any run reaches"),
    "log_every_n_steps": _integer(1, MAX_COUNT, "a batch count"),
    "gradient_clip_val": Rule("a positive number or None", _positive_or_none),
    "nan_policy": _choice("raise", "skip"),
    "fast_dev_run": Rule("True, False or a number of batches >= 1",
                         lambda v: isinstance(v, bool) or (isinstance(v, int) and 1 <= v <= MAX_COUNT)),
    "micro_batch_size": Rule('None, "auto" or an integer >= 1', lambda v: v is None or v == "auto" or (
        isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_COUNT)),
    "auto_num_workers": Rule("True or False", lambda v: isinstance(v, bool)),
    "auto": Rule("True or False", lambda v: isinstance(v, bool)),
    "channels_last": Rule("True or False", lambda v: isinstance(v, bool)),
    "strategy": _choice("auto", "ddp", "fsdp"),
    # "safe" / "full", or the options of adaptrain.AdaptiveBatchSize (checked field by field there)
    "adaptive_batch_size": Rule('None, "safe", "full" or a mapping of AdaptiveBatchSize options',
                                lambda v: v is None or v in ("safe", "full") or isinstance(v, Mapping)
                                or isinstance(v, AdaptiveBatchSize)),
    "seed": Rule(f"an integer from 0 to {MAX_SEED} or None",
                 lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED)),
}


def check_setting(name: str, value: Any) -> str | None:
    """Why ``value`` is not valid for the trainer setting ``name`` ("expected ..."), or None."""
    rule = TRAINER_RULES[name]
    if rule.accepts(value):
        return None
    if rule.too_large and isinstance(value, int) and value > rule.too_large[0]:
        return f"expected an integer <= {rule.too_large[0]} ({rule.too_large[1]})"
    return f"expected {rule.expected}"


def check_trainer_settings(**values: Any) -> None:
    """Raise a :class:`~adaptrain.ConfigError` (a ValueError) naming the first invalid setting.

    ``error.field`` is the setting's name, so the CLI can report it as ``trainer.<name>``.
    """
    for name, value in values.items():
        problem = check_setting(name, value)
        if problem:
            raise setting_error(name, value, problem + ".")


def setting_error(name: str, value: Any, message: str) -> ConfigError:
    """``Trainer(name=value): message`` as a ConfigError whose ``field`` is the setting's name."""
    shown = f'"{value}"' if isinstance(value, str) else repr(value)
    error = ConfigError(f"Trainer({name}={shown}):", message)
    error.field = name
    return error
