"""``adaptrain tune``: measure the run's configuration and write ``tuned.yaml`` for ``adaptrain fit``.

The search is :meth:`Trainer.tune <adaptrain.Trainer.tune>`'s; this module maps its choice onto
config keys (:func:`tuned_config`) and writes the file (:func:`write_tuned_yaml`): the run's
resolved config with the chosen values, each changed key preceded by a comment with its measured
reason, and a header that lists the changes that alter the optimisation (batch size, hence LR)
apart from those that only change speed. Nothing is written unless the search ran to the end.

Example:
    >>> tree = {"trainer": {"precision": "32"}, "data": {"batch_size": 32}}
    >>> changes = [("trainer.precision", "32", "bf16-mixed", "1.6x samples/s", False)]
    >>> print(render_yaml(apply_changes(tree, changes), changes, header=["tuned"]))
    # tuned
    trainer:
      # tuned: 32 -> bf16-mixed: 1.6x samples/s
      precision: bf16-mixed
    data:
      batch_size: 32
    <BLANKLINE>
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from adaptrain.cli.config import user_config
from adaptrain.cli.experiment import build
from adaptrain.cli.lr_find import apply_lr_to_config
from adaptrain.core.autotune import TuneReport, tune
from adaptrain.data.loaders import loader_batch_size
from adaptrain.errors import ConfigError

__all__ = ["add_tune_parser", "tuned_config", "apply_changes", "render_yaml", "write_tuned_yaml"]

#: report setting -> config key
CONFIG_KEYS = {"precision": "trainer.precision", "channels_last": "trainer.channels_last",
               "compile": "trainer.compile", "micro_batch_size": "trainer.micro_batch_size",
               "accumulate_grad_batches": "trainer.accumulate_grad_batches", "batch_size": "data.batch_size",
               "num_workers": "data.num_workers", "prefetch_factor": "data.prefetch_factor",
               "pin_memory": "data.pin_memory"}
DATA_OPTIONS = frozenset(("batch_size", "eval_batch_size", "num_workers", "pin_memory", "prefetch_factor",
                          "persistent_workers"))
Change = tuple[str, Any, Any, str, bool]  # (dotted key, before, after, reason, alters the optimisation)


def add_tune_parser(verbs: Any, parents: Sequence[argparse.ArgumentParser], epilog: str) -> argparse.ArgumentParser:
    """The ``tune`` verb of the ``adaptrain`` parser."""
    sub = verbs.add_parser("tune", parents=list(parents), epilog=epilog,
                           help="measure short trials and write tuned.yaml with the fastest configuration")
    sub.add_argument("--budget", type=_seconds, metavar="SECONDS",
                     help="seconds of trials (default: 5%% of the expected run, estimated from the first trial; "
                          "a run too short for that to buy two trials is not tuned)")
    sub.add_argument("--output", metavar="FILE", help="where to write the tuned config (default: tuned.yaml)")
    sub.add_argument("--keep-batch-size", action="store_true",
                     help="change nothing that alters the optimisation (batch size, hence the LR)")
    sub.add_argument("--lr", action="store_true", help="also run the LR finder at the chosen configuration")
    return sub


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0; got {text!r}")
    return value


def run_tune(args: argparse.Namespace, config: dict[str, Any], echo: Any) -> int:
    """Build the run, tune it, print the report, write the tuned config."""
    output = _check_output(Path(args.output or "tuned.yaml"))
    original = user_config(args.config, args.overrides)  # what the user wrote, interpolations and all
    built = build(config, "tune")
    writable = built.loaders.options  # data.* keys the data factory passes on to its loaders
    keep_batch = args.keep_batch_size or "batch_size" not in writable
    tune_loader = {"num_workers", "prefetch_factor"} <= writable
    budget = f"{args.budget:g} s" if args.budget else "5% of the expected run"
    echo(f"adaptrain tune: short measured trials on {config['model']['class_path']} and "
         f"{config['data']['class_path']} (budget: {budget})")
    for name, kept in (("data.batch_size", keep_batch and not args.keep_batch_size),
                       ("data.num_workers / data.prefetch_factor", not tune_loader)):
        if kept:
            echo(f"note: {name} not tuned: {config['data']['class_path']} builds loaders that do not take it "
                 "(set it in data.init_args instead)")
    report = tune(built.trainer, built.loaders.train, budget=args.budget, keep_batch_size=keep_batch, lr=args.lr,
                  tune_loader=tune_loader)
    tree, changes = tuned_config(original, report, writable, loader_batch_size(built.loaders.val))
    write_tuned_yaml(output, tree, changes, report, args.config)
    echo(report.table())
    echo(written_line(output, changes))
    return 0


def written_line(output: Path, changes: Sequence[Change]) -> str:
    """The closing line: the file and the config keys it changed. The table above names settings
    (``lr``); the file holds them under their own keys (``scheduler.init_args.max_lr``, ...).

    Example:
        >>> written_line(Path("tuned.yaml"), [("data.batch_size", 32, 256, "faster", True)])
        'wrote tuned.yaml: 1 change (data.batch_size); train with: adaptrain fit --config tuned.yaml'
    """
    keys = f" ({', '.join(key for key, *_ in changes)})" if changes else ""
    return (f"wrote {output}: {len(changes)} change{'s' if len(changes) != 1 else ''}{keys}; "
            f"train with: adaptrain fit --config {output}")


def _check_output(output: Path) -> Path:
    """Before any trial: a file path whose folder exists (or can be made) and can be written."""
    if output.is_dir():
        raise ConfigError("--output", f"{output} is a folder; expected a file path for the tuned YAML.")
    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ConfigError("--output", f"{output} cannot be written ({folder} is not a writable folder).")
    return output


def tuned_config(config: Mapping[str, Any], report: TuneReport, writable: frozenset = DATA_OPTIONS,
                 eval_batch_size: int | None = None) -> tuple[dict[str, Any], list[Change]]:
    """The config with the report's choice, and the changes as (key, before, after, reason, alters).

    ``writable``: the ``data.*`` options the data factory passes on; ``eval_batch_size``: the val loader's
    batch, pinned when the train batch changes (``data.eval_batch_size`` defaults to ``data.batch_size``)."""
    tree = copy.deepcopy(dict(config))
    changes: list[Change] = []
    for setting, before, after, reason, alters in report.changes():
        if setting == "lr":
            continue
        changes.append((CONFIG_KEYS[setting], before, after, reason, alters))
    workers_changed = report.chosen["num_workers"] != report.original["num_workers"]
    if report.chosen["num_workers"] > 0 and workers_changed and "persistent_workers" in writable:
        changes.append(("data.persistent_workers", _get(tree, "data.persistent_workers"), True,
                        "keep the workers between epochs (respawning them costs start-up every epoch)", False))
    batch_changed = report.chosen["batch_size"] != report.original["batch_size"]
    if batch_changed and eval_batch_size and "eval_batch_size" in writable and \
            _get(tree, "data.eval_batch_size") is None:
        changes.append(("data.eval_batch_size", None, eval_batch_size,
                        "kept as before the batch changed (the val loader was not measured)", False))
    tree = apply_changes(tree, changes)
    changes += _lr_changes(tree, report)
    return tree, changes


def _lr_changes(tree: dict[str, Any], report: TuneReport) -> list[Change]:
    """The LR: the finder's suggestion (OneCycleLR's max_lr, else the optimizer's lr), or the rescaled LR."""
    before, after = report.original["lr"], report.chosen["lr"]
    if after == before:
        return []
    reason = report.reasons.get("lr", "")
    if report.lr_finder is not None and report.lr_finder.get("suggestion") is not None:
        return [(key, old, new, reason, True) for key, old, new in apply_lr_to_config(tree, after)]
    factor = after / before
    changes = []
    for key in ("optimizer.init_args.lr", "scheduler.init_args.max_lr"):
        old = _get(tree, key)
        if key.startswith("optimizer") and old is None:
            old = before  # the optimizer's default, now written out
        if isinstance(old, (int, float)) and not isinstance(old, bool):
            new = float(f"{old * factor:.6g}")
            _set(tree, key, new)
            changes.append((key, old, new, reason, True))
    return changes


def apply_changes(tree: dict[str, Any], changes: Sequence[Change]) -> dict[str, Any]:
    """``tree`` with each change's key set (sections created as needed)."""
    for key, _, after, _, _ in changes:
        _set(tree, key, after)
    return tree


def _get(tree: Mapping[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    *sections, last = key.split(".")
    node = tree
    for part in sections:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


# ---------------------------------------------------------------------- writing
def render_yaml(tree: Mapping[str, Any], changes: Sequence[Change], header: Sequence[str] = ()) -> str:
    """Block YAML of ``tree``, each changed key preceded by ``# tuned: before -> after: reason``."""
    comments = {key: f"tuned: {before} -> {after}: {reason}" if reason else f"tuned: {before} -> {after}"
                for key, before, after, reason, _ in changes}
    lines = [f"# {line}" for line in header]
    lines += _emit(tree, comments, "", 0)
    return "\n".join(lines) + "\n"


def _emit(tree: Mapping[str, Any], comments: Mapping[str, str], prefix: str, indent: int) -> list[str]:
    pad, lines = " " * indent, []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if path in comments:
            lines += [f"{pad}# {part}" for part in textwrap.wrap(comments[path], 110 - indent)]
        if isinstance(value, Mapping) and value:
            lines.append(f"{pad}{key}:")
            lines += _emit(value, comments, path + ".", indent + 2)
        elif isinstance(value, list) and value and any(isinstance(v, (Mapping, list)) for v in value):
            block = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False).rstrip("\n")
            lines += [pad + line for line in block.splitlines()]
        else:
            lines.append(f"{pad}{key}: {_flow(value)}")
    return lines


def _flow(value: Any) -> str:
    """One value in flow style (``'32'``, ``[128, 64]``, ``{mode: min}``, ``null``)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**6, sort_keys=False).strip()[1:-1]


def write_tuned_yaml(path: Path, tree: Mapping[str, Any], changes: Sequence[Change], report: TuneReport,
                     sources: Sequence[str]) -> Path:
    """Write the tuned config atomically (a temporary file renamed: never half a file)."""
    speed = f"{report.speedup:.2f}x the original's samples/s" if report.speedup else "speedup not measured"
    header = [f"Written by `adaptrain tune` from {', '.join(map(str, sources))}: {speed}, "
              f"{len(report.trials)} trials in {report.seconds:.1f} s.",
              "Changes that alter the optimisation (batch size, hence LR):"]
    header += [f"  {key}: {before} -> {after}" for key, before, after, _, alters in changes if alters] or ["  none"]
    header.append("Changes that only change speed:")
    header += [f"  {key}: {before} -> {after}" for key, before, after, _, alters in changes if not alters] or \
        ["  none"]
    text = render_yaml(tree, changes, header)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
