"""``adaptrain lr-find`` through the real command line (``main(argv)``), and apply_lr_to_config."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptrain.cli.lr_find import apply_lr_to_config
from adaptrain.cli.main import main
from tests.cli_data import base_config, write_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PNG = b"\x89PNG\r\n\x1a\n"


def run(argv: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_lr_find_on_the_digits_example_prints_the_suggestion_and_writes_the_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["lr-find", "--config", EXAMPLES / "digits_mlp.yaml", "--num-steps", 60,
                          "--output", "plots/lr.png", "trainer.progress=false"], capsys)
    assert code == 0, err
    assert (tmp_path / "plots" / "lr.png").read_bytes()[:8] == PNG
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    assert 20 <= int(lines["lr_find"].split()[0]) <= 60  # steps taken (the sweep stops once the loss diverges)
    suggestion = float(lines["suggestion"].split()[0])
    assert 1e-3 < suggestion < 1.0  # SGD on digits (benchmarks/lr_find.py: 0.01 .. 0.1 trains well)
    assert lines["train with it"].startswith(f"adaptrain fit --config {EXAMPLES / 'digits_mlp.yaml'} "
                                             "optimizer.init_args.lr=")  # the example's plateau scheduler
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]  # no run folder, nothing else


def test_with_one_cycle_the_override_is_its_max_lr(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "run.yaml", base_config(
        tmp_path / "runs", scheduler={"class_path": "torch.optim.lr_scheduler.OneCycleLR",
                                      "init_args": {"max_lr": 0.5}}))
    code, out, err = run(["lr-find", "-c", config, "--num-steps", 30, "--min-lr", 1e-5, "--max-lr", 100,
                          "--rule", "minimum"], capsys)
    assert code == 0, out + err
    assert (tmp_path / "lr_find.png").read_bytes()[:8] == PNG  # the default --output
    assert "lr 1e-05 .. " in out and "minimum: a tenth of lr" in out
    assert f"--config {config} scheduler.init_args.max_lr=" in out


def test_a_curve_without_descent_exits_1_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs"))
    code, out, _ = run(["lr-find", "-c", config, "--num-steps", 20, "--min-lr", 1e-10, "--max-lr", 1e-9], capsys)
    assert code == 1
    assert "no suggestion: no descent: the loss never fell below" in out
    assert (tmp_path / "lr_find.png").read_bytes()[:8] == PNG  # kept, to see why


@pytest.mark.parametrize("flags, named", [
    (["--min-lr", "0"], "--min-lr"),
    (["--min-lr", "abc"], "--min-lr"),
    (["--max-lr", "-1"], "--max-lr"),
    (["--max-lr", "1e-8"], "--max-lr"),  # below --min-lr's default 1e-7
    (["--num-steps", "2"], "--num-steps"),
    (["--num-steps", "ten"], "--num-steps"),
    (["--rule", "fastest"], "--rule"),
    (["--output", "plot.txt"], "--output"),
    (["--output", "."], "--output"),
])
def test_bad_flags_exit_2_naming_the_flag_before_any_work(flags, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs"))
    code, out, err = run(["lr-find", "-c", config, *flags], capsys)
    assert code == 2
    message = err.strip().splitlines()[-1]  # argparse prints its usage first
    assert message.startswith("adaptrain") and named in message, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # nothing written


def test_output_in_a_folder_that_is_a_file_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("")
    config = write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs"))
    code, _, err = run(["lr-find", "-c", config, "--output", "taken/lr.png"], capsys)
    assert code == 2 and "--output" in err and "not a writable folder" in err


def test_print_config_sweeps_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs"))
    code, out, _ = run(["lr-find", "-c", config, "--print-config"], capsys)
    assert code == 0 and "optimizer:" in out and not (tmp_path / "lr_find.png").exists()


# ---------------------------------------------------------------------- apply_lr_to_config
def test_apply_lr_to_a_one_cycle_config_sets_max_lr_only():
    config = {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}},
              "scheduler": {"class_path": "torch.optim.lr_scheduler.OneCycleLR", "init_args": {"max_lr": 0.1}}}
    assert apply_lr_to_config(config, 0.0123456789) == [("scheduler.init_args.max_lr", 0.1, 0.0123457)]
    assert config["scheduler"]["init_args"]["max_lr"] == 0.0123457 and config["optimizer"]["init_args"]["lr"] == 0.05


def test_apply_lr_to_other_configs_sets_the_optimizers_lr():
    plateau = {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}},
               "scheduler": {"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau", "init_args": {}}}
    assert apply_lr_to_config(plateau, 0.2) == [("optimizer.init_args.lr", 0.05, 0.2)]
    assert plateau["optimizer"]["init_args"] == {"lr": 0.2, "momentum": 0.9}
    bare = {"optimizer": {"class_path": "torch.optim.Adam"}, "scheduler": None}
    assert apply_lr_to_config(bare, 3e-4) == [("optimizer.init_args.lr", None, 3e-4)]
    assert bare["optimizer"]["init_args"] == {"lr": 3e-4}


def test_apply_lr_keeps_the_ratios_of_a_max_lr_list():
    config = {"optimizer": {"class_path": "torch.optim.SGD"},
              "scheduler": {"class_path": "my.schedules.OneCycleLR", "init_args": {"max_lr": [0.1, 0.01]}}}
    assert apply_lr_to_config(config, 0.3) == [("scheduler.init_args.max_lr", [0.1, 0.01], [0.3, 0.03])]


@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan"), float("inf"), True])
def test_apply_lr_rejects_a_bad_lr(lr):
    with pytest.raises(ValueError, match=r"apply_lr_to_config\(lr="):
        apply_lr_to_config({"optimizer": {"class_path": "torch.optim.SGD"}}, lr)
