"""``adaptrain lr-find``: the LR finder on a config's model and data; prints the suggestion, writes the plot.

    adaptrain lr-find --config run.yaml [--output lr_find.png] [--min-lr 1e-7] [--max-lr 10]
                      [--num-steps 100] [--rule valley|steepest|minimum] [key.sub=value ...]

The sweep is :meth:`Trainer.lr_find <adaptrain.Trainer.lr_find>`'s, on the config's train loader;
the model and everything else come out of it unchanged, and nothing but the plot is written (after
the sweep, so a bad flag or config leaves nothing behind). The suggestion is printed with the
override that trains with it (:func:`apply_lr_to_config`: a OneCycleLR's ``max_lr``, else the
optimizer's ``lr``). Exit codes as for the other verbs; 1 when the curve gives no suggestion (the
plot is still written, to see why).

Example:
    >>> config = {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}},
    ...           "scheduler": {"class_path": "torch.optim.lr_scheduler.OneCycleLR", "init_args": {"max_lr": 0.1}}}
    >>> apply_lr_to_config(config, 0.0312345678)
    [('scheduler.init_args.max_lr', 0.1, 0.0312346)]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

from adaptrain.cli.config import COMMAND_LINE
from adaptrain.cli.experiment import build
from adaptrain.errors import ConfigError
from adaptrain.tuning.lr_rules import MIN_STEPS, RULES

__all__ = ["add_lr_find_parser", "apply_lr_to_config", "run_lr_find"]


def add_lr_find_parser(verbs: Any, parents: Sequence[argparse.ArgumentParser], epilog: str) -> argparse.ArgumentParser:
    """The ``lr-find`` verb of the ``adaptrain`` parser (the caller sets its ``run``)."""
    sub = verbs.add_parser("lr-find", parents=list(parents), epilog=epilog,
                           help="sweep the learning rate on the config's model and data; suggest one")
    sub.add_argument("--output", default="lr_find.png", metavar="PNG",
                     help="where to write the plot (default: lr_find.png)")
    sub.add_argument("--min-lr", type=_positive, default=1e-7, metavar="LR", help="first LR of the sweep (1e-7)")
    sub.add_argument("--max-lr", type=_positive, default=10.0, metavar="LR", help="last LR of the sweep (10)")
    sub.add_argument("--num-steps", type=_steps, default=100, metavar="N",
                     help="optimizer steps at most (100; fewer when the loss diverges first)")
    sub.add_argument("--rule", choices=RULES, default="valley", help="how the LR is read off the curve (valley)")
    return sub


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, e.g. 1e-7; got {text!r}")
    return value


def _steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < MIN_STEPS:
        raise argparse.ArgumentTypeError(f"expected an integer >= {MIN_STEPS}; got {text!r}")
    return value


def run_lr_find(args: argparse.Namespace, config: dict[str, Any], echo: Callable[..., None]) -> int:
    """Build the run, sweep, print the suggestion and the override that uses it, write the plot."""
    if args.max_lr <= args.min_lr:
        raise ConfigError("--max-lr", f"is {args.max_lr:g}; expected a value above --min-lr ({args.min_lr:g}).",
                          COMMAND_LINE)
    output = _check_output(Path(args.output))
    built = build(config, "lr-find")  # a measuring verb: no loggers, a train loader
    result = built.trainer.lr_find(built.loaders.train, min_lr=args.min_lr, max_lr=args.max_lr,
                                   num_steps=args.num_steps, rule=args.rule)
    result.plot(output)
    echo(f"lr_find: {result.steps} steps in {result.seconds:.1f} s, lr {result.lrs[0]:.3g} .. {result.lrs[-1]:.3g} "
         f"({result.stop_reason})")
    echo(f"plot: {output}")
    if result.suggestion is None:
        echo(f"no suggestion: {result.reason}")
        return 1
    key, _, new = apply_lr_to_config(copy.deepcopy(dict(config)), result.suggestion)[0]
    echo(f"suggestion: {result.suggestion:.3g}  ({result.reason})")
    echo(f"train with it: adaptrain fit --config {' --config '.join(args.config)} {key}={_yaml_value(new)}")
    return 0


def _check_output(path: Path) -> Path:
    """``--output`` must be a .png file path in a folder that exists or can be made (checked before the sweep)."""
    if path.suffix.lower() != ".png":
        raise ConfigError("--output", f'is "{path}"; expected a .png file path.', COMMAND_LINE)
    if path.is_dir():
        raise ConfigError("--output", f'is "{path}", a folder; expected a .png file path.', COMMAND_LINE)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the nearest folder that exists: the plot creates the rest
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError("--output", f'is "{path}", but {parent} is not a writable folder.', COMMAND_LINE)
    return path


def _yaml_value(value: Any) -> str:
    return "[" + ",".join(f"{v:g}" for v in value) + "]" if isinstance(value, list) else f"{value:g}"


def apply_lr_to_config(config: dict[str, Any], lr: float) -> list[tuple[str, Any, Any]]:
    """Put ``lr`` into a resolved config, in place: a OneCycleLR scheduler's ``init_args.max_lr`` (OneCycleLR
    sets the LR itself, so that is the one that counts), else the optimizer's ``init_args.lr``.

    The value is rounded to 6 significant digits (it is written into YAML for people to read); a list of
    ``max_lr`` (one per param group) is scaled to keep its ratios. Returns ``[(dotted key, old, new)]``
    (``old`` is None when the key was not set).

    Example:
        >>> config = {"optimizer": {"class_path": "torch.optim.Adam"}, "scheduler": None}
        >>> apply_lr_to_config(config, 0.003), config["optimizer"]["init_args"]
        ([('optimizer.init_args.lr', None, 0.003)], {'lr': 0.003})
    """
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"apply_lr_to_config(lr={lr!r}): expected a positive finite number.")
    scheduler = config.get("scheduler")
    if isinstance(scheduler, Mapping) and str(scheduler.get("class_path", "")).endswith("OneCycleLR"):
        section, name, key = scheduler, "max_lr", "scheduler.init_args.max_lr"
    else:
        section, name, key = config.get("optimizer"), "lr", "optimizer.init_args.lr"
        if not isinstance(section, Mapping):
            raise ConfigError("optimizer", "is missing; expected a {class_path: ..., init_args: {lr: ...}} section "
                              "to put the learning rate in.")
    if section.get("init_args") is None:
        section["init_args"] = {}
    old = section["init_args"].get(name)
    if isinstance(old, (list, tuple)) and old and old[0]:
        new: Any = [_round(v * lr / old[0]) for v in old]
    else:
        new = _round(lr)
    section["init_args"][name] = new
    return [(key, old, new)]


def _round(value: float) -> float:
    return float(f"{value:.6g}")
