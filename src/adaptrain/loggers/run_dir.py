"""The run folder: one directory per run, ``<root_dir>/<experiment>/<run_name>/``, and what goes in it.

Layout (every path is a property of :class:`RunDir`, so writers and readers agree on names)::

    runs/<experiment>/<run_name>/
        config.yaml       the resolved config: `adaptrain fit --config` on it reproduces the run
        config.resume-<n>.yaml   the config of the n-th CLI resume into this folder
        history.csv       one row per epoch (History.to_csv), rewritten after every epoch
        history.json      the same records as JSON
        history.png       loss / metric / lr curves (History.plot), written at the end
        train.log         start info, one line per epoch (as the progress bar prints), end info,
                          and the full traceback when the run failed
        mlflow.json       the MLflow run of this folder (a resume continues it)
        checkpoints/      written by ModelCheckpoint through ``trainer.run_dir``
        tensorboard/      event files, when the TensorBoard logger is on
        resources.yaml    ResourceMonitor's recommendations, a config snippet to merge with --config
        adaptations.json  what the trainer changed by itself (batch size, micro-batch, loader), and why
        <verb>.json       results of ``validate`` / ``test``; predictions.pt for ``predict``

Example:
    >>> import tempfile
    >>> run = create_run_dir(tempfile.mkdtemp(), "mnist1d", "baseline")
    >>> run.name, run.config.name
    ('baseline', 'config.yaml')
    >>> create_run_dir(run.root, "mnist1d", "baseline").name  # taken: a suffix keeps runs apart
    'baseline-2'
    >>> create_run_dir(run.root, "mnist1d", "baseline", verb="test").name
    'baseline-test'
    >>> RunDir.at(run.path) == run
    True
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


@dataclass(frozen=True)
class RunDir:
    """Paths of one run's folder (the folder itself exists once :func:`create_run_dir` returned)."""

    root: Path
    experiment: str
    name: str

    @classmethod
    def at(cls, path: str | os.PathLike) -> RunDir:
        """The RunDir of the folder ``path`` (``<root>/<experiment>/<name>``)."""
        path = Path(path)
        return cls(path.parent.parent, path.parent.name, path.name)

    @property
    def path(self) -> Path:
        return self.root / self.experiment / self.name

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def history_csv(self) -> Path:
        return self.path / "history.csv"

    @property
    def history_json(self) -> Path:
        return self.path / "history.json"

    @property
    def plot(self) -> Path:
        return self.path / "history.png"

    @property
    def log(self) -> Path:
        return self.path / "train.log"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def mlflow(self) -> Path:
        """``{"tracking_uri", "experiment_id", "run_id"}`` of the MLflow run recording this folder."""
        return self.path / "mlflow.json"

    def resume_config(self, number: int) -> Path:
        """Where the CLI saves the config of the ``number``-th resume into this folder."""
        return self.path / f"config.resume-{number}.yaml"

    def next_resume_config(self) -> Path:
        """The first ``config.resume-<n>.yaml`` not written yet."""
        number = 1
        while self.resume_config(number).exists():
            number += 1
        return self.resume_config(number)

    @property
    def resources(self) -> Path:
        """ResourceMonitor's recommendations as config keys (``--config resources.yaml`` merges them);
        loggers upload it as an artifact when it exists."""
        return self.path / "resources.yaml"

    @property
    def adaptations(self) -> Path:
        """``history.adaptations``: each change the trainer made by itself, with the numbers behind it."""
        return self.path / "adaptations.json"

    def results(self, verb: str) -> Path:
        """Where ``validate`` / ``test`` write their metrics."""
        return self.path / f"{verb}.json"

    def artifacts(self) -> list[Path]:
        """The files of this run worth uploading to a tracking server, those that exist."""
        candidates = [self.config, self.history_csv, self.history_json, self.plot, self.log, self.resources,
                      self.adaptations, self.results("validate"), self.results("test")]
        return [path for path in candidates if path.is_file()]


def default_run_name(now: datetime | None = None) -> str:
    """A timestamp that sorts in time order, e.g. ``20261125-155622``."""
    return (now or datetime.now()).strftime("%Y%m%d-%H%M%S")


def check_name(name: str) -> str | None:
    """Why ``name`` cannot be a folder name of the run layout, or None when it can.

    Example:
        >>> check_name("lr=0.1"), check_name("../x")
        (None, 'contains characters other than letters, digits and ._=+-, or starts with one of ._=+-')
    """
    if not _SAFE_NAME.match(name):
        return "contains characters other than letters, digits and ._=+-, or starts with one of ._=+-"
    return None


def create_run_dir(root: str | Path, experiment: str, run_name: str | None = None, verb: str = "fit") -> RunDir:
    """Create and return a new run folder; a taken name gets ``-2``, ``-3``, ... appended.

    For ``validate`` / ``test`` / ``predict`` a taken name (the fit run whose saved config is being
    evaluated) becomes ``<name>-<verb>`` first. ``mkdir(exist_ok=False)`` is the claim, so two runs
    started in the same second (or two processes) never share a folder.
    """
    root = Path(root)
    base = run_name or default_run_name()
    (root / experiment).mkdir(parents=True, exist_ok=True)
    for name in _candidates(base, verb):
        run = RunDir(root, experiment, name)
        try:
            run.path.mkdir()
        except FileExistsError:
            continue
        return run
    raise FileExistsError(f"{root / experiment}: no free run name starting with {base!r}.")


def _candidates(base: str, verb: str) -> Iterator[str]:
    """``base``, then (not fitting) ``base-<verb>``, then the last with ``-2``, ``-3``, ... (9,999 tries)."""
    yield base
    stem = base
    if verb != "fit":
        stem = f"{base}-{verb}"
        yield stem
    for number in range(2, 10_000):
        yield f"{stem}-{number}"


@dataclass
class OpenedRun:
    """A run folder as one command opened it: what it created and wrote, to undo a failed start.

    :meth:`discard` removes exactly that, and only while the run has not recorded anything: a
    run that failed before its first optimizer step (its loggers start there) leaves nothing
    behind, while a folder with a ``train.log``, checkpoints or a user's own files is kept. For
    a resumed run folder, only this command's files go, while ``train.log`` has not grown.
    """

    run: RunDir
    resumed: bool = False  # an existing run folder, continued (a CLI resume)
    written: list[Path] = field(default_factory=list)  # files this command wrote
    created: list[Path] = field(default_factory=list)  # folders this command created, outermost first
    log_size: int | None = None  # train.log's size when the command opened the folder

    @property
    def path(self) -> Path:
        return self.run.path

    def remember(self) -> None:
        """Note what the folder holds now (before this command writes to it)."""
        self.log_size = self.run.log.stat().st_size if self.run.log.is_file() else None

    def discard(self) -> bool:
        """Undo the opening if the run recorded nothing; True when this command's traces are gone."""
        folder = self.run.path
        if not folder.is_dir():
            return False
        if self.resumed:
            size = self.run.log.stat().st_size if self.run.log.is_file() else None
            if size != self.log_size:
                return False
        elif any(path not in self.written for path in folder.iterdir()):
            return False
        for path in self.written:
            path.unlink(missing_ok=True)
        for made in reversed(self.created):  # the run folder, then the experiment and root if new
            try:
                made.rmdir()
            except OSError:  # not empty (another run appeared meanwhile) or already gone: keep it
                break
        return True


def open_run_dir(root: str | Path, experiment: str, run_name: str | None = None, verb: str = "fit") -> OpenedRun:
    """:func:`create_run_dir`, remembering which folders were new (for :meth:`OpenedRun.discard`)."""
    root = Path(root)
    new = [folder for folder in (*reversed((root / experiment).parents), root / experiment)
           if folder != Path(".") and not folder.exists()]
    run = create_run_dir(root, experiment, run_name, verb)
    return OpenedRun(run, created=[*new, run.path])
