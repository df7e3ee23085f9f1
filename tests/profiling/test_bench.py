"""adaptrain.profiling.bench: the pure rules with numbers, the shared precision rule seen through bench's rows,
and a tiny CPU benchmark end to end."""

from __future__ import annotations

import csv
import importlib
import io

import pytest
import torch
from rich.console import Console
from torch import nn

from adaptrain.core.precision import PRECISIONS, precision_support
from adaptrain.profiling.bench import BenchRow, BenchTable, mfu, peak_flops, run_bench, with_speedups

bench_module = importlib.import_module("adaptrain.profiling.bench")  # the module even if a package attr shadows it


# ----------------------------------------------------------------------------- pure rules
@pytest.mark.parametrize("name, precision, tf32, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16-mixed", False, 989e12),
    ("NVIDIA H100 80GB HBM3", "32", True, 494e12),
    ("NVIDIA H100 PCIe", "16-mixed", False, 756e12),
    ("NVIDIA H200", "bf16-mixed", False, 989e12),
    ("NVIDIA A100-SXM4-40GB", "32", False, 19.5e12),
    ("NVIDIA A100-SXM4-40GB", "32", True, 156e12),
    ("NVIDIA A100 80GB PCIe", "bf16-mixed", False, 312e12),
    ("Tesla T4", "16-mixed", False, None),
    ("CPU", "32", False, None),
])
def test_peak_flops(name, precision, tf32, expected):
    assert peak_flops(name, precision, tf32) == expected


def test_mfu_numbers():
    assert mfu(1e12, 0.01, 200e12) == pytest.approx(0.5)
    assert mfu(3.9e12 * 64, 0.5, 312e12) == pytest.approx(3.9e12 * 64 / 0.5 / 312e12)
    assert mfu(1e12, 0.01, None) is None and mfu(None, 0.01, 1e12) is None and mfu(1.0, 0.0, 1.0) is None


def test_speedups_are_per_batch_size():
    rows = with_speedups([
        BenchRow("32", 16, 10.0), BenchRow("16-mixed", 16, 4.0), BenchRow("bf16-mixed", 16, skipped="why"),
        BenchRow("32", 32, skipped="out of memory"), BenchRow("16-mixed", 32, 8.0),
    ])
    assert [r.speedup_vs_fp32 for r in rows] == [1.0, 2.5, None, None, None]


# ----------------------------------------------------------------------------- measuring layer
def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))


def make_batch(b: int):
    return torch.randn(b, 12), torch.randint(0, 4, (b,))


def simulate_device(monkeypatch, device_type, capability):
    """Make bench ask the shared precision rule about ``device_type`` with ``capability`` (a V100,
    an A100, an Apple GPU) while it measures on the CPU: the rows show what bench does with the answer."""
    monkeypatch.setattr(bench_module, "precision_support",
                        lambda prec, _device_type, _capability=None: precision_support(prec, device_type, capability))


# ----------------------------------------------------------------------------- precision: one rule, seen in the rows
def test_bench_uses_the_project_precision_rule():
    assert bench_module.precision_support is precision_support  # imported, not a second copy
    assert bench_module.PRECISIONS is PRECISIONS
    assert not hasattr(bench_module, "cpu_autocast_supports_fp16")


@pytest.mark.parametrize("precision, device, cap, expected", [
    ("32", "cuda", (7, 0), None),
    ("16-mixed", "cuda", (7, 0), None),
    ("bf16-mixed", "cuda", (7, 0), "(compute capability 7.0) has no native bfloat16 support"),
    ("bf16-mixed", "cuda", (7, 5), "(compute capability 7.5) has no native bfloat16 support"),
    ("bf16-mixed", "cuda", (8, 0), None),
    ("bf16-mixed", "cuda", (9, 0), None),
    ("32", "cpu", None, None),
    ("bf16-mixed", "cpu", None, None),
    ("16-mixed", "cpu", None, None),
    ("16-mixed", "mps", None, 'not supported on device type "mps"'),
])
def test_unsupported_precision_is_a_skipped_row_with_the_rules_reason(monkeypatch, precision, device, cap,
                                                                      expected):
    if device != "cpu":  # the CPU cases ask the real rule about the real device
        simulate_device(monkeypatch, device, cap)
    (row,) = run_bench(make_mlp, make_batch, precisions=(precision,), batch_sizes=(2,), device="cpu",
                       steps=1, warmup=0).rows
    assert (row.precision, row.batch_size) == (precision, 2)
    if expected is None:
        assert row.skipped is None and row.time_per_iter_ms > 0 and row.peak_mem_mb > 0
    else:
        assert expected in row.skipped and row.skipped == precision_support(precision, device, cap)
        assert row.time_per_iter_ms is None and row.samples_per_s is None and row.peak_mem_mb is None


def test_cpu_autocast_runs_float16_and_bfloat16():
    # The decision the shared rule records ("CPU runs both"), so bench measures 16-mixed on CPU
    # instead of skipping it: true since torch 2.2, and adaptrain needs torch >= 2.4.
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


def test_run_bench_on_cpu(tmp_path):
    table = run_bench(make_mlp, make_batch, precisions=("32", "16-mixed", "bf16-mixed"), batch_sizes=(4, 8),
                      device="cpu", steps=4, warmup=1)
    assert [(r.precision, r.batch_size) for r in table.rows] == [
        (p, b) for b in (4, 8) for p in ("32", "16-mixed", "bf16-mixed")]
    for r in table.rows:
        assert r.skipped is None and r.time_per_iter_ms > 0 and r.peak_mem_mb > 0 and r.mfu is None
        assert r.samples_per_s == pytest.approx(r.batch_size / (r.time_per_iter_ms / 1e3))
        assert r.speedup_vs_fp32 > 0
    assert all(r.speedup_vs_fp32 == 1.0 for r in table.rows if r.precision == "32")
    assert table.meta["train_flops_per_sample"] == 3 * (2 * 12 * 32 + 2 * 32 * 4) - 2 * 12 * 32


def test_skips_and_oom_are_rows_with_reasons(tmp_path, monkeypatch):
    simulate_device(monkeypatch, "cuda", (7, 0))  # a V100: no native bf16

    def criterion(out, target):  # a combination that runs out of memory, simulated on CPU
        if out.shape[0] == 8:
            raise torch.cuda.OutOfMemoryError("simulated")
        return nn.functional.cross_entropy(out, target)

    table = run_bench(make_mlp, make_batch, precisions=("32", "bf16-mixed"), batch_sizes=(4, 8),
                      device="cpu", steps=2, warmup=1, criterion=criterion)
    by = {(r.precision, r.batch_size): r for r in table.rows}
    assert "no native bfloat16 support" in by[("bf16-mixed", 4)].skipped
    assert by[("bf16-mixed", 8)].skipped == by[("bf16-mixed", 4)].skipped  # the rule comes before measuring
    assert by[("32", 8)].skipped == "out of memory" and by[("32", 8)].time_per_iter_ms is None
    assert by[("32", 4)].skipped is None and by[("32", 4)].speedup_vs_fp32 == 1.0


def test_csv_markdown_and_rich(tmp_path):
    reason = precision_support("bf16-mixed", "cuda", (7, 0))  # a V100, simulated
    table = BenchTable(with_speedups([
        BenchRow("32", 16, 2.0, 8000.0, 10.5, mfu=0.25), BenchRow("16-mixed", 16, 1.0, 16000.0, 6.25, mfu=0.1),
        BenchRow("bf16-mixed", 16, skipped=reason)]), "cuda:0", "Tesla V100-SXM2-16GB", {"compile": False})
    rows = list(csv.DictReader(table.to_csv(tmp_path / "b.csv").open()))
    assert list(rows[0]) == list(BenchTable.COLUMNS)
    assert [r["speedup_vs_fp32"] for r in rows] == ["1.0", "2.0", ""]
    assert float(rows[1]["time_per_iter_ms"]) == 1.0 and rows[2]["skipped"] == reason
    text = table.to_markdown(tmp_path / "b.md")
    assert (tmp_path / "b.md").read_text() == text and "Tesla V100" in text
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0][:3] == ["precision", "batch", "ms/iter"] and len(cells) == 2 + 3
    assert cells[3][1] == "16" and cells[3][5] == "2.00" and cells[2][6] == "25.0%"
    assert cells[4][7] == reason and cells[4][2] == ""
    out = io.StringIO()
    Console(file=out, width=200).print(table)
    assert "compute capability" in out.getvalue()


def test_bad_arguments():
    def must_not_build():
        raise AssertionError("an unknown precision must fail before any model is built")

    with pytest.raises(ValueError, match="fp8") as error:
        run_bench(must_not_build, make_batch, precisions=("32", "fp8"), device="cpu")
    assert str(error.value) == precision_support("fp8", "cpu")  # the shared rule's reason, listing the known ones
    with pytest.raises(ValueError, match="batch_sizes"):
        run_bench(make_mlp, make_batch, batch_sizes=(0,), device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_run_bench_on_cuda():
    table = run_bench(make_mlp, make_batch, batch_sizes=(8,), device="cuda", steps=3, warmup=1)
    ran = [r for r in table.rows if r.skipped is None]
    assert ran and all(r.time_per_iter_ms > 0 and r.peak_mem_mb > 0 for r in ran)


def test_the_table_times_the_trainers_own_step(monkeypatch):
    """bench measures Trainer.run_step (fit's step: precision plugin, clipping, step stage), not a copy."""
    from adaptrain.core.trainer import Trainer

    calls = []
    original = Trainer.run_step

    def counting(self, batch):
        calls.append(self.precision.name)
        return original(self, batch)

    monkeypatch.setattr(Trainer, "run_step", counting)
    run_bench(lambda: torch.nn.Linear(4, 3), lambda b: (torch.randn(b, 4), torch.randint(0, 3, (b,))),
              precisions=["32", "bf16-mixed"], batch_sizes=[4], steps=3, warmup=1)
    assert calls.count("32") == calls.count("bf16-mixed") == 1 + 3 + 1  # warm-up, timed steps, the memory step
