import pytest

from adaptrain import History
from adaptrain.core.history import _panels


def test_history_access_and_best():
    h = History([{"epoch": 1, "val_loss": 0.5, "train_loss": 0.9}, {"epoch": 2, "train_loss": 0.4},
                 {"epoch": 3, "val_loss": 0.3, "train_loss": 0.2}])
    assert h["val_loss"] == [0.5, 0.3] and h.best("val_loss") == 0.3 and h.best("train_loss", "max") == 0.9
    assert h.last("val_loss") == 0.3 and h.keys == ["epoch", "val_loss", "train_loss"] and len(h) == 3


def test_csv_round_trip_keeps_missing_values_missing(tmp_path):
    h = History([{"epoch": 1, "train_loss": 0.5, "val_loss": 0.7}, {"epoch": 2, "train_loss": 0.25}])
    back = History.from_csv(h.to_csv(tmp_path / "sub" / "h.csv"))
    assert back.records == [{"epoch": 1, "train_loss": 0.5, "val_loss": 0.7}, {"epoch": 2, "train_loss": 0.25}]
    assert not list(tmp_path.glob("sub/.*tmp*"))  # the temporary file was renamed away


def test_plot_panels_pair_train_and_val():
    panels = dict(_panels(["epoch", "lr", "train_loss", "val_loss", "train_acc", "val_acc", "epoch_time"]))
    assert panels == {"loss": ["train_loss", "val_loss"], "acc": ["train_acc", "val_acc"], "lr": ["lr"]}
    assert list(dict(_panels(["lr", "train_acc", "train_loss"]))) == ["loss", "acc", "lr"]


def test_plot_panels_in_a_fixed_order_with_forecasts_in_one_panel():
    # The record's column order (epoch, lr, train_*, val_*, the rest), as the trainer writes it.
    keys = ["epoch", "lr", "train_loss", "train_loss_odd", "train_loss_digit", "train_zeta", "train_acc",
            "val_loss", "val_loss_odd", "val_loss_digit", "val_zeta", "val_acc", "epoch_time", "samples_per_s",
            "data_time", "compute_time", "skipped_batches", "grad_norm",
            "forecast_val_acc", "forecast_val_acc_low", "forecast_val_acc_high"]
    panels = _panels(keys)
    assert [title for title, _ in panels] == ["loss", "loss_odd", "loss_digit", "zeta", "acc", "grad_norm",
                                              "forecast val_acc", "lr"]
    assert dict(panels)["forecast val_acc"] == ["forecast_val_acc", "forecast_val_acc_low", "forecast_val_acc_high"]
    assert dict(panels)["zeta"] == ["train_zeta", "val_zeta"]  # metrics keep the user's order, not alphabetical


def test_plot_has_integer_epoch_ticks_and_the_panels_in_order(tmp_path):
    h = History([{"epoch": e, "lr": 0.1 / e, "train_loss": 1 / e, "val_loss": 1.1 / e, "val_acc": 1 - 1 / e,
                  "forecast_val_acc": 0.9, "forecast_val_acc_low": 0.8, "forecast_val_acc_high": 0.95}
                 for e in (1, 2, 3)])
    fig = h.figure()
    fig.canvas.draw()
    axes = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in axes] == ["loss", "acc", "forecast val_acc", "lr"]
    for ax in axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks  # 1, 2, 3, never 1.25
    assert [line.get_label() for line in axes[2].get_lines()] == ["forecast_val_acc", "forecast_val_acc_low",
                                                                  "forecast_val_acc_high"]
    assert h.plot(tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_best_ignores_nan_and_checks_its_mode():
    h = History([{"epoch": 1, "lr": 0.1, "train_loss": 0.9, "val_acc": float("nan")},
                 {"epoch": 2, "lr": 0.1, "train_loss": 0.4, "val_acc": 0.7}])
    assert h.best("val_acc", mode="max") == 0.7  # NaN ignored
    assert h.best("nothing") is None and h.last("nothing", default=-1) == -1
    with pytest.raises(ValueError, match='mode="largest"'):
        h.best("val_acc", mode="largest")


def test_json_round_trip(tmp_path):
    h = History([{"epoch": 1, "train_loss": 0.5, "val_loss": 0.7}, {"epoch": 2, "train_loss": 0.25}])
    assert History.from_json(h.to_json(tmp_path / "h.json")).records == h.records


def test_state_dict_round_trip():
    h = History([{"epoch": 1, "train_loss": 1.0}])
    other = History()
    other.load_state_dict(h.state_dict())
    assert other.records == h.records and other.records is not h.records
