"""Config checks: OmegaConf's errors re-worded as one line, and the checks its types cannot express.

Every message names the key, what it is, and what was expected (with a close match for typos),
in the house style: ``run.yaml: trainer.precision is "fp8"; expected one of "32", ...``.

Example:
    >>> check_values({"trainer": {"precision": "fp8"}}, lambda key: "run.yaml")
    Traceback (most recent call last):
    ...
    adaptrain.errors.ConfigError: run.yaml: trainer.precision is "fp8"; expected one of "32", "16-mixed", "bf16-mixed".
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigIndexError, ConfigKeyError, OmegaConfBaseException

from adaptrain.core.settings import MAX_COUNT, TRAINER_RULES, check_setting
from adaptrain.errors import ConfigError
from adaptrain.loggers.run_dir import check_name

SECTIONS = ("model", "data", "optimizer", "scheduler", "criterion", "trainer")  # typed by the schema
SPEC_KEYS = ("class_path", "init_args", "call")


def translate(error: OmegaConfBaseException, config: DictConfig, source: str, value: Any,
              key: str | None = None) -> ConfigError:
    """OmegaConf's error -> one line: the key, what it is, what was expected (and a close match)."""
    if isinstance(error, ConfigIndexError) and key:
        parts = key.split(".")
        at = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
        name = ".".join(parts[:at])
        return ConfigError(key, f"does not exist: {name} has no entry {parts[at]}; set the whole list instead, "
                           f"e.g. {name}=[{{class_path: ..., init_args: {{...}}}}].", source)
    key = getattr(error, "full_key", None) or key or "(config)"
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(config, parent_key, default=None) if parent_key else config
    if isinstance(error, (ConfigKeyError, AttributeError)) and isinstance(parent, DictConfig):
        keys = [str(k) for k in parent.keys()]
        close = difflib.get_close_matches(name, keys, n=1, cutoff=0.5)
        hint = f'did you mean "{parent_key + "." if parent_key else ""}{close[0]}"? ' if close else ""
        return ConfigError(key, f"is not a known key; {hint}Expected one of: {', '.join(keys)}.", source)
    expected = _expected_type(parent, name) or _EXPECTED.get(name)
    if expected is not None:
        return ConfigError(key, f"is {show(value)}; expected {expected}.", source)
    return ConfigError(key, f"is {show(value)}; {error.msg.splitlines()[0]}", source)


def _expected_type(parent: Any, name: str) -> str | None:
    if not isinstance(parent, DictConfig):
        return None
    if name in SECTIONS and "trainer" in parent and "callbacks" in parent:  # a whole top-level section
        return expected_spec(name)
    try:
        node = parent._get_node(name)
    except Exception:  # noqa: BLE001 - unknown child: no type to describe
        return None
    return {"IntegerNode": "an integer", "FloatNode": "a number", "BooleanNode": "true or false",
            "StringNode": "a string"}.get(type(node).__name__)


_EXPECTED = {  # containers whose type OmegaConf reports only as "incompatible container types"
    "metrics": "a mapping of name -> {class_path, init_args} (or output -> {name -> spec})",
    "callbacks": "a list of {class_path, init_args} mappings",
    "init_args": "a mapping of argument -> value",
}


def expected_spec(section: str) -> str:
    if section == "trainer":
        return "a mapping of Trainer arguments (max_epochs, precision, ...)"
    examples = {"model": "adaptrain.models.MLP", "data": "adaptrain.datasets.digits"}
    example = examples.get(section, "package.module.Class")
    return f"a mapping with class_path (an import path like {example}) and init_args"


def show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if value is None:
        return "null"
    if isinstance(value, (DictConfig, Mapping)):
        return "a mapping"
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return "a list"
    return repr(value)


def check_values(config: dict[str, Any], source_of: Callable[[str], str]) -> None:
    """Checks OmegaConf's types cannot express: choices, ranges, names, and the spec shapes."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(key, message, source_of(key))

    trainer = config["trainer"]
    for name in TRAINER_RULES:  # the rules Trainer(...) applies, from the one table in core/settings.py
        problem = name in trainer and check_setting(name, trainer[name])
        if problem:
            fail(f"trainer.{name}", f"is {show(trainer[name])}; {problem.replace('None', 'null')}.")
    check_bounds(config, fail)
    check_root_dir(config["root_dir"], fail)
    scheduler = config["scheduler"]
    if scheduler is not None and scheduler["interval"] not in (None, "step", "epoch"):
        fail("scheduler.interval", f'is {show(scheduler["interval"])}; expected "step", "epoch" or null.')
    for name in ("experiment", "run_name"):
        reason = config[name] is not None and check_name(str(config[name]))
        if reason:
            fail(name, f'is {show(config[name])}, which {reason}; it names a folder under root_dir.')
    check_specs(config, fail)
    loggers = config["loggers"]
    if loggers is not None and not isinstance(loggers, (list, Mapping)):
        fail("loggers", f"is {show(loggers)}; expected a list (names or class_path specs) or a mapping "
             "of name -> options, e.g. {mlflow: {}, tensorboard: {}}.")


def check_specs(config: Mapping[str, Any], fail: Callable[[str, str], None]) -> None:
    """Every ``{class_path, init_args}`` spec of the config has that shape: sections, metrics, callbacks."""
    for section in ("model", "data", "optimizer", "criterion", "scheduler"):
        if config[section] is not None:
            check_spec(config[section], section, fail, extra=tuple(config[section].keys()))
    for name, spec in config["metrics"].items():
        if isinstance(spec, Mapping) and "class_path" not in spec:  # output key -> {name: spec}
            for sub_name, sub_spec in spec.items():
                check_spec(sub_spec, f"metrics.{name}.{sub_name}", fail)
        else:
            check_spec(spec, f"metrics.{name}", fail)
    for index, spec in enumerate(config["callbacks"]):
        check_spec(spec, f"callbacks.{index}", fail)


#: Integer settings of the config outside the trainer's rule table (core/settings.py), with what the
#: code can use: (low, high, why high). One table, so it can move next to the trainer's rules.
INTEGER_BOUNDS: dict[str, tuple[int, int, str]] = {
    "data.batch_size": (1, MAX_COUNT, "samples in a batch"),
    "data.eval_batch_size": (1, MAX_COUNT, "samples in a batch"),
    "data.num_workers": (0, 1024, "worker processes"),
    "data.prefetch_factor": (1, 1024, "batches per worker"),
}


def check_bounds(config: Mapping[str, Any], fail: Callable[[str, str], None]) -> None:
    """Each :data:`INTEGER_BOUNDS` key that is set must be an integer within its bounds.

    Example:
        >>> check_bounds({"data": {"num_workers": -1}}, lambda key, message: print(key, message))
        data.num_workers is -1; expected an integer from 0 to 1024 (worker processes).
    """
    for key, (low, high, why) in INTEGER_BOUNDS.items():
        section, name = key.split(".")
        value = (config.get(section) or {}).get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            fail(key, f"is {show(value)}; expected an integer from {low} to {high} ({why}).")


def check_root_dir(root_dir: Any, fail: Callable[[str, str], None]) -> None:
    """``root_dir`` must be a folder or creatable as one: no part of it may be an existing file."""
    path = Path(str(root_dir)).expanduser()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is an existing file" if folder == path else f"is under {folder}, an existing file"
                fail("root_dir", f'is "{root_dir}", which {where}; expected a folder for the runs (created if '
                     "missing), e.g. root_dir=runs.")
            return


def container_mismatch(config: Any, raw: Any, prefix: str = "") -> tuple[str, str] | None:
    """(key, message) for the first place where ``raw`` has a list and ``config`` a mapping, or the
    reverse (what OmegaConf's merge reports as a TypeError naming no key), else None.

    ``loggers`` (a list or a mapping, either is fine) is compared only below its first level.

    Example:
        >>> container_mismatch(OmegaConf.create({"callbacks": [], "metrics": {}}), {"callbacks": {"a": 1}})
        ('callbacks', 'is a mapping; expected a list of {class_path, init_args} mappings.')
    """
    if not isinstance(raw, Mapping) or not isinstance(config, DictConfig):
        return None
    for name, value in raw.items():
        key = f"{prefix}{name}"
        node = config._get_node(name) if key != "loggers" and name in config.keys() else None
        if node is None:
            continue
        if isinstance(node, DictConfig) and node._is_missing() and dataclasses.is_dataclass(node._metadata.ref_type):
            node = OmegaConf.structured(node._metadata.ref_type)  # a section still missing (model, data): its schema
        if isinstance(node, DictConfig) and not node._is_none() and isinstance(value, list):
            wanted = "a mapping"
        elif OmegaConf.is_list(node) and not node._is_none() and isinstance(value, Mapping):
            wanted = "a list"
        else:
            found = container_mismatch(node, value, f"{key}.") if isinstance(value, Mapping) else None
            if found:
                return found
            continue
        expected = _EXPECTED.get(str(name)) or (expected_spec(key) if key in SECTIONS else wanted)
        return key, f"is {show(value)}; expected {expected}."
    return None


def check_spec(spec: Any, key: str, fail: Any, extra: Sequence[str] = ()) -> None:
    """``spec`` must be a mapping with a non-empty ``class_path`` string and a mapping ``init_args``."""
    if not isinstance(spec, Mapping):
        fail(key, f"is {show(spec)}; expected a mapping with class_path and init_args.")
    unknown = [k for k in spec if k not in SPEC_KEYS and k not in extra]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), SPEC_KEYS, n=1, cutoff=0.5)
        hint = f'did you mean "{key}.{close[0]}"? ' if close else ""
        fail(f"{key}.{unknown[0]}", f"is not a known key; {hint}Expected one of: {', '.join(SPEC_KEYS)}.")
    if not isinstance(spec.get("class_path"), str) or not spec["class_path"].strip():
        fail(f"{key}.class_path", f"is {show(spec.get('class_path'))}; expected an import path like "
             "package.module.Class.")
    if spec.get("init_args") is not None and not isinstance(spec["init_args"], Mapping):
        fail(f"{key}.init_args", f"is {show(spec['init_args'])}; expected a mapping of argument -> value.")
