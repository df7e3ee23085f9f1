"""``adaptrain <verb> --devices N``: the torchrun command it builds, its checks, and real runs of it.

The real runs start torchrun with 2 CPU processes (gloo); they check what the CLI owns: one run
folder, one config.yaml, one train.log whose epoch lines appear once, the exit code, the signals.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaptrain import Callback
from adaptrain.cli import launch
from adaptrain.cli.launch import LaunchPlan, strip_launch_flags, torchrun_command
from adaptrain.cli.main import main
from tests.cli_data import base_config, write_config

REPO = Path(__file__).parents[2]


# ---------------------------------------------------------------------- the command (pure)
def test_one_node_runs_torchrun_standalone_with_the_same_arguments_minus_the_launch_flags():
    argv = ["fit", "--config", "a b.yaml", "--devices", "2", "trainer.max_epochs=3", "--debug", "run_name=x"]
    assert torchrun_command(argv, LaunchPlan(devices=2), python="/py") == [
        "/py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "adaptrain.cli.main", "fit", "--config", "a b.yaml", "trainer.max_epochs=3", "--debug", "run_name=x"]


def test_several_nodes_use_a_c10d_rendezvous_hosted_by_node_zero():
    argv = ["fit", "-c", "run.yaml", "--devices=4", "--num-nodes", "2", "--node-rank", "0",
            "--master-addr", "node0", "--master-port=1234", "optimizer.init_args.lr=0.5"]
    command = torchrun_command(argv, LaunchPlan(4, 2, 0, "node0", 1234), python="/py")
    assert command == ["/py", "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "0",
                       "--rdzv_backend", "c10d", "--rdzv_endpoint", "node0:1234", "--rdzv_conf", "is_host=1",
                       "--nproc_per_node", "4", "-m", "adaptrain.cli.main", "fit", "-c", "run.yaml",
                       "optimizer.init_args.lr=0.5"]
    other = torchrun_command(argv, LaunchPlan(4, 2, 1, "fe80::1", 1234), python="/py")
    assert "is_host=0" in other and "[fe80::1]:1234" in other  # node 1 is a client; IPv6 in brackets


def test_abbreviated_launch_flags_are_stripped_and_look_alikes_are_kept():
    argv = ["fit", "--dev", "2", "--num=2", "--no", "1", "--master-a", "h", "-c", "x.yaml",
            "devices=3", "trainer.devices=2", "--new-run"]
    assert strip_launch_flags(argv) == ["fit", "-c", "x.yaml", "devices=3", "trainer.devices=2", "--new-run"]


def test_a_process_under_a_launcher_is_not_relaunched(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not launch.should_launch(LaunchPlan(devices=2))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch.should_launch(LaunchPlan(devices=2)) and not launch.should_launch(LaunchPlan(devices=1))


# ---------------------------------------------------------------------- bad flags: exit 2, one line
@pytest.fixture
def config_file(tmp_path):
    return write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs"))


@pytest.fixture
def no_launch(monkeypatch):
    """Any attempt to start torchrun fails the test: these commands must stop before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("torchrun was started")
    monkeypatch.setattr(launch, "run_forwarding_signals", refuse)


BAD_FLAGS = [
    (["--devices", "0"], '--devices is "0"; expected an integer >= 1'),
    (["--devices", "-1"], '--devices is "-1"'),
    (["--devices", "two"], '--devices is "two"'),
    (["--devices", "2", "--num-nodes", "0"], '--num-nodes is "0"'),
    (["--num-nodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank is 2; expected 0 .. 1"),
    (["--num-nodes", "2", "--node-rank", "-1", "--master-addr", "h"], '--node-rank is "-1"'),
    (["--num-nodes", "2", "--node-rank", "1"], "--master-addr is missing"),
    (["--devices", "2", "--master-addr", "h"], "--master-addr is \"h\", but --num-nodes is 1"),
    (["--num-nodes", "2", "--master-addr", "h", "--master-port", "70000"], "--master-port is 70000"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_launch_flag_exits_2_with_one_line_naming_it(flags, message, config_file, tmp_path, capsys, no_launch):
    code = main(["fit", "--config", str(config_file), *flags])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("adaptrain: error: command line: ") and message in err
    assert not (tmp_path / "runs").exists()


def test_devices_that_contradict_the_launcher_exit_2(config_file, capsys, monkeypatch, no_launch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    code = main(["fit", "--config", str(config_file), "--devices", "2"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "WORLD_SIZE=4" in err, err


def test_a_bad_config_with_devices_exits_2_before_any_process_starts(config_file, tmp_path, capsys, no_launch):
    code = main(["fit", "--config", str(config_file), "--devices", "2", "trainer.max_epocs=3"])
    err = capsys.readouterr().err
    assert code == 2 and "trainer.max_epocs is not a known key" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_the_exit_code_and_a_signal_death_are_forwarded():
    assert launch.run_forwarding_signals([sys.executable, "-c", "raise SystemExit(7)"]) == 7
    killed = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]
    assert launch.run_forwarding_signals(killed) == 143


# ---------------------------------------------------------------------- real runs under torchrun
class RecordRank(Callback):
    """Writes ``rank-<r>.json`` (rank, world size, local rank, run_dir) into ``folder`` at fit start."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def before_fit(self, trainer):
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        record = {"rank": rank, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                  "local_rank": int(os.environ.get("LOCAL_RANK", 0)), "run_dir": str(trainer.run_dir)}
        (self.folder / f"rank-{rank}.json").write_text(json.dumps(record))


def quick_config(root: Path, **sections) -> dict:
    """The tiny config without what costs seconds per process and is not under test here (torchmetrics'
    import, the history plot): each worker imports and builds everything again."""
    return base_config(root, metrics={}, loggers={"csv": {"plot": False}}, **sections)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def adaptrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "adaptrain.cli.main", *args]


def environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": str(REPO)}  # tests.* is importable in every worker


def one_run_folder(root: Path) -> Path:
    folders = [p for p in root.glob("*/*") if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def assert_written_once(folder: Path, epochs: int) -> None:
    assert [p.name for p in folder.glob("config*.yaml")] == ["config.yaml"]
    log = (folder / "train.log").read_text().splitlines()
    for epoch in range(1, epochs + 1):
        assert sum(line.startswith(f"epoch {epoch}/{epochs} ") for line in log) == 1, log
    assert sum(line.startswith("20") and " start fit: " in line for line in log) == 1, log


def ranks(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank-*.json"))]


@pytest.mark.slow
def test_devices_2_runs_two_ranks_with_one_run_folder(tmp_path):
    config = quick_config(tmp_path / "runs", callbacks=[{"class_path": "tests.cli.test_launch.RecordRank",
                                                        "init_args": {"folder": str(tmp_path)}}])
    config_file = write_config(tmp_path / "run.yaml", config)
    done = subprocess.run(adaptrain("fit", "--config", str(config_file), "--devices", "2"),
                          capture_output=True, text=True, env=environment(), cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr
    folder = one_run_folder(tmp_path / "runs")
    assert_written_once(folder, epochs=2)
    assert done.stdout.count("run folder: ") == 1, done.stdout  # rank zero prints
    seen = ranks(tmp_path)
    assert [(r["rank"], r["world_size"]) for r in seen] == [(0, 2), (1, 2)]
    assert {Path(r["run_dir"]).resolve() for r in seen} == {folder.resolve()}  # rank 1 got rank zero's folder


@pytest.mark.slow
def test_two_nodes_simulated_on_one_machine(tmp_path):
    config = quick_config(tmp_path / "runs", callbacks=[{"class_path": "tests.cli.test_launch.RecordRank",
                                                        "init_args": {"folder": str(tmp_path)}}])
    config_file = write_config(tmp_path / "run.yaml", config)
    port = str(free_port())
    nodes = [subprocess.Popen(adaptrain("fit", "--config", str(config_file), "--devices", "1", "--num-nodes", "2",
                                        "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(),
                              cwd=tmp_path)
             for rank in (1, 0)]  # node 1 first: it waits for node 0's rendezvous store
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err for _, err in outputs]
    assert_written_once(one_run_folder(tmp_path / "runs"), epochs=2)
    seen = ranks(tmp_path)
    assert [(r["rank"], r["world_size"], r["local_rank"]) for r in seen] == [(0, 2, 0), (1, 2, 0)]


WAITING_WORKER = """
import os, pathlib, sys, time
pathlib.Path(sys.argv[1], "pid-" + os.environ["RANK"]).write_text(str(os.getpid()))
time.sleep(120)  # until a signal ends it
"""

LAUNCHER = """
import sys
from adaptrain.cli.launch import run_forwarding_signals
sys.exit(run_forwarding_signals(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ctrl_c_on_the_launcher_stops_every_worker(tmp_path):
    """The launcher's forwarding with the real torchrun and two real workers (plain scripts: the
    forwarding, not training, is under test; `fit --devices 2` itself runs in the test above)."""
    worker = tmp_path / "worker.py"
    worker.write_text(WAITING_WORKER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(worker), str(tmp_path)]
    parent = subprocess.Popen([sys.executable, "-c", LAUNCHER, *torchrun], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=environment())
    markers = [tmp_path / "pid-0", tmp_path / "pid-1"]
    for _ in range(2400):  # both workers run (a sync on files, not a time budget)
        if all(m.is_file() and m.read_text() for m in markers) or parent.poll() is not None:
            break
        time.sleep(0.05)
    assert parent.poll() is None, parent.communicate()
    workers = [int(m.read_text()) for m in markers]
    parent.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends to the launcher (its group: itself)
    _, err = parent.communicate(timeout=120)
    assert parent.returncode == 130, err
    assert not [pid for pid in workers if _alive(pid)], err  # torchrun stopped and reaped them


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
