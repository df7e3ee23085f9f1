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


def test_state_dict_round_trip():
    h = History([{"epoch": 1, "train_loss": 1.0}])
    other = History()
    other.load_state_dict(h.state_dict())
    assert other.records == h.records and other.records is not h.records
