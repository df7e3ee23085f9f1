"""Checkpoint files: atomic writes, safe loading, clear errors, safetensors weights."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import adaptrain.checkpoint.io as checkpoint
from adaptrain import Callback, Trainer, save_checkpoint
from adaptrain.callbacks.checkpointing import ModelCheckpoint
from adaptrain.checkpoint.io import CheckpointError, atomic_write, load_checkpoint, load_weights, save_weights
from tests.common import data


def make_trainer(model: nn.Module | None = None, optimizer_cls=torch.optim.AdamW, callbacks=(), **kwargs) -> Trainer:
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return Trainer(model, optimizer_cls(model.parameters(), lr=0.01), nn.CrossEntropyLoss(), progress=False,
                   seed=0, device="cpu", callbacks=list(callbacks), **kwargs)


def train_loader():
    return data.loader(data.classification(n=48), batch_size=16, shuffle=True)


@pytest.fixture
def saved(tmp_path) -> Path:
    """A real checkpoint after one epoch."""
    trainer = make_trainer(max_epochs=1)
    trainer.fit(train_loader())
    return save_checkpoint(trainer, tmp_path / "run.ckpt")


# ---------------------------------------------------------------------- atomic writes
def test_a_write_interrupted_at_any_point_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    trainer = make_trainer(max_epochs=1)
    trainer.fit(train_loader())
    path = save_checkpoint(trainer, tmp_path / "last.ckpt")
    before = path.read_bytes()
    trainer.state.global_step = 99
    for stop_after in (1, 4096, len(before) // 2):  # the first bytes, a chunk, half the file
        def interrupt(written: int, stop_after=stop_after) -> None:
            if written >= stop_after:
                raise KeyboardInterrupt  # what a Ctrl-C in the middle of torch.save looks like
        monkeypatch.setattr(checkpoint, "_write_hook", interrupt)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(trainer, path)
        assert path.read_bytes() == before
        assert load_checkpoint(path)["counters"]["global_step"] == 3
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left behind
    monkeypatch.setattr(checkpoint, "_write_hook", None)
    assert load_checkpoint(save_checkpoint(trainer, path))["counters"]["global_step"] == 99


def test_atomic_write_replaces_only_after_the_data_is_complete(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    seen = []

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"new")
        seen.append((tmp.parent, target.read_bytes()))  # the old file is untouched while writing

    assert atomic_write(target, write) == target
    assert seen == [(tmp_path, b"old")] and target.read_bytes() == b"new"


# ---------------------------------------------------------------------- safe loading
class CreatesFile:
    """Unpickling this object creates a folder: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("fmt", ["torch-zip", "raw-pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, fmt):
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    payload = {"model": {"weight": torch.zeros(2)}, "meta": CreatesFile(marker)}
    if fmt == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused: .*(posix\.mkdir|Unsupported)"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused"):
        make_trainer().fit(train_loader(), ckpt_path=path)
    assert not marker.exists()
    if fmt == "torch-zip":  # the control: an unsafe load really runs the payload
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_a_flipped_bit_is_caught_by_the_zip_crc(saved):
    raw = bytearray(saved.read_bytes())
    weight = load_checkpoint(saved)["model"]["0.weight"]
    offset = raw.find(weight.numpy().tobytes()) + weight.numel() * 2  # inside the first layer's weights
    raw[offset] ^= 0x10
    saved.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"run\.ckpt: is truncated or corrupt \(BadZipFile: Bad CRC-32"):
        load_checkpoint(saved)


@pytest.mark.parametrize("keep", [0, 10, 200, 0.5, -100])
def test_a_truncated_file_gives_one_clear_error(saved, keep):
    raw = saved.read_bytes()
    keep = int(len(raw) * keep) if isinstance(keep, float) else keep % len(raw)
    saved.write_bytes(raw[:keep])
    with pytest.raises(CheckpointError, match=r"run\.ckpt: is truncated or corrupt"):
        load_checkpoint(saved)


def test_missing_files_folders_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.ckpt: does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match=r"plain\.pt: is not an adaptrain checkpoint \(missing \['model'"):
        load_checkpoint(tmp_path / "plain.pt")


def test_a_newer_format_is_refused(saved):
    ckpt = torch.load(saved, weights_only=True)
    ckpt["meta"]["version"] = checkpoint.VERSION + 1
    torch.save(ckpt, saved)
    with pytest.raises(CheckpointError, match="written by a newer adaptrain"):
        load_checkpoint(saved)


def test_contents_are_what_a_resume_needs(saved):
    ckpt = load_checkpoint(saved, map_location="cpu")
    assert set(ckpt) == {"meta", "model", "optimizer", "scheduler", "precision", "counters", "history", "rng",
                         "callbacks", "progress"}
    assert ckpt["counters"] == {"epoch": 1, "global_step": 3, "batch_idx": 0, "epoch_samples": 0, "samples_seen": 48,
                                "skipped_steps": 0, "skipped_batches": 0, "step_lr": pytest.approx(0.01),
                                "micro_batch_size": None, "batch_size": 16}
    assert [r["epoch"] for r in ckpt["history"]["records"]] == [1]
    assert set(ckpt["rng"]["now"]) >= {"python", "numpy", "torch", "loader"}
    assert ckpt["rng"]["now"]["loader"][0].dtype == torch.uint8  # the shuffling generator's state
    assert ckpt["meta"]["optimizer"] == "AdamW" and ckpt["progress"] is None  # taken at an epoch's end


# ---------------------------------------------------------------------- the wrong model / optimizer
def test_a_different_model_lists_keys_and_shapes_and_changes_nothing(saved):
    other = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3), nn.Linear(3, 3))
    trainer = make_trainer(model=other)
    weights_before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        trainer.fit(train_loader(), ckpt_path=saved)
    message = str(error.value)
    assert message.startswith(f"{saved}: holds the weights of a different model than this Sequential")
    assert "missing keys: 3.weight, 3.bias" in message
    assert "0.weight: checkpoint [16, 8], model [32, 8]" in message and "2.weight: checkpoint [3, 16]" in message
    assert all(torch.equal(other.state_dict()[k], v) for k, v in weights_before.items())
    assert trainer.state.global_step == 0 and len(trainer.state.history) == 0

    smaller = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    with pytest.raises(CheckpointError, match="unexpected keys: 2.weight, 2.bias"):
        make_trainer(model=smaller).fit(train_loader(), ckpt_path=saved)


def test_a_different_optimizer_is_named(saved):
    with pytest.raises(CheckpointError, match="saved with a AdamW optimizer; this trainer's is SGD"):
        make_trainer(optimizer_cls=torch.optim.SGD).fit(train_loader(), ckpt_path=saved)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.1}]
    trainer = Trainer(model, torch.optim.AdamW(groups, lr=0.01), nn.CrossEntropyLoss(), progress=False)
    with pytest.raises(CheckpointError, match="has 1 optimizer param group.*this optimizer has 2"):
        trainer.fit(train_loader(), ckpt_path=saved)


def test_a_different_scheduler_is_named(saved):
    trainer = make_trainer(scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1))
    with pytest.raises(CheckpointError, match="saved with scheduler None; this trainer has StepLR"):
        trainer.fit(train_loader(), ckpt_path=saved)


def test_a_failed_resume_touches_no_checkpoint(tmp_path):
    make_trainer(callbacks=[ModelCheckpoint(tmp_path, save_top_k=-1)], max_epochs=2).fit(train_loader())
    damaged = (tmp_path / "last.ckpt").read_bytes()[:-50]
    (tmp_path / "last.ckpt").unlink()  # a hard link to the newest named file: give it its own bytes
    (tmp_path / "last.ckpt").write_bytes(damaged)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    trainer = make_trainer(callbacks=[ModelCheckpoint(tmp_path, save_top_k=1)], max_epochs=3)
    with pytest.raises(CheckpointError, match=r"last\.ckpt: is truncated or corrupt"):
        trainer.fit(train_loader(), ckpt_path="last")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing deleted
    trainer.fit(train_loader(), ckpt_path=tmp_path / "epoch=2-step=6.ckpt")  # an older one still resumes
    assert trainer.state.epoch == 3


def test_the_grad_scaler_state_round_trips(tmp_path):
    trainer = make_trainer(precision="16-mixed", max_epochs=1)
    trainer.fit(train_loader())
    trainer.state.precision.scaler.update(1234.0)  # a scale no fresh scaler has
    path = save_checkpoint(trainer, tmp_path / "amp.ckpt")
    resumed = make_trainer(precision="16-mixed", max_epochs=1)
    resumed.fit(train_loader(), ckpt_path=path)
    assert resumed.state.precision.scaler.get_scale() == 1234.0


# ---------------------------------------------------------------------- callback states
class _Stateful(Callback):
    def __init__(self, value) -> None:
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state) -> None:
        self.value = state["value"]


def test_callback_states_round_trip_and_numpy_scalars_become_numbers(tmp_path):
    trainer = make_trainer(callbacks=[_Stateful(np.float32(0.25))], max_epochs=1)
    trainer.fit(train_loader())
    path = save_checkpoint(trainer, tmp_path / "a.ckpt")
    restored = _Stateful(None)
    make_trainer(callbacks=[restored], max_epochs=1).fit(train_loader(), ckpt_path=path)
    assert restored.value == 0.25 and type(restored.value) is float


def test_a_state_that_cannot_load_safely_is_refused_when_saving(tmp_path):
    trainer = make_trainer(callbacks=[_Stateful(Path("x"))], max_epochs=1)
    trainer.fit(train_loader())
    with pytest.raises(CheckpointError, match=r"checkpoint\['callbacks'\]\['_Stateful'\]\['value'\]: is a "
                                              r"pathlib\.PosixPath.*weights_only=True"):
        save_checkpoint(trainer, tmp_path / "a.ckpt")
    assert not list(tmp_path.iterdir())  # nothing written


# ---------------------------------------------------------------------- safetensors weights
class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # one tensor under two names


def test_weights_round_trip_through_safetensors_with_tied_weights(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    path = save_weights(model, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    other = TiedLM()
    load_weights(other, path)
    assert torch.equal(other.embed.weight, model.embed.weight)
    assert other.head.weight is other.embed.weight  # still tied


def test_load_weights_errors_name_the_file(tmp_path):
    path = save_weights(nn.Linear(2, 3), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"w\.safetensors: does not match Linear: shape mismatches: "
                                              r"weight: file \[3, 2\], model \[4, 2\]"):
        load_weights(nn.Linear(2, 4), path)
    with pytest.raises(CheckpointError, match=r"does not match Sequential: missing keys: 0\.weight, 0\.bias; "
                                              r"unexpected keys: bias, weight"):
        load_weights(nn.Sequential(nn.Linear(2, 3)), path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="is truncated or corrupt"):
        load_weights(nn.Linear(2, 3), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(nn.Linear(2, 3), tmp_path / "missing.safetensors")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)


@pytest.mark.parametrize("case", ["last-layer-shape", "extra-layer", "dtype", "lenient-but-shape"])
def test_load_weights_checks_everything_before_copying_anything(tmp_path, case):
    """Another model's file: the tensors that would fit are not copied either (no half-loaded model)."""
    torch.manual_seed(0)
    saved = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    path = save_weights(saved, tmp_path / "other.safetensors")
    torch.manual_seed(1)
    strict = case != "lenient-but-shape"
    if case in ("last-layer-shape", "lenient-but-shape"):  # 0.weight and 0.bias fit, 2.* do not
        model, expected = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), "shape mismatches: 2.weight"
    elif case == "extra-layer":  # every saved tensor fits, the model has one layer more
        model, expected = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3), nn.Linear(3, 3)), \
            "missing keys: 3.weight, 3.bias"
    else:  # same shapes, but the model is float64: a silent cast would hide a file of another model
        model, expected = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).double(), \
            "dtype mismatches: 0.weight: file torch.float32, model torch.float64"
    before = snapshot(model)
    assert not torch.equal(before["0.weight"].float(), saved[0].weight)  # a copy would show
    with pytest.raises(CheckpointError, match=rf"other\.safetensors: does not match Sequential: .*{expected}.*"
                                              r"Nothing was loaded\."):
        load_weights(model, path, strict=strict)
    assert_untouched(model, before)


def test_load_weights_strict_false_allows_missing_and_unexpected_keys(tmp_path):
    torch.manual_seed(0)
    saved = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    path = save_weights(saved, tmp_path / "w.safetensors")
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3), nn.Linear(3, 3))
    extra_before = model[3].weight.detach().clone()
    load_weights(model, path, strict=False)
    assert torch.equal(model[0].weight, saved[0].weight) and torch.equal(model[2].bias, saved[2].bias)
    assert torch.equal(model[3].weight, extra_before)  # not in the file: left as it was


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_weights_and_checkpoints_get_the_usual_mode_under_the_umask(tmp_path, umask):
    """Not the 0600 of a temporary file: 0666 less the umask, like any file the user writes."""
    expected = 0o666 & ~umask
    previous = os.umask(umask)
    try:
        weights = save_weights(nn.Linear(2, 3), tmp_path / "model.safetensors")
        make_trainer(callbacks=[ModelCheckpoint(tmp_path / "ckpt", save_top_k=1)], max_epochs=1).fit(train_loader())
    finally:
        os.umask(previous)
    files = [weights, *sorted((tmp_path / "ckpt").iterdir())]
    assert [p.name for p in files] == ["model.safetensors", "epoch=1-step=3.ckpt", "last.ckpt"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(expected) for p in files}


def test_model_checkpoint_files_never_hold_a_half_window(tmp_path):
    """A mid-epoch checkpoint is taken right after an optimizer step: no gradient is left to save."""
    trainer = make_trainer(callbacks=[ModelCheckpoint(tmp_path, every_n_train_steps=1, save_top_k=-1)], max_epochs=1,
                           accumulate_grad_batches=2)
    trainer.fit(train_loader())
    ckpt = load_checkpoint(tmp_path / "epoch=1-step=1.ckpt")
    assert ckpt["counters"]["batch_idx"] == 2 and ckpt["progress"]["losses"]["loss"]["count"] == 32
    assert ckpt["rng"]["epoch_start"] is not None


def test_optimizer_state_of_another_shape_is_named():
    from adaptrain.checkpoint.compat import optimizer_mismatch

    small, large = nn.Linear(2, 3), nn.Linear(2, 4)
    saved = torch.optim.Adam(small.parameters())
    small(torch.randn(1, 2)).sum().backward()
    saved.step()
    problem = optimizer_mismatch(torch.optim.Adam(large.parameters()), saved.state_dict(), "Adam")
    assert problem.startswith("has optimizer state 'exp_avg' of shape [3, 2] for a parameter of shape [4, 2]")
    assert optimizer_mismatch(saved, saved.state_dict(), "Adam") is None


def test_a_one_cycle_run_cannot_be_resumed_for_more_epochs(tmp_path):
    import functools

    from torch.optim.lr_scheduler import OneCycleLR

    first = make_trainer(max_epochs=1, scheduler=functools.partial(OneCycleLR, max_lr=0.1))
    first.fit(train_loader())
    path = save_checkpoint(first, tmp_path / "cycle.ckpt")
    longer = make_trainer(max_epochs=2, scheduler=functools.partial(OneCycleLR, max_lr=0.1))
    before = {k: v.clone() for k, v in longer.model.state_dict().items()}
    with pytest.raises(CheckpointError, match="OneCycleLR schedule of 3 steps with 0 left, but this run has 3 more"):
        longer.fit(train_loader(), ckpt_path=path)
    assert all(torch.equal(before[k], v) for k, v in longer.model.state_dict().items())
    assert longer.state.global_step == 0


def test_garbage_is_called_corrupt_not_malicious(tmp_path):
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(b"garbage\n")
    with pytest.raises(CheckpointError, match="is not a checkpoint or is corrupt"):
        load_checkpoint(path)
