"""Several processes from one command: ``adaptrain <verb> --devices N`` relaunches itself through ``torchrun``.

``--devices N`` (processes on this node, one per GPU) with ``--num-nodes M`` runs::

    python -m torch.distributed.run --standalone --nproc_per_node N -m adaptrain.cli.main <verb> <args>

(one node), or on each of the M nodes, with its own ``--node-rank``::

    python -m torch.distributed.run --nnodes M --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:PORT
        --rdzv_conf is_host=<1 on node 0, else 0> --nproc_per_node N -m adaptrain.cli.main <verb> <args>

``<args>`` are this command's arguments without the launch flags. The rendezvous is torchrun's
recommended c10d one, not the legacy static ``--master_addr/--master_port`` form: it is the form
torchrun documents for several nodes, the one the SLURM script uses too (one form to debug), and the
nodes may start in any order. It ignores ``--node_rank`` (torchrun warns when given one), so the node
rank only says which node hosts the rendezvous store (``is_host``) instead of guessing from host
names, which fails when HOST is an alias, a second network interface, or 127.0.0.1 on one machine.
What it costs: torchrun, not ``--node-rank``, decides which node gets global rank zero, the rank that
writes the run folder, so ``root_dir`` should be on a file system the nodes share (it is on clusters).

The launcher is a plain parent: it starts torchrun as a child in its own process group, forwards
SIGINT / SIGTERM to that group once (torchrun passes them on to the workers and waits for them), and
exits with torchrun's exit code; after a forwarded signal, with 128 + the signal number as a single
process would (torchrun itself exits 1 whenever a worker failed or was stopped). A process that
already runs under a launcher (``WORLD_SIZE`` > 1: torchrun, or srun with torchrun's variables) is
never relaunched: its ``--devices`` must agree with ``WORLD_SIZE`` or it is an error.

Example:
    >>> torchrun_command(["fit", "--config", "run.yaml", "--devices", "2", "trainer.max_epochs=3"],
    ...                  LaunchPlan(devices=2), python="python")  # doctest: +NORMALIZE_WHITESPACE
    ['python', '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
     '-m', 'adaptrain.cli.main', 'fit', '--config', 'run.yaml', 'trainer.max_epochs=3']
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from adaptrain.cli.config import COMMAND_LINE
from adaptrain.distributed import env as distributed
from adaptrain.errors import ConfigError

#: The flags this module consumes; the relaunched command gets everything else.
LAUNCH_FLAGS = ("--devices", "--num-nodes", "--node-rank", "--master-addr", "--master-port")
DEFAULT_PORT = 29500  # torchrun's own default rendezvous port
_FORWARDED = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class LaunchPlan:
    """How many processes, on how many nodes, and where they meet.

    Example:
        >>> LaunchPlan(devices=2, num_nodes=2, master_addr="node0").world_size
        4
    """

    devices: int = 1
    num_nodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = DEFAULT_PORT
    given: bool = False  # --devices or --num-nodes was on the command line

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The launch flags of a run verb (read as text: :func:`launch_plan` checks them, one line each)."""
    group = parser.add_argument_group("several processes (relaunched through torchrun)")
    group.add_argument("--devices", metavar="N", help="processes on this node, one per GPU (default 1: this one)")
    group.add_argument("--num-nodes", metavar="M", help="nodes taking part (default 1); run the command on each")
    group.add_argument("--node-rank", metavar="R", help="this node's index, 0 .. M-1; node 0 hosts the rendezvous")
    group.add_argument("--master-addr", metavar="HOST", help="host name or IP of node 0 (with --num-nodes > 1)")
    group.add_argument("--master-port", metavar="PORT", help=f"its rendezvous port (default {DEFAULT_PORT})")


def launch_plan(args: argparse.Namespace) -> LaunchPlan:
    """The launch flags of ``args`` checked: a bad one raises a :class:`ConfigError` naming it.

    Example:
        >>> launch_plan(argparse.Namespace(devices="2", num_nodes=None, node_rank=None, master_addr=None,
        ...                                master_port=None)).devices
        2
        >>> launch_plan(argparse.Namespace(devices="0", num_nodes=None, node_rank=None, master_addr=None,
        ...                                master_port=None))
        Traceback (most recent call last):
        adaptrain.errors.ConfigError: command line: --devices is "0"; expected an integer >= 1 (processes on this node).
    """
    devices = integer(args.devices, "--devices", 1, "processes on this node", default=1)
    nodes = integer(args.num_nodes, "--num-nodes", 1, "nodes taking part", default=1)
    node_rank = integer(args.node_rank, "--node-rank", 0, "this node's index", default=0)
    if node_rank >= nodes:
        fail("--node-rank", f'is {node_rank}; expected 0 .. {nodes - 1} (--num-nodes is {nodes}).')
    port = integer(args.master_port, "--master-port", 1, "a TCP port", default=DEFAULT_PORT)
    if port > 65535:
        fail("--master-port", f'is {port}; expected a TCP port, 1 .. 65535.')
    address = args.master_addr
    if nodes == 1:
        for flag, value in (("--master-addr", address), ("--master-port", args.master_port)):
            if value is not None:
                fail(flag, f'is {show(value)}, but --num-nodes is 1: one node uses torchrun --standalone (a free '
                      "local port); give it with --num-nodes > 1.")
    elif address is None or not address.strip() or any(c.isspace() for c in address):
        shown = "missing" if address is None else show(address)
        fail("--master-addr", f"is {shown}; expected the host name or IP of the node with --node-rank 0 "
              f"(needed with --num-nodes {nodes}).")
    plan = LaunchPlan(devices, nodes, node_rank, address, port, args.devices is not None or args.num_nodes is not None)
    _check_environment(plan)
    return plan


def integer(text: str | None, flag: str, low: int, what: str, default: int) -> int:
    """``text`` as an integer >= ``low`` (``default`` when None); a ConfigError naming ``flag`` otherwise."""
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        fail(flag, f'is {show(text)}; expected an integer >= {low} ({what}).')
    return value


def fail(flag: str, message: str) -> None:
    """A bad command-line flag: one ConfigError naming it (the CLI exits 2)."""
    raise ConfigError(flag, message, COMMAND_LINE)


def show(value: object) -> str:
    """A value in an error message: quoted, with a newline or tab escaped (the message stays one line)."""
    return json.dumps(str(value), ensure_ascii=False)


def _check_environment(plan: LaunchPlan) -> None:
    """Refuse what would start the wrong number of processes: a --devices that contradicts the
    launcher this process runs under, more processes than GPUs, torchrun in each of several srun tasks."""
    if distributed.launched():
        size = distributed.world_size()
        if plan.given and plan.world_size != size:
            fail("--devices", f"asks for {plan.devices} process(es) x {plan.num_nodes} node(s), but this process "
                  f"already runs under a launcher with WORLD_SIZE={size} (torchrun or srun started it); drop "
                  "--devices / --num-nodes there, the launcher decides.")
        return
    if plan.world_size == 1:
        return
    tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    if tasks > 1 and "SLURM_STEP_ID" in os.environ:
        fail("--devices", f"under srun with {tasks} tasks would start torchrun in each task; run torchrun "
              "inside srun instead (`adaptrain slurm` writes such a script), or srun a single task.")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and plan.devices > gpus:
        fail("--devices", f"is {plan.devices}, but this node has {gpus} CUDA device(s); expected at most {gpus} "
              "(one process per GPU).")


def should_launch(plan: LaunchPlan) -> bool:
    """True when this command has to start torchrun (several processes, not under a launcher yet)."""
    return plan.world_size > 1 and not distributed.launched()


def strip_launch_flags(argv: Sequence[str]) -> list[str]:
    """``argv`` without the launch flags and their values (``--devices 2``, ``--devices=2``, or an
    abbreviation argparse accepted, ``--dev 2``); the overrides and every other argument stay.

    Example:
        >>> strip_launch_flags(["fit", "--devices", "2", "-c", "a.yaml", "--num-nodes=2", "x=1"])
        ['fit', '-c', 'a.yaml', 'x=1']
    """
    kept: list[str] = []
    items = iter(argv)
    for item in items:
        name, has_value, _ = item.partition("=")
        if _launch_flag(name) is None:
            kept.append(item)
        elif not has_value:
            next(items, None)  # the flag's value is the next argument
    return kept


def _launch_flag(name: str) -> str | None:
    if not name.startswith("--") or len(name) < 3:
        return None
    matches = [flag for flag in LAUNCH_FLAGS if flag.startswith(name)]
    return matches[0] if len(matches) == 1 else None


def torchrun_command(argv: Sequence[str], plan: LaunchPlan, python: str = sys.executable) -> list[str]:
    """The argument list that reruns ``argv`` (this command's arguments) under torchrun.

    Example:
        >>> torchrun_command(["fit", "-c", "a.yaml", "--devices", "1", "--num-nodes", "2", "--node-rank", "1",
        ...                   "--master-addr", "10.0.0.1"],
        ...                  LaunchPlan(1, 2, 1, "10.0.0.1"), python="python")  # doctest: +NORMALIZE_WHITESPACE
        ['python', '-m', 'torch.distributed.run', '--nnodes', '2', '--node_rank', '1', '--rdzv_backend', 'c10d',
         '--rdzv_endpoint', '10.0.0.1:29500', '--rdzv_conf', 'is_host=0', '--nproc_per_node', '1',
         '-m', 'adaptrain.cli.main', 'fit', '-c', 'a.yaml']
    """
    command = [python, "-m", "torch.distributed.run"]
    if plan.num_nodes == 1:
        command.append("--standalone")
    else:
        # --node_rank is passed for the record (torchrun's c10d rendezvous warns and ignores it for
        # the ranks); is_host makes node 0 the one that serves the rendezvous store.
        command += ["--nnodes", str(plan.num_nodes), "--node_rank", str(plan.node_rank),
                    "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{_host(plan.master_addr)}:{plan.master_port}",
                    "--rdzv_conf", f"is_host={int(plan.node_rank == 0)}"]
    return [*command, "--nproc_per_node", str(plan.devices), "-m", "adaptrain.cli.main", *strip_launch_flags(argv)]


def _host(address: str | None) -> str:
    address = address or "127.0.0.1"
    return f"[{address}]" if ":" in address and not address.startswith("[") else address  # an IPv6 address


def run_forwarding_signals(command: Sequence[str], env: dict[str, Any] | None = None) -> int:
    """Run ``command`` in its own process group; SIGINT / SIGTERM go to that group; its exit code.

    Its own group: Ctrl-C in a terminal signals the foreground group, which is this process only,
    so the child gets the signal once, from here (twice would make the workers stop without a
    checkpoint: a second signal means "now"). A child killed by a signal, or stopped after one was
    forwarded, gives 128 + the signal number.

    Example:
        >>> run_forwarding_signals([sys.executable, "-c", "raise SystemExit(3)"])
        3
    """
    child = subprocess.Popen(list(command), env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:  # it ended meanwhile
            pass

    main_thread = threading.current_thread() is threading.main_thread()  # only there can handlers be set
    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED} if main_thread else {}
    try:
        code = child.wait()  # retried after each handled signal (PEP 475)
    except BaseException:  # never leave torchrun and its workers running without their parent
        forward(signal.SIGTERM, None)
        child.wait()
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if code < 0:
        return 128 - code
    return 128 + received[0] if received and code != 0 else code


def relaunch(argv: Sequence[str], plan: LaunchPlan) -> int:
    """Run ``argv`` again under torchrun with ``plan``'s processes; torchrun's exit code."""
    return run_forwarding_signals(torchrun_command(argv, plan))
