"""`adaptrain tune` on a shipped example: a tuned.yaml that `fit` accepts and that differs only where measured."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from adaptrain.cli.config import flatten, load_config
from adaptrain.cli.experiment import build
from adaptrain.cli.main import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits_mlp.yaml"
SHORT = ["trainer.max_epochs=2", "callbacks=[]", "loggers=[]"]


def _tuned_keys(text: str) -> set[str]:
    """The dotted keys the file marks with a `# tuned:` comment (the comment sits right above its key)."""
    keys, path = set(), []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        key = line.strip().split(":")[0]
        path = path[:depth] + [key]
        above = [lines[i] for i in range(index - 1, -1, -1)]
        comments = []
        for previous in above:
            if previous.lstrip().startswith("#") and (len(previous) - len(previous.lstrip())) // 2 == depth:
                comments.append(previous)
            else:
                break
        if any(c.strip().startswith("# tuned:") for c in comments[-1:]):
            keys.add(".".join(path))
    return keys


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tune")
    output = folder / "tuned.yaml"
    code = main(["tune", "--config", str(EXAMPLE), "--budget", "6", "--output", str(output), *SHORT])
    assert code == 0
    return output


def test_tune_writes_a_config_that_differs_from_the_original_only_where_it_says_why(tuned):
    text = tuned.read_text()
    assert text.startswith("# Written by `adaptrain tune`")
    assert "Changes that alter the optimisation" in text and "Changes that only change speed" in text
    original = flatten(dict(load_config([EXAMPLE], SHORT)))
    written = flatten(dict(load_config([tuned])))
    differing = {key for key in set(original) | set(written) if original.get(key) != written.get(key)}
    differing.discard("trainer.seed")  # the example sets one: it must be kept
    assert written["trainer.seed"] == original["trainer.seed"]
    assert differing == _tuned_keys(text)
    allowed = {"trainer.precision", "trainer.channels_last", "trainer.compile", "trainer.micro_batch_size",
               "trainer.accumulate_grad_batches", "data.batch_size", "data.eval_batch_size", "data.num_workers",
               "data.prefetch_factor", "data.pin_memory", "data.persistent_workers", "optimizer.init_args.lr",
               "scheduler.init_args.max_lr"}
    assert differing <= allowed


def test_fit_accepts_the_tuned_config_and_runs_with_its_settings(tuned, tmp_path):
    config = load_config([tuned], [f"root_dir={tmp_path}", "trainer.max_epochs=1"])
    built = build(config, "fit")
    trainer = built.trainer
    trainer.fit(built.loaders.train, built.loaders.val)
    values = yaml.safe_load(tuned.read_text())
    assert trainer.precision.name == str(values["trainer"].get("precision", "32"))
    assert trainer.batch_size == values["data"]["batch_size"]
    assert trainer.loader_settings["num_workers"] == (values["data"].get("num_workers") or 0)
    assert trainer.state.history.records[-1]["train_loss"] > 0


def test_keep_batch_size_leaves_batch_and_lr_alone(tmp_path):
    output = tmp_path / "kept.yaml"
    assert main(["tune", "--config", str(EXAMPLE), "--budget", "4", "--keep-batch-size", "--output", str(output),
                 *SHORT]) == 0
    written = flatten(dict(load_config([output])))
    assert written["data.batch_size"] == 32
    assert written["optimizer.init_args.lr"] == 0.05
    header = output.read_text().split("Changes that only change speed")[0]
    assert re.search(r"alter the optimisation \(batch size, hence LR\):\n#\s+none", header)


@pytest.mark.parametrize(("flag", "value"), [("--budget", "-3"), ("--budget", "soon")])
def test_bad_flags_exit_2_naming_the_flag(flag, value, tmp_path, capsys):
    output = tmp_path / "never.yaml"
    assert main(["tune", "--config", str(EXAMPLE), flag, value, "--output", str(output)]) == 2
    assert flag in capsys.readouterr().err
    assert not output.exists()


def test_an_output_that_is_a_folder_is_refused_before_any_trial(tmp_path, capsys):
    assert main(["tune", "--config", str(EXAMPLE), "--budget", "2", "--output", str(tmp_path), *SHORT]) == 2
    assert "--output" in capsys.readouterr().err


def test_tune_lr_writes_the_finders_suggestion_into_the_optimizer(tmp_path, capsys):
    output = tmp_path / "lr.yaml"
    assert main(["tune", "--config", str(EXAMPLE), "--budget", "3", "--keep-batch-size", "--lr", "--output",
                 str(output), *SHORT]) == 0
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    assert closing.startswith(f"wrote {output}: ") and "optimizer.init_args.lr" in closing  # the key, not "lr"
    text = output.read_text()
    written = flatten(dict(load_config([output])))
    assert written["data.batch_size"] == 32
    lr = written["optimizer.init_args.lr"]
    assert lr != 0.05 and 1e-6 < lr < 10
    assert "LR finder" in text and "optimizer.init_args.lr" in _tuned_keys(text)


def test_trainer_auto_in_yaml_decides_inline_and_records_it_in_the_run_folder(tmp_path):
    assert main(["fit", "--config", str(EXAMPLE), "trainer.auto=true", "trainer.max_epochs=1", "callbacks=[]",
                 "loggers=[]", f"root_dir={tmp_path}", "trainer.progress=false"]) == 0
    run = next((tmp_path / "digits").iterdir())
    adaptations = yaml.safe_load((run / "adaptations.json").read_text())  # JSON is YAML
    auto = [a for a in adaptations if a["kind"] == "auto"]
    # one epoch of digits is too short for 5% of it to buy two trials on most machines: either way the
    # decision, its reason and its cost are in the run folder
    assert len(auto) == 1 and auto[0]["seconds"] > 0 and (auto[0]["trials"] or "not tuned" in auto[0]["reason"])
    assert "auto:" in (run / "train.log").read_text()


def test_a_data_factory_that_builds_its_own_loaders_gets_no_data_keys_and_fit_accepts_the_file(tmp_path, capsys):
    from tests.cli_data import base_config, write_config

    config = write_config(tmp_path / "run.yaml", base_config(
        tmp_path / "runs", data={"class_path": "tests.cli_data.tiny_data", "init_args": {"n": 960}}))
    output = tmp_path / "tuned.yaml"
    assert main(["tune", "--config", str(config), "--budget", "3", "--output", str(output)]) == 0
    assert "data.batch_size not tuned" in capsys.readouterr().out
    written = yaml.safe_load(output.read_text())
    assert set(written["data"]) == {"class_path", "init_args"}  # nothing the factory would refuse
    assert main(["fit", "--config", str(output), "trainer.max_epochs=1"]) == 0


def test_an_output_in_a_folder_that_cannot_be_written_is_refused_before_any_trial(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["tune", "--config", str(EXAMPLE), "--budget", "2", "--output", str(blocker / "tuned.yaml"),
                 *SHORT]) == 2
    assert "--output" in capsys.readouterr().err
