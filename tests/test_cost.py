"""FLOPs, MACs and energy accounting against hand-computed figures."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from lightning_modules.callbacks import throughput
from lightning_modules.callbacks.energy import EnergyCallback, EnergyMeter, OperationCounts, estimate_inference_energy
from lightning_modules.callbacks.flops import FlopsCallback, count_forward_cost
from models import create_model


def _small_network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, kernel_size=3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


def test_small_network_macs_by_hand() -> None:
    cost = count_forward_cost(_small_network(), torch.zeros(1, 1, 8, 8))
    conv_macs = 4 * 1 * 3 * 3 * 8 * 8  # out channels x in channels x kernel x output pixels
    linear_macs = 256 * 10
    assert cost.macs == conv_macs + linear_macs


def test_flops_are_twice_macs() -> None:
    cost = count_forward_cost(_small_network(), torch.zeros(1, 1, 8, 8))
    assert cost.flops == 2 * cost.macs


def test_small_network_parameters_by_hand() -> None:
    cost = count_forward_cost(_small_network(), torch.zeros(1, 1, 8, 8))
    conv = 4 * 9 + 4
    batchnorm = 2 * 4
    linear = 256 * 10 + 10
    assert cost.parameters == conv + batchnorm + linear


def test_counts_are_per_sample() -> None:
    network = _small_network()
    single = count_forward_cost(network, torch.zeros(1, 1, 8, 8))
    batch = count_forward_cost(network, torch.zeros(5, 1, 8, 8))
    assert batch.macs == single.macs


def test_counting_restores_training_mode() -> None:
    network = _small_network().train()
    count_forward_cost(network, torch.zeros(1, 1, 8, 8))
    assert network.training


def test_resnet20_macs_match_literature() -> None:
    # 40.55M MACs is the figure quoted across the CIFAR pruning literature (about 41M).
    cost = count_forward_cost(create_model("resnet20", 3, 10), torch.zeros(1, 3, 32, 32))
    assert math.isclose(cost.macs, 40.55e6, rel_tol=0.005)


def test_estimated_energy_by_hand() -> None:
    counts = OperationCounts(macs=1e6, accumulates=2e6)
    joules = estimate_inference_energy(counts, energy_per_mac_pj=4.6, energy_per_accumulate_pj=0.9)
    assert math.isclose(joules, (1e6 * 4.6 + 2e6 * 0.9) * 1e-12)


def test_measured_energy_unavailable_is_not_zero() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible, so measured energy may be available")
    meter = EnergyMeter(gpu_index=None, read_cpu=False)
    meter.begin("fit")
    measured = meter.end("fit")
    assert measured.joules is None
    assert measured.detail.startswith("unavailable: no NVIDIA GPU in use")


def test_unavailable_energy_reason_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible, so measured energy may be available")
    callback = EnergyCallback()
    callback.meter = EnergyMeter(gpu_index=None, read_cpu=False)
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cpu"), reduce=lambda value, **_: value),
        world_size=1,
        loggers=[],
        global_step=0,
    )

    with caplog.at_level(logging.INFO):
        for window in ("fit", "test"):
            callback.meter.begin(window)
            callback._finish_window(window, trainer)

    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("[energy]")]
    assert lines[0].startswith("[energy] fit: measured unavailable: no NVIDIA GPU in use")
    assert lines[1] == "[energy] test: measured unavailable, for the reason given above"
    assert callback.measured["test"].detail == callback.measured["fit"].detail


class _CountedModule(nn.Module):
    """A module whose cost model is one linear layer of 9 parameters."""

    def cost_model(self) -> tuple[nn.Module, torch.Tensor]:
        return nn.Linear(2, 3), torch.zeros(1, 2)


class _PartlyCountedModule(_CountedModule):
    """A module whose count covers only part of its work, as a spiking network's does."""

    cost_note = "first layer only"


@pytest.mark.parametrize(("module", "note"), [(_PartlyCountedModule(), " (first layer only)"), (_CountedModule(), "")])
def test_flops_line_names_counted_part(caplog: pytest.LogCaptureFixture, module: nn.Module, note: str) -> None:
    trainer = SimpleNamespace(loggers=[], global_step=0)
    with caplog.at_level(logging.INFO):
        FlopsCallback()._count("test", trainer, module)
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("[flops]")]
    assert lines == [f"[flops] test: 9 parameters, 0.00 M MACs = 0.00 M FLOPs per sample{note}"]


def test_throughput_after_mid_epoch_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    # The clock is read when the first batch starts (100 s) and when each batch ends.
    readings = iter([100.0, 101.0, 103.0, 106.0])
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(readings))
    callback = throughput.ThroughputCallback()
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cpu"), reduce=lambda value, **_: value)
    )
    module = SimpleNamespace(log=lambda *args, **kwargs: None)
    batch = (torch.zeros(8, 1), torch.zeros(8))

    # Lightning calls no on_train_epoch_start for an epoch it resumes in the middle.
    for index in range(3):
        callback.on_train_batch_start(trainer, module, batch, index)
        callback.on_train_batch_end(trainer, module, None, batch, index)
    callback.on_train_epoch_end(trainer, module)

    # 24 samples from the first batch's start (100 s) to the last batch's end (106 s).
    assert callback.train_rates == [4.0]
