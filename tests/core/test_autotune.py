"""trainer.tune() and Trainer(auto=True) on real models and data (CPU): exact undo, keep-batch, records, resume.

Which configuration wins depends on this machine's timing, so these tests assert what must hold for
any choice (the trainer is restored exactly; the applied settings are the reported ones; a resume
re-applies them without trials), and force choices only through simulated out-of-memory errors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptrain import Trainer
from adaptrain.callbacks.checkpointing import ModelCheckpoint
from adaptrain.core import autotune
from adaptrain.core.autotune import apply_point, tune
from adaptrain.core.tune_trials import TrialRunner, current_point
from adaptrain.errors import ConfigError


def _data(n=512, features=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, 4, (n,), generator=g))


def _trainer(seed=0, model=None, **options):
    torch.manual_seed(seed or 0)
    model = model or nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Trainer(model, optimizer, nn.CrossEntropyLoss(), progress=False, device="cpu", seed=seed, **options)


def _loader(batch_size=32, seed=0):
    return DataLoader(_data(), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


class FailsAbove(nn.Module):
    """A model that raises torch's OutOfMemoryError for batches above ``limit`` (a simulated memory limit)."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.net = limit, nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"simulated: {x.shape[0]} > {self.limit} samples")
        return self.net(x)


def test_tune_leaves_the_trainer_exactly_as_it_was():
    tuned, plain = _trainer(max_epochs=2), _trainer(max_epochs=2)
    precision, forward = tuned.precision, tuned._forward_model
    report = tuned.tune(_loader(), budget=4)
    assert len(report.trials) >= 2
    assert tuned.precision is precision and tuned._forward_model is forward and not tuned.channels_last
    assert tuned.state.global_step == 0 and tuned.state.micro_batch_size is None
    tuned.fit(_loader())
    plain.fit(_loader())
    for a, b in zip(tuned.model.state_dict().values(), plain.model.state_dict().values()):
        assert torch.equal(a, b)  # weights, BatchNorm statistics: the trials left no trace
    assert tuned.state.history.records[-1]["train_loss"] == plain.state.history.records[-1]["train_loss"]


def test_the_report_names_each_trial_and_each_change_with_its_reason():
    report = _trainer().tune(_loader(), budget=4)
    assert report.original["batch_size"] == 32 and report.original["precision"] == "32"
    assert all({"stage", "point", "samples_per_s", "peak_memory_mib", "seconds"} <= set(t) for t in report.trials)
    assert report.trials[0]["stage"] == "start" and report.trials[0]["samples_per_s"] > 0
    for key, before, after, reason, alters in report.changes():
        assert before != after and reason, key
        assert alters == (key in ("batch_size", "lr", "accumulate_grad_batches"))
    table = report.table()
    assert "changes that alter the optimisation" in table and "changes that only change speed" in table
    alters_any = any(alters for *_, alters in report.changes())  # the machine decides whether the batch changed
    assert ("these change what the model learns" in table) == alters_any
    assert report.seconds > 0 and report.budget_s == 4


def test_keep_batch_size_changes_nothing_that_alters_the_optimisation():
    report = _trainer().tune(_loader(), budget=4, keep_batch_size=True)
    assert all(t["point"]["batch_size"] == 32 for t in report.trials)
    assert report.chosen["batch_size"] == 32 and report.chosen["lr"] == report.original["lr"]
    assert not [c for c in report.changes() if c[4]]
    assert "changes that alter the optimisation: none" in report.table()
    assert "these change what the model learns" not in report.table()


def test_a_batch_that_does_not_fit_gets_a_micro_batch_and_keeps_batch_and_lr():
    trainer = _trainer(model=FailsAbove(limit=8))
    report = trainer.tune(_loader(), budget=3, keep_batch_size=True)
    assert report.trials[0]["error"].startswith("out of memory")
    assert report.chosen["micro_batch_size"] == 8 and report.chosen["batch_size"] == 32
    assert "same batch" in report.reasons["micro_batch_size"]
    failed = report.table().splitlines()[1]  # the first trial's row
    assert " failed " in failed and failed.endswith(f"({report.trials[0]['error']})")  # the reason, whole
    assert report.expected_run_s > 0  # from the first configuration that ran


def test_a_trial_undoes_precision_layout_and_micro_batch():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 4))
    trainer = _trainer(model=model)
    data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,)))
    loader = DataLoader(data, batch_size=8)
    saved = trainer.state.snapshot(device="cpu")
    precision = trainer.precision
    point = {**current_point(trainer, loader), "precision": "bf16-mixed", "channels_last": True,
             "micro_batch_size": 4}
    measured = TrialRunner(trainer, loader, saved, rounds=2, min_seconds=0)(point)
    assert measured.ok and measured.data_share is not None and measured.peak_bytes is not None
    assert trainer.precision is precision and not trainer.channels_last and trainer.state.micro_batch_size is None
    assert model[0].weight.is_contiguous()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name


def test_auto_applies_what_it_reports_and_records_it(tmp_path):
    trainer = _trainer(model=FailsAbove(limit=8), auto=True, max_epochs=2)  # the rescue trials always run
    history = trainer.fit(_loader())
    report = trainer.autotune.report
    assert report is not None and len(report.trials) >= 3 and report.chosen["micro_batch_size"] == 8
    chosen = report.chosen
    assert trainer.batch_size == chosen["batch_size"] and trainer.precision.name == chosen["precision"]
    assert trainer.loader_settings["num_workers"] == chosen["num_workers"]
    assert trainer.state.micro_batch_size == chosen["micro_batch_size"]
    assert trainer.state.lr == pytest.approx(chosen["lr"])
    auto = [a for a in history.adaptations if a["kind"] == "auto"]
    assert len(auto) == 1 and auto[0]["after"] == chosen and auto[0]["seconds"] > 0
    assert auto[0]["share"] == pytest.approx(report.share) and auto[0]["trials"] == report.trials
    for key in (k for k, _, _, _, _ in report.changes() if k not in ("lr", "accumulate_grad_batches")):
        assert any(a["kind"] == key for a in history.adaptations), key  # each change said on its own too


def always_tune(monkeypatch):
    """These runs last a fraction of a second: 5% of one buys no trial, on any machine. The rule that
    skips them has its own tests; here it is lifted so the search itself runs."""
    monkeypatch.setattr(autotune, "too_short_to_tune", lambda budget_s, trial_s: None)


def test_auto_budget_is_its_share_of_the_run_at_the_fastest_configuration_measured(monkeypatch):
    always_tune(monkeypatch)
    trainer = _trainer(auto=True, max_epochs=3)
    trainer.autotune.share = 5.0
    trainer.fit(_loader())
    report = trainer.autotune.report
    assert report.expected_run_s == pytest.approx(512 * 3 / report.trials[0]["samples_per_s"])  # as given
    runs = [t["setup_seconds"] + 512 * 3 / t["samples_per_s"] for t in report.trials if t["samples_per_s"]]
    # the run as tuned: the shortest run a trial promised, its share less what the warm-up already took
    assert report.trials and report.budget_s == pytest.approx(5.0 * min(runs) - report.extra["warm_up_s"], abs=1e-3)


def test_auto_does_not_tune_a_run_whose_budget_buys_fewer_than_two_trials(capsys):
    plain = _trainer(max_epochs=2)
    plain.fit(_loader())
    trainer = _trainer(auto=True, max_epochs=2)
    trainer.autotune.share = 1e-6  # a budget of microseconds: no trial fits in it, whatever this machine's speed
    history = trainer.fit(_loader())
    report = trainer.autotune.report
    assert report.trials == [] and report.chosen == report.original and not report.changes()
    out = capsys.readouterr().out
    assert "buys fewer than 2 trials" in report.notes[0] and "auto: not tuned: the expected" in out
    assert "adaptrain: train loader " in out  # the loader is still tuned, live: those trials train
    auto = [a for a in history.adaptations if a["kind"] == "auto"]  # the decision is recorded, as any other
    assert len(auto) == 1 and auto[0]["before"] == auto[0]["after"] and auto[0]["trials"] == []
    assert trainer.batch_size == 32 and trainer.precision.name == "32"
    for a, b in zip(trainer.model.state_dict().values(), plain.model.state_dict().values()):
        assert torch.equal(a, b)  # the warm-up was undone, the loader's trials trained: the run without auto
    trainer.state.max_epochs = 3
    trainer.fit(_loader())  # fit again: a decision not to tune is no choice to re-apply
    assert trainer.autotune.applied is False and trainer.batch_size == 32


def test_tune_with_the_default_budget_on_a_short_run_reports_why_it_did_not_search():
    report = tune(_trainer(), _loader(), share=1e-6)  # trainer.tune's default share is 5%
    assert report.trials == [] and report.chosen == report.original and report.budget_s < 1e-3
    assert "not tuned" in report.table() and report.expected_run_s > 0
    # a budget smaller than the warm-up reads 0.00 s, not -0.00 s; a run under 100 s shows its tenths
    assert "its budget (0.00 s)" in report.notes[0], report.notes
    assert f"of the expected {report.expected_run_s:.1f} s run" in report.table()


def test_auto_resume_reapplies_the_choice_without_trials_and_matches_the_run_continued(tmp_path):
    torch.manual_seed(0)
    first = _trainer(model=FailsAbove(limit=8), auto=True, max_epochs=1, seed=None,
                     callbacks=[ModelCheckpoint(dirpath=tmp_path, monitor=None)])
    first.autotune.share = 5.0
    loader = _loader()  # its generator carries on into the continued run, as the checkpoint's does
    first.fit(loader)
    assert first.state.micro_batch_size == 8  # forced by the simulated memory limit
    resumed = _trainer(model=FailsAbove(limit=8), auto=True, max_epochs=2, seed=None,
                       callbacks=[ModelCheckpoint(dirpath=tmp_path / "resumed", monitor=None)])
    resumed.fit(_loader(), ckpt_path=tmp_path / "last.ckpt")
    assert [a["kind"] for a in resumed.state.history.adaptations].count("auto") == 1  # no second search
    assert resumed.autotune.report is None
    assert resumed.state.micro_batch_size == 8 and resumed.precision.name == first.precision.name
    assert resumed.batch_size == first.batch_size
    first.state.max_epochs = 2
    first.fit(loader)  # the same run continued in place (fit again: no second search either)
    assert [a["kind"] for a in first.state.history.adaptations].count("auto") == 1
    for a, b in zip(first.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_apply_point_changes_precision_layout_loader_and_rescales_the_lr():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 4))
    trainer = _trainer(model=model)
    data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,)))
    trainer.state.train_loader = DataLoader(data, batch_size=8)
    original = current_point(trainer, trainer.state.train_loader)
    chosen = {**original, "precision": "bf16-mixed", "channels_last": True, "batch_size": 32, "num_workers": 1,
              "prefetch_factor": 2}
    apply_point(trainer, original, chosen, {"precision": "measured"})
    assert trainer.precision.name == "bf16-mixed" and trainer.channels_last
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert trainer.batch_size == 32 and trainer.loader_settings["num_workers"] == 1
    assert trainer.loader_settings["persistent_workers"] is True
    assert trainer.state.lr == pytest.approx(0.05 * 2)  # sqrt(32 / 8)
    kinds = [a["kind"] for a in trainer.state.history.adaptations]
    assert {"precision", "channels_last", "batch_size", "num_workers"} <= set(kinds)


def test_channels_last_trains_like_the_default_layout():
    def run(channels_last):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
        trainer = _trainer(model=model, channels_last=channels_last, max_epochs=2)
        data = TensorDataset(torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
                             torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(2)))
        trainer.fit(DataLoader(data, batch_size=16))
        return trainer
    nhwc, nchw = run(True), run(False)
    assert nhwc.channels_last and nhwc.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert list(nhwc.model.state_dict()) == list(nchw.model.state_dict())
    for a, b in zip(nhwc.model.state_dict().values(), nchw.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("options", "match"), [({"auto": "yes"}, "auto"), ({"channels_last": 1}, "channels_last")])
def test_bad_settings_are_refused_by_name(options, match):
    with pytest.raises(ConfigError, match=match):
        _trainer(**options)


def test_bad_tune_arguments_are_refused_before_any_trial():
    trainer = _trainer()
    saved = trainer.state.snapshot()
    with pytest.raises(ValueError, match="budget"):
        trainer.tune(_loader(), budget=-1)
    with pytest.raises(ConfigError, match="train_loader"):
        trainer.tune([(torch.randn(4, 16), torch.zeros(4, dtype=torch.long))], budget=1)
    assert trainer.state.global_step == 0
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved["model"][name])


def test_a_compile_failure_is_a_failed_trial_not_a_failed_tune(monkeypatch):
    class Broken(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args, **kwargs):
            raise RuntimeError("inductor: no C compiler found")

    monkeypatch.setattr(torch, "compile", lambda model, **_: Broken(model))
    trainer = _trainer()
    report = trainer.tune(_loader(), budget=60, keep_batch_size=True)
    compiled = [t for t in report.trials if t["point"]["compile"]]
    assert compiled and compiled[0]["error"].startswith("torch.compile failed (RuntimeError:")
    assert "no C compiler" in compiled[0]["error"]
    assert report.chosen["compile"] is False and trainer.compile is False


def test_an_error_inside_a_trial_leaves_the_trainer_as_it_was():
    class StopsAtThe(nn.Module):
        def __init__(self, call):
            super().__init__()
            self.call, self.calls, self.net = call, 0, nn.Linear(16, 4)

        def forward(self, x):
            self.calls += 1
            if self.calls == self.call:
                raise KeyboardInterrupt
            return self.net(x)

    trainer = _trainer(model=StopsAtThe(7))
    saved = trainer.state.snapshot()
    with pytest.raises(KeyboardInterrupt):
        trainer.tune(_loader(), budget=5)
    assert trainer.state.global_step == 0
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name


def test_tune_leaves_every_random_generator_as_it_was():
    trainer = _trainer(seed=None)
    loader = _loader()
    before, loader_before = torch.get_rng_state(), loader.generator.get_state()
    trainer.tune(loader, budget=3, keep_batch_size=True)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(loader.generator.get_state(), loader_before)


def test_trials_measure_an_out_of_memory_even_when_the_trainer_would_recover_from_it_mid_run():
    trainer = _trainer(model=FailsAbove(limit=8), adaptive_batch_size="safe")
    report = trainer.tune(_loader(), budget=3, keep_batch_size=True)
    assert report.trials[0]["point"]["micro_batch_size"] is None
    assert report.trials[0]["error"].startswith("out of memory")  # not silently halved inside the trial
    assert report.chosen["micro_batch_size"] == 8
    assert not [a for a in trainer.state.history.adaptations]  # nothing recorded by a trial


def test_a_configured_micro_batch_is_the_start_of_the_search():
    trainer = _trainer(micro_batch_size=4)
    report = trainer.tune(_loader(), budget=3, keep_batch_size=True)
    assert report.original["micro_batch_size"] == 4
    assert all(t["point"]["micro_batch_size"] == 4 for t in report.trials)


def test_auto_keeps_the_batch_when_a_per_step_scheduler_cannot_follow_it(capsys, monkeypatch):
    always_tune(monkeypatch)
    trainer = _trainer(auto=True)
    trainer._schedule.spec["scheduler"] = torch.optim.lr_scheduler.CosineAnnealingLR(trainer.state.optimizer, 100)
    trainer._schedule.spec["interval"] = "step"
    trainer.fit(_loader())
    assert trainer.batch_size == 32 and trainer.autotune.report.trials
    assert all(t["point"]["batch_size"] == 32 for t in trainer.autotune.report.trials)
    assert "auto keeps the batch size" in capsys.readouterr().out


def test_auto_on_a_data_set_too_short_to_time_says_so_and_trains_as_given(capsys):
    small = DataLoader(_data(n=64), batch_size=32)
    trainer = _trainer(auto=True)
    trainer.fit(small)
    assert "auto tuning skipped" in capsys.readouterr().out and trainer.state.global_step == 2
    with pytest.raises(ConfigError, match="train_loader"):
        _trainer().tune(small, budget=3)


def test_a_trial_far_slower_than_the_best_so_far_stops_after_one_timed_round():
    from adaptrain.core.loader_trials import time_trial
    from adaptrain.tuning.loader_tuning import LoaderSettings

    trainer = _trainer()
    saved = trainer.state.snapshot()
    hopeless = time_trial(trainer, _loader(), LoaderSettings(0), rounds=3, give_up_below=float("inf"))
    full = time_trial(trainer, _loader(), LoaderSettings(0), rounds=3, give_up_below=0.0)
    trainer.state.restore(saved)
    assert len(hopeless.rates) == 1 and len(full.rates) == 3


def test_auto_on_a_loader_it_cannot_rebuild_trains_as_given_and_says_why(capsys):
    batches = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(4)]  # a list, not a DataLoader
    trainer = _trainer(auto=True)
    trainer.fit(batches)  # neither auto's search nor its loader tuning may raise: auto sets nothing
    out = capsys.readouterr().out
    assert "auto tuning skipped" in out and "loader tuning skipped: the train loader is a list" in out
    assert trainer.state.global_step == 4
