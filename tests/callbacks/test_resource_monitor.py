"""ResourceMonitor on real CPU runs (a data-bound and a compute-bound one), its loggers, its
resources.yaml merged through the real CLI, and its pure parts (windows, the printed block)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from adaptrain import Callback, ResourceMonitor, Trainer
from adaptrain.callbacks.adaptive.resources import RESOURCES_FILE
from adaptrain.callbacks.adaptive.sampling import format_block, metric_values, summarize, verdict
from adaptrain.cli.main import main
from adaptrain.loggers import CSVLogger
from adaptrain.loggers.run_dir import RunDir
from adaptrain.tuning.bottleneck import BOTTLENECKS, Recommendation, name_bottleneck
from tests.cli_data import base_config, write_config

GPU_FIELDS = {"gpu_util", "memory_fraction", "gpu_memory_gb", "transfer_time", "transfer_share", "mfu"}


class CostlyDataset(Dataset):
    """Each sample costs real CPU (repeated matrix products, like decoding and augmenting), and the
    model on it is tiny: nearly all of a step is waiting for data."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int):
        a = np.random.default_rng(index).standard_normal((90, 90))
        for _ in range(4):
            a = np.tanh(a @ a.T / 90)
        return torch.tensor(a[0, :8], dtype=torch.float32), torch.tensor([float(index % 2)])


def costly_data():
    """A data factory for the CLI: a data set, so the data section's loader options apply to it."""
    return CostlyDataset()


def costly_loaders():
    """A data factory that returns its own loader: the CLI refuses data.num_workers for it."""
    return DataLoader(CostlyDataset(), batch_size=8)


def linear_trainer(callbacks, epochs=1, **kwargs):
    model = nn.Linear(8, 1)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), nn.MSELoss(), max_epochs=epochs,
                   callbacks=callbacks, seed=0, **kwargs)


def data_bound_fit(monitor, epochs=1, extra=(), **kwargs):
    trainer = linear_trainer([monitor, *extra], epochs=epochs, **kwargs)
    trainer.fit(DataLoader(CostlyDataset(), batch_size=8, num_workers=0))
    return trainer


# ---------------------------------------------------------------------- verdicts on real runs
def test_a_data_bound_run_is_named_data():
    monitor = ResourceMonitor(every_n_steps=2, summary=False)
    trainer = data_bound_fit(monitor, progress=False)
    assert monitor.bottleneck == "data", monitor.verdict
    assert monitor.verdict.reason.startswith("data-bound: data wait")
    # the windows add up to the loop's own totals (the last one closes the epoch)
    record = trainer.state.history.records[-1]
    assert monitor.summary["data_time"] == pytest.approx(record["data_time"])
    assert monitor.summary["compute_time"] == pytest.approx(record["compute_time"])
    assert monitor.summary["samples"] == 32 and monitor.summary["batches"] == 4
    assert monitor.recommendations["data.num_workers"].value >= 1  # the loader ran with 0


def test_a_compute_bound_run_is_named_compute():
    monitor = ResourceMonitor(every_n_steps=2, summary=False)
    model = nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 512))
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=1e-3), nn.MSELoss(), callbacks=[monitor],
                      progress=False, seed=0)
    x, y = torch.randn(256, 512), torch.randn(256, 512)
    trainer.fit([(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)])  # trivial data: batches made already
    assert monitor.bottleneck == "compute", monitor.verdict
    assert monitor.verdict.reason.startswith("compute-bound")
    assert monitor.recommendations == {}  # on the CPU: no precision, and no GPU figure to grow the batch for


def test_cpu_runs_have_no_gpu_fields_even_with_flops_given(capsys):
    monitor = ResourceMonitor(every_n_steps=1, flops_per_sample=1e6, peak_flops=1e12)
    trainer = data_bound_fit(monitor, progress=False)
    for figures in (monitor.summary, *monitor.epochs):
        assert not GPU_FIELDS & set(figures)
        assert {"cpu_percent", "process_cpu_percent", "ram_gb", "ram_fraction", "samples_per_s"} <= set(figures)
    assert not any(key.startswith("resource_gpu") or key == "resource_mfu" for key in trainer.state.history.keys)
    out = capsys.readouterr().out
    assert "resources, epoch 1/1" in out and "bottleneck: data-bound" in out and "gpu:" not in out


def test_the_block_is_plain_text_through_the_progress_bar_on_a_non_tty(capsys):
    data_bound_fit(ResourceMonitor(every_n_steps=2), epochs=2, progress=True)
    out = capsys.readouterr().out
    assert out.count("bottleneck: data-bound") == 2 and "\x1b[" not in out  # no colour codes off a terminal
    assert "recommend data.num_workers:" in out


class FakeTuner(Callback):
    """Records an adjustment the way the loader tuner does (history.adaptations), once."""

    def after_train(self, trainer):
        history = trainer.state.history
        if trainer.state.epoch == 0:
            history.adaptations = [*getattr(history, "adaptations", []), {
                "kind": "num_workers", "before": 0, "after": 2, "reason": "data wait 95%", "epoch": 1, "step": 4}]


def test_the_tuners_adjustments_are_shown_once(capsys):
    data_bound_fit(ResourceMonitor(every_n_steps=2), epochs=2, extra=[FakeTuner()], progress=False)
    out = capsys.readouterr().out
    assert out.count("tuner: num_workers 0 -> 2 (data wait 95%)") == 1


@pytest.mark.gpu
def test_on_cuda_a_slow_loader_is_named_data_with_the_gpu_fields(capsys):
    warm = torch.ones(8, 8, device="cuda", requires_grad=True)  # cuBLAS's one-off start-up is not the run's compute
    (warm @ warm).sum().backward()
    monitor = ResourceMonitor(every_n_steps=2, flops_per_sample=1e3, peak_flops=1e12)
    trainer = data_bound_fit(monitor, epochs=2, progress=False, device="cuda")
    assert monitor.bottleneck == "data", monitor.verdict
    assert {"memory_fraction", "transfer_time", "transfer_share", "mfu"} <= set(monitor.summary)
    assert monitor.summary["transfer_time"] <= monitor.summary["compute_time"]
    try:
        import pynvml  # noqa: F401
    except ImportError:
        pass
    else:
        assert {"gpu_util", "gpu_memory_gb"} <= set(monitor.summary), "NVML fields missing"
    assert "resource_gpu_memory_percent" in trainer.state.history.keys
    assert "  gpu: " in capsys.readouterr().out
    assert monitor.recommendations["data.pin_memory"].value is True  # the loader did not pin


# ---------------------------------------------------------------------- loggers and the run folder
def test_metrics_reach_the_csv_and_resources_yaml_is_written(tmp_path):
    folder = tmp_path / "exp" / "run"
    monitor = ResourceMonitor(every_n_steps=2, summary=False)
    data_bound_fit(monitor, epochs=2, extra=[CSVLogger(run_dir=folder, plot=False)], progress=False)
    rows = (folder / "history.csv").read_text().splitlines()
    columns = rows[0].split(",")
    assert {"resource_data_share", "resource_cpu_percent", "resource_ram_gb"} <= set(columns) and len(rows) == 3
    share = float(rows[1].split(",")[columns.index("resource_data_share")])
    assert share == pytest.approx(monitor.epochs[0]["data_share"])
    assert monitor.path == folder / RESOURCES_FILE == RunDir.at(folder).resources
    assert monitor.path.read_text() == monitor.yaml
    assert yaml.safe_load(monitor.yaml) == {"data": {"num_workers": monitor.recommendations["data.num_workers"].value}}


def test_metrics_and_the_snippet_reach_mlflow(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from adaptrain.loggers import MLflowLogger
    from tests.cli_data import mlflow_store

    uri = mlflow_store(tmp_path / "mlflow.db")
    logger = MLflowLogger(tracking_uri=uri, log_system_metrics=False)
    data_bound_fit(ResourceMonitor(every_n_steps=2, summary=False), epochs=2,
                   extra=[CSVLogger(run_dir=tmp_path / "exp" / "run", plot=False), logger], progress=False)
    client = MlflowClient(uri)
    # per window at the optimizer step (4 batches an epoch, every 2), per epoch at the epoch
    assert [m.step for m in client.get_metric_history(logger.run_id, "resource_data_share_step")] == [2, 4, 6, 8]
    assert [m.step for m in client.get_metric_history(logger.run_id, "resource_data_share")] == [1, 2]
    assert client.get_metric_history(logger.run_id, "resource_ram_gb_step")[0].value > 0.01  # torch is loaded
    assert RESOURCES_FILE in {a.path for a in client.list_artifacts(logger.run_id)}


def test_without_a_run_folder_the_snippet_stays_on_the_callback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monitor = ResourceMonitor(every_n_steps=2, summary=False)
    data_bound_fit(monitor, progress=False)
    assert monitor.path is None and "num_workers:" in monitor.yaml and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- the CLI: the snippet merges as it is
def _fit(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_resources_yaml_merges_through_the_cli(tmp_path, capsys):
    monitor_spec = {"class_path": "adaptrain.ResourceMonitor", "init_args": {"every_n_steps": 2}}
    config = base_config(tmp_path / "runs", model={"class_path": "torch.nn.Linear",
                                                   "init_args": {"in_features": 8, "out_features": 1}},
                         data={"class_path": "tests.callbacks.test_resource_monitor.costly_data",
                               "batch_size": 8, "num_workers": 0},
                         criterion={"class_path": "torch.nn.MSELoss"}, metrics={}, callbacks=[monitor_spec])
    config["trainer"]["max_epochs"] = 1
    run_yaml = write_config(tmp_path / "run.yaml", config)
    out = _fit(["fit", "--config", run_yaml, "run_name=first"], capsys)
    snippet = tmp_path / "runs/tiny/first" / RESOURCES_FILE
    assert "bottleneck: data-bound" in out and f"recommendations in {snippet}" in out
    workers = yaml.safe_load(snippet.read_text())["data"]["num_workers"]
    assert workers >= 1
    _fit(["fit", "--config", run_yaml, "--config", snippet, "run_name=second"], capsys)
    saved = yaml.safe_load((tmp_path / "runs/tiny/second/config.yaml").read_text())
    assert saved["data"]["num_workers"] == workers and saved["callbacks"] == [monitor_spec]


def test_a_factory_with_its_own_loaders_gets_no_data_keys(tmp_path, capsys):
    config = base_config(tmp_path / "runs", model={"class_path": "torch.nn.Linear",
                                                   "init_args": {"in_features": 8, "out_features": 1}},
                         data={"class_path": "tests.callbacks.test_resource_monitor.costly_loaders"},
                         criterion={"class_path": "torch.nn.MSELoss"}, metrics={},
                         callbacks=[{"class_path": "adaptrain.ResourceMonitor"}])
    config["trainer"]["max_epochs"] = 1
    run_yaml = write_config(tmp_path / "run.yaml", config)
    assert "bottleneck: data-bound" in _fit(["fit", "--config", run_yaml, "run_name=first"], capsys)
    snippet = tmp_path / "runs/tiny/first" / RESOURCES_FILE
    assert yaml.safe_load(snippet.read_text()) == {}  # data.num_workers would make the CLI refuse the merge
    _fit(["fit", "--config", run_yaml, "--config", snippet, "run_name=second"], capsys)


# ---------------------------------------------------------------------- options
@pytest.mark.parametrize("kwargs, name", [
    ({"every_n_steps": 0}, "every_n_steps"), ({"every_n_steps": 2.5}, "every_n_steps"),
    ({"every_n_steps": True}, "every_n_steps"), ({"flops_per_sample": 0}, "flops_per_sample"),
    ({"flops_per_sample": "1e9"}, "flops_per_sample"), ({"peak_flops": math.nan}, "peak_flops"),
    ({"peak_flops": -1.0}, "peak_flops"), ({"summary": "yes"}, "summary"),
])
def test_bad_options_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^ResourceMonitor\({name}="):
        ResourceMonitor(**kwargs)


def test_a_bad_option_in_a_config_exits_2_naming_it(tmp_path, capsys):
    config = base_config(tmp_path / "runs", callbacks=[{"class_path": "adaptrain.ResourceMonitor",
                                                        "init_args": {"every_n_steps": 0}}])
    assert main(["fit", "--config", str(write_config(tmp_path / "run.yaml", config))]) == 2
    assert "every_n_steps=0" in capsys.readouterr().err and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------- pure parts
def test_summarize_sums_times_weights_rates_and_keeps_peaks():
    windows = [{"data_time": 1.0, "compute_time": 3.0, "seconds": 4.0, "samples": 40, "batches": 5,
                "cpu_percent": 20.0, "ram_fraction": 0.5, "memory_fraction": 0.3, "transfer_time": 1.0},
               {"data_time": 1.0, "compute_time": 1.0, "seconds": 1.0, "samples": 10, "batches": 1,
                "cpu_percent": 70.0, "ram_fraction": 0.2, "memory_fraction": 0.6, "transfer_time": 0.5}]
    s = summarize(windows)
    assert (s["data_time"], s["compute_time"], s["samples"], s["batches"]) == (2.0, 4.0, 50, 6)
    assert s["cpu_percent"] == pytest.approx(30.0) and s["samples_per_s"] == 10.0
    assert (s["ram_fraction"], s["memory_fraction"]) == (0.5, 0.6)
    assert s["data_share"] == pytest.approx(1 / 3) and s["transfer_share"] == pytest.approx(0.25)
    assert verdict(s).name == "data"  # data wait 33% beats copies 25%
    assert summarize([]) == {} and verdict({}) is None


def test_absent_fields_stay_absent_and_percentages_are_scaled():
    s = summarize([{"data_time": 0.1, "compute_time": 9.9, "seconds": 10.0, "samples": 100, "ram_fraction": 0.25}])
    assert not GPU_FIELDS & set(s)
    assert metric_values(s, "_step") == {"resource_data_share_step": pytest.approx(0.01),
                                         "resource_samples_per_s_step": 10.0, "resource_ram_percent_step": 25.0}


def test_an_impossible_mfu_is_logged_but_not_judged():
    s = {"data_time": 0.1, "compute_time": 9.9, "mfu": 3.0}  # a wrong flops_per_sample
    assert verdict(s).name == "compute" and "mfu" not in verdict(s).numbers


def test_format_block_gpu_line_and_nothing_to_change():
    s = {"data_time": 0.2, "compute_time": 9.8, "data_share": 0.02, "gpu_util": 0.35, "memory_fraction": 0.2,
         "transfer_share": 0.01, "mfu": 0.123}
    found = name_bottleneck(0.2, 9.8, gpu_util=0.35, memory_fraction=0.2)
    block = format_block("resources, epoch 2/4", s, found, {}).splitlines()
    assert block[0] == "resources, epoch 2/4"
    assert "  gpu: busy 35%, peak memory 20% of the card, copies 1% of step time, MFU 12.3%" in block
    assert block[-1] == "  recommend: nothing to change" and not any("host:" in line for line in block)
    assert found.name in BOTTLENECKS


def test_format_block_lists_each_recommendation_with_its_reason():
    found = name_bottleneck(5.0, 5.0)
    recs = {"data.num_workers": Recommendation(4, "more workers"), "data.pin_memory": Recommendation(True, "pinned")}
    block = format_block("t", {"data_time": 5.0, "compute_time": 5.0, "data_share": 0.5}, found, recs)
    assert block.splitlines()[-2:] == ["  recommend data.num_workers: 4 (more workers)",
                                       "  recommend data.pin_memory: True (pinned)"]


def test_the_host_reader_sees_this_process_working():
    import os

    from adaptrain.callbacks.adaptive.sampling import HostReader

    host = HostReader()
    total = 0
    for i in range(2_000_000):  # a busy loop in this process: its own CPU clock advances
        total += i
    figures = host.read()
    assert 0 < figures["process_cpu_percent"] <= 100 * (os.cpu_count() or 1) + 1
    assert 0 < figures["ram_fraction"] < 1 and figures["ram_gb"] > 0.01  # torch is loaded
