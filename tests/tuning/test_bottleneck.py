"""Bottleneck rules on synthetic timings, and recommendations that a run config accepts as they are."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from adaptrain.cli.config import DataConfig, TrainerConfig, load_config
from adaptrain.core.precision import PRECISIONS
from adaptrain.tuning.bottleneck import (
    BOTTLENECKS,
    CONFIG_KEYS,
    Bottleneck,
    Recommendation,
    name_bottleneck,
    recommend,
    to_config,
    to_yaml,
)

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "digits_mlp.yaml"
CURRENT = {"data.num_workers": 2, "data.pin_memory": False, "data.batch_size": 64, "trainer.precision": "32"}


# ------------------------------------------------------------------ naming
@pytest.mark.parametrize(("timings", "name"), [
    ({"data_time": 4.0, "compute_time": 6.0}, "data"),  # data-bound loop: 40% waiting for batches
    ({"data_time": 0.2, "compute_time": 9.8}, "compute"),  # compute-bound: 2% waiting
    ({"data_time": 0.2, "compute_time": 9.8, "transfer_time": 3.0}, "transfer"),  # copies 30% of the step
    ({"data_time": 2.0, "compute_time": 8.0, "transfer_time": 3.0}, "transfer"),  # both over 10%: the larger
    ({"data_time": 3.5, "compute_time": 6.5, "transfer_time": 3.0}, "data"),
    ({"data_time": 4.0, "compute_time": 6.0, "memory_fraction": 0.97}, "memory"),  # memory outranks data
    ({"data_time": 0.2, "compute_time": 9.8, "ram_fraction": 0.93}, "memory"),
    ({"data_time": 0.9, "compute_time": 9.1, "gpu_util": 0.2}, "compute"),  # 9% data wait: under the share
])
def test_rules_name_the_bottleneck(timings, name):
    result = name_bottleneck(**timings)
    assert result.name == name and result.name in BOTTLENECKS
    assert result.reason.startswith("memory pressure" if name == "memory" else f"{name}-bound")


def test_numbers_behind_the_name_are_the_measured_ones_only():
    cpu = name_bottleneck(4.0, 6.0)
    assert cpu.numbers == {"data_time": 4.0, "compute_time": 6.0, "data_share": 0.4}  # no GPU fields, not zeros
    gpu = name_bottleneck(1.0, 9.0, transfer_time=0.5, gpu_util=0.8, memory_fraction=0.5, ram_fraction=0.3, mfu=0.4)
    assert gpu.numbers == pytest.approx({"data_time": 1.0, "compute_time": 9.0, "data_share": 0.1,
                                         "transfer_time": 0.5, "transfer_share": 0.05, "gpu_util": 0.8,
                                         "memory_fraction": 0.5, "ram_fraction": 0.3, "mfu": 0.4})


def test_reasons_carry_the_numbers():
    assert name_bottleneck(4.0, 6.0).reason == "data-bound: data wait 40% of step time (from 10% it is the bottleneck)"
    assert name_bottleneck(0.2, 9.8, gpu_util=0.35, mfu=0.12).reason == (
        "compute-bound: data wait 2% of step time; GPU busy only 35%: kernels too small or launched too slowly; "
        "model FLOP utilisation 12.0%")
    assert name_bottleneck(0.2, 9.8, gpu_util=0.95).reason.endswith("; GPU busy 95%")
    device = name_bottleneck(0.2, 9.8, memory_fraction=0.97)
    assert (device.memory, device.reason) == ("device", "memory pressure: device memory 97% used (limit 95%); "
                                                        "data wait 2% of step time")
    assert name_bottleneck(0.2, 9.8, ram_fraction=0.93).memory == "host"


def test_thresholds_are_options():
    assert name_bottleneck(0.5, 9.5).name == "compute"
    assert name_bottleneck(0.5, 9.5, share=0.04).name == "data"
    assert name_bottleneck(0.2, 9.8, memory_fraction=0.9, memory_limit=0.85).name == "memory"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"data_time": -1.0, "compute_time": 1.0}, "data_time is -1.0; expected seconds >= 0."),
    ({"data_time": 0.0, "compute_time": 0.0}, "data_time + compute_time is 0; measure over at least one batch."),
    ({"data_time": 1.0, "compute_time": 1.0, "transfer_time": 2.0},
     "transfer_time is 2.0, more than compute_time (1.0); the copy time is measured inside the compute span."),
    ({"data_time": 1.0, "compute_time": 1.0, "gpu_util": 80.0},
     "gpu_util is 80.0; expected a fraction in [0, 1] or None."),
])
def test_bad_input_gets_one_message_naming_it(kwargs, message):
    with pytest.raises(ValueError) as error:
        name_bottleneck(**kwargs)
    assert str(error.value) == message


# ------------------------------------------------------------------ recommendations
def values(recs):
    return {key: rec.value for key, rec in recs.items()}


def test_data_bound_recommends_more_workers_and_pinned_memory_on_cuda():
    b = name_bottleneck(4.0, 6.0)
    assert values(recommend(b, CURRENT, cuda=True, max_workers=8)) == {"data.num_workers": 4, "data.pin_memory": True}
    assert values(recommend(b, CURRENT, max_workers=3)) == {"data.num_workers": 3}  # no pinning without CUDA
    assert values(recommend(b, CURRENT, max_workers=2)) == {}  # at the ceiling already
    assert values(recommend(b, {**CURRENT, "data.num_workers": 0})) == {"data.num_workers": 1}
    assert "data wait is 40% of step time" in recommend(b, CURRENT)["data.num_workers"].reason


def test_tuned_workers_are_measured_so_they_win():
    recs = recommend(name_bottleneck(4.0, 6.0), CURRENT, max_workers=8, tuned={"num_workers": 3})
    assert recs["data.num_workers"] == Recommendation(3, "measured by the loader tuner in this run")
    assert values(recommend(name_bottleneck(0.1, 9.9), CURRENT, tuned={"num_workers": 2})) == {}  # unchanged


def test_transfer_bound_recommends_pinned_memory_on_cuda_only():
    b = name_bottleneck(0.2, 9.8, transfer_time=3.0)
    assert values(recommend(b, CURRENT, cuda=True)) == {"data.pin_memory": True}
    assert values(recommend(b, {**CURRENT, "data.pin_memory": True}, cuda=True)) == {}
    assert values(recommend(b, CURRENT)) == {}


def test_compute_bound_recommends_precision_on_cuda_and_a_larger_batch_for_an_idle_gpu():
    busy = name_bottleneck(0.1, 9.9, gpu_util=0.95, memory_fraction=0.4)
    assert values(recommend(busy, CURRENT, cuda=True, bf16_supported=True)) == {"trainer.precision": "bf16-mixed"}
    assert values(recommend(busy, CURRENT, cuda=True)) == {"trainer.precision": "16-mixed"}
    assert values(recommend(busy, {**CURRENT, "trainer.precision": "bf16-mixed"}, cuda=True)) == {}
    idle = name_bottleneck(0.1, 9.9, gpu_util=0.3, memory_fraction=0.2)
    recs = recommend(idle, {**CURRENT, "trainer.precision": "bf16-mixed"}, cuda=True)
    assert values(recs) == {"data.batch_size": 128}
    assert "busy only 30% with 20% of its memory" in recs["data.batch_size"].reason
    idle_but_full = name_bottleneck(0.1, 9.9, gpu_util=0.3, memory_fraction=0.8)
    assert "data.batch_size" not in recommend(idle_but_full, CURRENT, cuda=True)
    assert values(recommend(name_bottleneck(0.1, 9.9), CURRENT)) == {}  # CPU, compute-bound: nothing to change


def test_memory_pressure_recommends_a_smaller_batch_or_fewer_workers():
    device = name_bottleneck(0.1, 9.9, memory_fraction=0.98)
    assert values(recommend(device, CURRENT, cuda=True)) == {"trainer.precision": "16-mixed", "data.batch_size": 32}
    host = name_bottleneck(0.1, 9.9, ram_fraction=0.95)
    recs = recommend(host, {**CURRENT, "data.num_workers": 5})
    assert values(recs) == {"data.num_workers": 2}
    assert recs["data.num_workers"].reason.startswith("host RAM is 95% used")


def test_keys_not_in_current_are_not_recommended():
    assert recommend(name_bottleneck(4.0, 6.0), {}, cuda=True) == {}


def test_recommendation_keys_are_the_config_schema_keys_with_valid_values():
    schema = {"data": DataConfig, "trainer": TrainerConfig}
    for key in CONFIG_KEYS:
        section, name = key.split(".")
        assert name in {f.name for f in dataclasses.fields(schema[section])}, key
    made = {}
    for b in (name_bottleneck(4.0, 6.0), name_bottleneck(0.1, 9.9, gpu_util=0.3, memory_fraction=0.2),
              name_bottleneck(0.1, 9.9, memory_fraction=0.98), name_bottleneck(0.1, 9.9, ram_fraction=0.95)):
        for bf16 in (False, True):
            made.update(recommend(b, CURRENT, cuda=True, bf16_supported=bf16))
    assert set(made) == set(CONFIG_KEYS)
    assert made["trainer.precision"].value in PRECISIONS


def test_unknown_bottleneck_name_is_refused():
    with pytest.raises(ValueError, match="bottleneck.name is 'disk'; expected one of data, compute, memory, transfer."):
        recommend(Bottleneck("disk", {}, ""), CURRENT)


# ------------------------------------------------------------------ resources.yaml
def test_yaml_snippet_round_trips_and_carries_the_reasons():
    recs = {"data.num_workers": Recommendation(4, "data wait is 40% of step time"),
            "data.pin_memory": Recommendation(True, "pinned copies"),
            "trainer.precision": Recommendation("bf16-mixed", "tensor cores")}
    text = to_yaml(recs, header="written by ResourceMonitor\nepoch 3")
    assert yaml.safe_load(text) == to_config(recs) == {"data": {"num_workers": 4, "pin_memory": True},
                                                       "trainer": {"precision": "bf16-mixed"}}
    assert text.splitlines()[:5] == ["# written by ResourceMonitor", "# epoch 3", "data:",
                                     "  # data wait is 40% of step time", "  num_workers: 4"]
    assert yaml.safe_load(to_yaml({})) == {}


def test_yaml_snippet_merges_into_a_run_config_as_it_is(tmp_path):
    recs = recommend(name_bottleneck(0.1, 9.9, gpu_util=0.3, memory_fraction=0.2),
                     {**CURRENT, "data.batch_size": 32}, cuda=True, bf16_supported=True)
    resources = tmp_path / "resources.yaml"
    resources.write_text(to_yaml(recs), encoding="utf-8")
    config = load_config([EXAMPLE_CONFIG, resources])
    assert config["data"]["batch_size"] == 64
    assert config["trainer"]["precision"] == "bf16-mixed"
    empty = tmp_path / "nothing.yaml"
    empty.write_text(to_yaml({}), encoding="utf-8")
    assert load_config([EXAMPLE_CONFIG, empty]) == load_config([EXAMPLE_CONFIG])


def test_to_config_refuses_a_key_that_is_not_section_dot_name():
    with pytest.raises(ValueError, match="recommendation key 'num_workers'; expected section.name"):
        to_config({"num_workers": Recommendation(2, "")})
