"""Run configuration: YAML files plus ``key.sub=value`` overrides -> one validated, resolved config.

Built on OmegaConf: the schema below is a structured config, so unknown keys and wrong types are
caught by OmegaConf and re-worded here as one-line :class:`~adaptrain.ConfigError` messages that
name the key, the file (or "command line") and what was expected. ``${oc.env:VAR,default}``
interpolation works in the YAML. Objects are named by import path (``class_path`` / ``init_args``,
the LightningCLI convention); importing and constructing them is :mod:`adaptrain.cli.instantiate`'s job.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.yaml"
    >>> _ = path.write_text("model: {class_path: adaptrain.models.MLP}\\n"
    ...                     "data: {class_path: adaptrain.datasets.digits}\\n")
    >>> config = load_config([path], ["trainer.max_epochs=3"])
    >>> config["trainer"]["max_epochs"], config["optimizer"]["class_path"]
    (3, 'torch.optim.Adam')
    >>> load_config([path], ["trainer.max_epocs=3"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    adaptrain.errors.ConfigError: command line: trainer.max_epocs is not a known key; did you mean ...
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from adaptrain.cli.config_checks import SECTIONS, check_values, container_mismatch, expected_spec, show, translate
from adaptrain.errors import ConfigError


# ---------------------------------------------------------------------- the schema
@dataclass
class ComponentConfig:
    """An object named by import path, built as ``class_path(**init_args)``."""

    class_path: str = MISSING
    init_args: dict[str, Any] | None = field(default_factory=dict)


@dataclass
class OptimizerConfig(ComponentConfig):
    class_path: str = "torch.optim.Adam"  # the model's parameters are passed first


@dataclass
class CriterionConfig(ComponentConfig):
    class_path: str = "torch.nn.CrossEntropyLoss"
    call: bool = True  # false: class_path names the loss function itself (torch.nn.functional.nll_loss)


@dataclass
class SchedulerConfig(ComponentConfig):
    interval: str | None = None  # "step" | "epoch"; default: per step for OneCycleLR/CyclicLR
    monitor: str | None = None  # what ReduceLROnPlateau watches; default val_loss


@dataclass
class DataConfig(ComponentConfig):
    """``class_path`` returns Splits, (train, val[, test]), a dict of loaders or data sets."""

    batch_size: int | None = None  # used when the factory returns data sets or Splits (default 64)
    eval_batch_size: int | None = None
    num_workers: int | None = None
    pin_memory: bool | None = None
    prefetch_factor: int | None = None  # batches each worker loads ahead (torch's default 2)
    persistent_workers: bool | None = None  # keep workers alive between epochs


@dataclass
class TrainerConfig:
    """The arguments of :class:`~adaptrain.Trainer` that a config file may set."""

    max_epochs: int = 1
    precision: str = "32"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    seed: int | None = None  # None: the CLI draws one and records it in the saved config
    device: str = "auto"
    nan_policy: str = "raise"
    compile: bool = False
    log_every_n_steps: int = 20
    progress: bool = True
    fast_dev_run: Any = False  # a dry run: true, or a number of train and val batches
    adaptive_batch_size: Any = None  # null, "safe", "full", or {mode: full, lr_scaling: sqrt, ...}
    micro_batch_size: Any = None  # null, "auto", or samples per micro-batch
    auto_num_workers: bool = False  # tune num_workers / prefetch_factor by measurement, for this run
    strategy: str = "auto"  # several processes (torchrun): "ddp", "fsdp", or "auto" (DDP when world size > 1)
    auto: bool = False  # search precision, batch size, loader, compile... by measurement at fit start, and apply
    channels_last: bool = False  # weights and 4-D inputs in NHWC format (2-D convolutions)


@dataclass
class RunConfig:
    model: ComponentConfig = MISSING
    data: DataConfig = MISSING
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig | None = None
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    metrics: dict[str, Any] = field(default_factory=dict)  # name -> spec, or output -> {name: spec}
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: list[Any] = field(default_factory=list)  # specs
    loggers: Any = None  # list of names/specs, or {name: options}; CSV is always on
    experiment: str = "default"
    run_name: str | None = None  # default: a timestamp
    root_dir: str = "runs"
    ckpt_path: str | None = None  # fit: resume from it; validate/test/predict: weights to load


def _flag_keys() -> tuple[str, ...]:
    """The schema's true/false keys (``trainer.auto``, ``data.pin_memory``, ...)."""
    return tuple(f"{section}.{name}" for section, schema in (("trainer", TrainerConfig), ("data", DataConfig))
                 for name, hint in typing.get_type_hints(schema).items() if hint in (bool, bool | None))


#: OmegaConf turns 2, "yes" or "on" into True for a bool key, silently; the Python API refuses them, so does this.
FLAG_KEYS = _flag_keys()


def check_flags(values: Any, source: str, prefix: str = "") -> None:
    """Raise :class:`ConfigError` for a true/false key set to anything else (an interpolation is resolved
    later); ``values`` sits at dotted ``prefix`` (an override's key).

    Example:
        >>> check_flags({"trainer": {"auto": True, "auto_num_workers": 2}}, "run.yaml")
        Traceback (most recent call last):
        ...
        adaptrain.errors.ConfigError: run.yaml: trainer.auto_num_workers is 2; expected true or false.
    """
    for key, value in flatten(values, prefix).items():
        if key in FLAG_KEYS and not (value is None or isinstance(value, bool) or _interpolation(value)):
            raise ConfigError(key, f"is {show(value)}; expected true or false.", source)


def _interpolation(value: Any) -> bool:
    """``${...}`` (resolved later), or ``???``: OmegaConf's "required, set by a later file or override"."""
    return isinstance(value, str) and (value.strip().startswith("${") or value.strip() == "???")


_OVERRIDE = re.compile(r"^([A-Za-z_][\w-]*(?:\.[\w-]+)*)=(.*)$", re.S)
COMMAND_LINE = "command line"


# ---------------------------------------------------------------------- loading
class Config(dict):
    """The resolved config as plain dicts and lists, which also knows where each key was set."""

    def __init__(self, values: Mapping[str, Any], source_of: Callable[[str], str]) -> None:
        super().__init__(values)
        self.source_of = source_of

    def error(self, error: ConfigError) -> ConfigError:
        """``error`` with the file (or "command line") that set its key, when it names none."""
        if error.source is not None:
            return error
        message = str(error)[len(error.field) + 1:]
        return ConfigError(error.field, message, self.source_of(error.field))


def load_config(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> Config:
    """Merge the schema defaults, each YAML file in turn, then the overrides; validate; resolve.

    Returns plain dicts and lists (interpolations resolved). Raises :class:`ConfigError` naming
    the key and where it was set (a file, or "command line").
    """
    config = OmegaConf.structured(RunConfig)
    raw_files: list[tuple[str, Any]] = []  # (file, its values unresolved): where each key was set
    for path in paths:
        raw = _read_yaml(Path(path))
        raw_files.append((str(path), OmegaConf.to_container(raw, resolve=False)))
        check_flags(raw_files[-1][1], str(path))
        config = _merge(config, raw, str(path))
    override_keys = []
    for item in overrides:
        key, value = _parse_override(item)
        check_flags(value, COMMAND_LINE, prefix=key)
        override_keys.append(key)
        _apply_override(config, key, value)

    def source_of(key: str) -> str:
        """Who set ``key``, or its closest enclosing section: files and/or the command line."""
        parts = key.split(".")
        for depth in range(len(parts), 0, -1):
            prefix = ".".join(parts[:depth])
            if any(prefix == k or prefix.startswith(k + ".") for k in override_keys):
                return COMMAND_LINE  # an override set this key (or a section around it): it wins
            found = [name for name, raw in raw_files if _lookup(raw, prefix) is not _ABSENT][-1:]
            if any(k.startswith(prefix + ".") for k in override_keys):
                found.append(COMMAND_LINE)  # the section comes from a file, part of it from an override
            if found:
                return ", ".join(found)
        return raw_files[-1][0] if raw_files else COMMAND_LINE

    try:
        resolved = OmegaConf.to_container(config, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        key = error.full_key
        section = key.split(".")[0]
        raise ConfigError(key, f'is missing; expected {expected_spec(section)}.', source_of(key)) from None
    except OmegaConfBaseException as error:  # interpolation failures
        key = error.full_key or "(config)"
        raise ConfigError(key, f"could not be resolved: {error.msg.splitlines()[0]}", source_of(key)) from None
    check_values(resolved, source_of)
    return Config(resolved, source_of)  # type: ignore[arg-type]


_ABSENT = object()


def user_config(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """What the user wrote: the files merged, then the overrides, without the schema's defaults and with
    interpolations kept (``adaptrain tune`` writes its choice into this). Call :func:`load_config` first:
    it checks what this does not."""
    merged = OmegaConf.create({})
    for path in paths:
        merged = OmegaConf.merge(merged, _read_yaml(Path(path)))
    for item in overrides:
        key, value = _parse_override(item)
        OmegaConf.update(merged, key, value, merge=isinstance(value, Mapping))
    return OmegaConf.to_container(merged, resolve=False)  # type: ignore[return-value]


def _lookup(tree: Any, key: str) -> Any:
    """The value at dotted ``key`` in plain containers (no interpolation resolved), else _ABSENT."""
    for part in key.split(".") if key else []:
        if isinstance(tree, Mapping) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return _ABSENT
    return tree


def _read_yaml(path: Path) -> DictConfig:
    if not path.exists():
        raise ConfigError("--config", f'is "{path}", which does not exist.')
    if path.is_dir():
        raise ConfigError("--config", f'is "{path}", a directory; expected a YAML file.')
    try:
        raw = OmegaConf.load(path)
    except UnicodeDecodeError:
        raise ConfigError("(file)", "is not a text file; expected YAML.", str(path)) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        raise ConfigError(where, f"is not valid YAML: {error.problem}.", str(path)) from None
    except yaml.YAMLError as error:
        raise ConfigError("(file)", f"is not valid YAML: {error}.", str(path)) from None
    except OSError:  # OmegaConf refuses a file holding one plain value ("5", "text")
        raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, DictConfig):
        raise ConfigError("(top level)", f"is {show(raw)}; expected a mapping of sections "
                          f"({', '.join(RunConfig.__dataclass_fields__)}).", str(path))
    for section in SECTIONS:  # whole-section type errors carry no key in OmegaConf
        value = raw.get(section) if section in raw else _ABSENT
        if value is not _ABSENT and value is not None and not isinstance(value, DictConfig):
            raise ConfigError(section, f"is {show(value)}; expected {expected_spec(section)}.", str(path))
    return raw


def _merge(config: DictConfig, raw: DictConfig, source: str) -> DictConfig:
    # A list where the config has a mapping (or the reverse) is a TypeError in OmegaConf, with no key:
    # found here first, so the message names the key.
    mismatch = container_mismatch(config, OmegaConf.to_container(raw, resolve=False))
    ours, theirs = config.get("loggers"), raw.get("loggers")
    if isinstance(ours, ListConfig) != isinstance(theirs, ListConfig) and None not in (ours, theirs):
        for node in (config, raw):  # a list in one file, a mapping in another: both as mappings, merged
            if isinstance(node.loggers, ListConfig):
                node.loggers = loggers_by_name(OmegaConf.to_container(node.loggers, resolve=False))
    if mismatch:
        key, message = mismatch
        raise ConfigError(key, message, source)
    try:
        return OmegaConf.merge(config, raw)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        value = _lookup(OmegaConf.to_container(raw, resolve=False), error.full_key or "")
        raise translate(error, config, source, None if value is _ABSENT else value) from None


def _parse_override(item: str) -> tuple[str, Any]:
    match = _OVERRIDE.match(item)
    if not match:
        raise ConfigError(f'"{item}"', "is not an override; expected key.sub=value, e.g. trainer.max_epochs=3.",
                          COMMAND_LINE)
    key, text = match.groups()
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]  # YAML typing
    except Exception as error:  # noqa: BLE001 - any parse failure is a bad override
        if isinstance(error, yaml.MarkedYAMLError):  # the parser's message spans lines, with a caret
            reason = " ".join(str(part) for part in (error.problem, error.context) if part)
        else:
            reason = " ".join(str(error).split())
        raise ConfigError(key, f"has a value that is not valid YAML ({text!r}: {reason}); quote a value that is "
                          f"text, e.g. {key}='\"{text}\"'.", COMMAND_LINE) from None
    return key, value


def _apply_override(config: DictConfig, key: str, value: Any) -> None:
    parts = key.split(".")
    if key == "loggers":  # the whole section, replaced: loggers=[] / {} / null turn every optional logger off
        config.loggers = value
        return
    if parts[0] == "loggers" and len(parts) > 1 and not parts[1].isdigit() and isinstance(config.loggers, ListConfig):
        config.loggers = loggers_by_name(OmegaConf.to_container(config.loggers, resolve=False))  # loggers.mlflow=false
    # Setting scheduler.class_path while scheduler is null: build the section from the rest of the key.
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth])
        if OmegaConf.select(config, prefix, default=_ABSENT, throw_on_resolution_failure=False) is None:
            nested: Any = value
            for part in reversed(parts[depth:]):
                nested = {part: nested}
            key, value = prefix, nested
            break
    try:
        OmegaConf.update(config, key, value, merge=True)
    except OmegaConfBaseException as error:
        raise translate(error, config, COMMAND_LINE, value, key) from None


def loggers_by_name(loggers: list[Any]) -> dict[str, Any]:
    """The list form of ``loggers`` as the mapping form, so ``loggers.<name>=...`` can address an entry.

    Example:
        >>> loggers_by_name(["mlflow", {"tensorboard": {"flush_secs": 5}}, {"class_path": "my.Logger"}])
        {'mlflow': True, 'tensorboard': {'flush_secs': 5}, '2': {'class_path': 'my.Logger'}}
    """
    named: dict[str, Any] = {}
    for index, item in enumerate(loggers):
        if isinstance(item, str) and item not in named:
            named[item] = True
        elif isinstance(item, Mapping) and "class_path" not in item and len(item) == 1:
            (name, options), = item.items()
            named[str(name) if str(name) not in named else str(index)] = options
        else:  # a class_path spec (or a repeated name): kept under its position, as errors name it
            named[str(index)] = item
    return named


# ---------------------------------------------------------------------- output
def to_yaml(config: Mapping[str, Any]) -> str:
    """The config as YAML, sections in schema order."""
    return OmegaConf.to_yaml(OmegaConf.create(dict(config)))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values (list items by index); empty containers are kept as leaves.

    Example:
        >>> flatten({"trainer": {"max_epochs": 3}, "callbacks": [{"class_path": "x"}], "metrics": {}})
        {'trainer.max_epochs': 3, 'callbacks.0.class_path': 'x', 'metrics': {}}
    """
    items = tree.items() if isinstance(tree, Mapping) else enumerate(tree) if isinstance(tree, list) else None
    if items is None or not tree:
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
