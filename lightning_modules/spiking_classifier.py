"""Training a spiking classifier with surrogate gradients, and reporting its spikes and estimated energy.

The network is a :class:`snn.SpikingNetwork` (usually converted from a trained VGG). Its
thresholds and leaks are parameters, so the optimizer trains them with the weights, and
the leaks are clamped to at most 1 after every optimizer step.

After each test the module measures spike rates and synaptic operations on the test
batches with :func:`snn.measure_spike_statistics`, and exposes them to the cost callbacks:

- ``operation_counts()``: the spiking network's MACs (the analog first layer, T times) and
  accumulates (one per spike per synapse reached). ``EnergyCallback`` estimates the energy
  of one inference from them.
- ``cost_model()``: a view of the network whose forward pass runs only the first layer, T
  times, so ``FlopsCallback`` reports the multiply-accumulates that the spiking network
  really performs instead of counting every layer as dense. Its parameter count is the
  whole network's.
"""

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.callbacks.energy import OperationCounts
from lightning_modules.callbacks.flops import example_input_from_datamodule, example_input_of
from lightning_modules.classifier import scheduled_optimizer
from snn import (
    ENERGY_PER_ACCUMULATE_PJ,
    ENERGY_PER_MAC_PJ,
    SpikeStatistics,
    SpikingNetwork,
    measure_spike_statistics,
    register_leak_clamp,
    spiking_neurons,
)

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]


class FirstLayerMultiplies(nn.Module):
    """The multiply-accumulates of a spiking network: its analog first layer run once per timestep.

    The layers after it receive binary spikes and only accumulate, so a FLOP counter that
    runs this module counts what the spiking network multiplies. The whole network is a
    submodule, so its parameters are all counted.
    """

    def __init__(self, network: SpikingNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.network.encoder(images) for _ in range(self.network.timesteps)])


class SpikingClassifierModule(L.LightningModule):
    """Train a :class:`SpikingNetwork` with cross-entropy on its timestep-accumulated output.

    Args:
        network: the spiking network. Its ``timesteps`` and ``output_reduction`` are used as set.
        optimizer: a factory taking parameter groups, such as
            ``functools.partial(torch.optim.Adam, lr=1e-4, amsgrad=True)``.
        scheduler: keyword arguments of :func:`lightning_modules.schedules.build_scheduler`
            without the optimizer and step counts, e.g. ``{"name": "multistep", "milestones": [6, 8]}``.
        num_classes: number of classes, for the accuracy metrics.
        energy_per_mac_pj, energy_per_accumulate_pj: constants of the energy estimate.
        statistics_batches: test batches on which spikes are counted after each test. None
            counts on all batches that the test ran.
        neuron_lr_scale: the thresholds' and leaks' learning rate as a multiple of the
            weights'. Adam moves a scalar by at most about its learning rate per step, so
            a short run needs a larger scale for the thresholds to adapt to a new T.
    """

    # What FlopsCallback's count covers, printed with it: spikes cost accumulates, not MACs.
    cost_note = "multiplies only: the analog first layer, T times; spikes cost accumulates, see [energy]"

    def __init__(
        self,
        network: SpikingNetwork,
        optimizer: OptimizerFactory,
        scheduler: dict[str, Any],
        num_classes: int,
        energy_per_mac_pj: float = ENERGY_PER_MAC_PJ,
        energy_per_accumulate_pj: float = ENERGY_PER_ACCUMULATE_PJ,
        statistics_batches: int | None = None,
        neuron_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if statistics_batches is not None and statistics_batches < 1:
            raise ValueError(f"statistics_batches must be >= 1 or None (all test batches), got {statistics_batches}")
        if neuron_lr_scale <= 0:
            raise ValueError(
                f"neuron_lr_scale must be > 0 (1 trains thresholds and leaks like weights), got {neuron_lr_scale}"
            )
        self.network = network
        self.optimizer_factory = optimizer
        self.scheduler_options = dict(scheduler)
        self.energy_per_mac_pj = energy_per_mac_pj
        self.energy_per_accumulate_pj = energy_per_accumulate_pj
        self.statistics_batches = statistics_batches
        self.neuron_lr_scale = neuron_lr_scale
        self.spike_statistics: SpikeStatistics | None = None

        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    @property
    def timesteps(self) -> int:
        """Timesteps T of the network."""
        return self.network.timesteps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, num_classes)``: the readout accumulated over the timesteps."""
        return self.network(images)

    def setup(self, stage: str) -> None:
        # A single-sample input lets the cost callbacks run the network without the data set.
        example = example_input_from_datamodule(getattr(self.trainer, "datamodule", None))
        if example is not None:
            self.example_input_array = example

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.train_accuracy(logits, labels)
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(labels))
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(labels))
        self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        self._evaluate(batch, "val", self.val_accuracy)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        self._evaluate(batch, "test", self.test_accuracy)

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], split: str, accuracy: MulticlassAccuracy) -> None:
        images, labels = batch
        logits = self(images)
        accuracy(logits, labels)
        self.log(f"{split}/loss", F.cross_entropy(logits, labels), batch_size=len(labels), sync_dist=True)
        self.log(f"{split}/acc", accuracy, prog_bar=True, batch_size=len(labels))

    def on_test_epoch_end(self) -> None:
        # Runs before the callbacks' on_test_end, where EnergyCallback reads operation_counts().
        # NOTE: under DDP each rank counts the spikes of its own share of the test set.
        loader = self.trainer.test_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        max_batches = self.statistics_batches
        tested_batches = self.trainer.num_test_batches[0] if self.trainer.num_test_batches else None
        if tested_batches is not None and tested_batches != float("inf"):
            max_batches = int(tested_batches) if max_batches is None else min(max_batches, int(tested_batches))
        self.spike_statistics = measure_spike_statistics(
            self.network,
            loader,
            max_batches=max_batches,
            energy_per_mac_pj=self.energy_per_mac_pj,
            energy_per_accumulate_pj=self.energy_per_accumulate_pj,
        )

    def operation_counts(self) -> OperationCounts:
        """Return the spiking network's MACs and accumulates per inference, measured in the last test."""
        if self.spike_statistics is None:
            raise ValueError(
                "spike statistics are measured during test, so run trainer.test before counting operations"
            )
        return self.spike_statistics.operation_counts()

    def cost_model(self) -> tuple[nn.Module, torch.Tensor]:
        """Return the module that ``FlopsCallback`` counts: the first layer T times (see the module docstring)."""
        return FirstLayerMultiplies(self.network), example_input_of(self)

    def configure_optimizers(self) -> dict[str, Any]:
        trainable = [p for p in self.parameters() if p.requires_grad]
        neuron_ids = {id(p) for _, node in spiking_neurons(self.network) for p in (node.threshold, node.leak)}
        neuron_parameters = [p for p in trainable if id(p) in neuron_ids]

        # One group at scale 1, so that a stage checkpointed before the scale existed still resumes.
        if self.neuron_lr_scale == 1.0 or not neuron_parameters:
            optimizer = self.optimizer_factory([{"params": trainable}])
        else:
            weights = [p for p in trainable if id(p) not in neuron_ids]
            optimizer = self.optimizer_factory([{"params": weights}, {"params": neuron_parameters}])

            # Scaled before the scheduler is built, so that it records the scaled rate as the group's initial one.
            optimizer.param_groups[1]["lr"] *= self.neuron_lr_scale
        register_leak_clamp(optimizer, self.network)
        return scheduled_optimizer(self.trainer, optimizer, self.scheduler_options)

    def configure_callbacks(self) -> list[L.Callback]:
        return [SpikeStatisticsCallback()]

    def thresholds(self) -> dict[str, float]:
        """Return each neuron layer's threshold, by layer name."""
        return {name: node.threshold.item() for name, node in spiking_neurons(self.network)}

    def leaks(self) -> dict[str, float]:
        """Return each neuron layer's leak parameter, by layer name."""
        return {name: node.leak.item() for name, node in spiking_neurons(self.network)}


def mean_spike_rate(statistics: SpikeStatistics) -> float:
    """Return the spikes per neuron per timestep over all neuron layers together."""
    neurons = sum(layer.neurons for layer in statistics.neuron_layers)
    spikes = sum(layer.spikes for layer in statistics.neuron_layers)
    return spikes / (neurons * statistics.timesteps) if neurons else 0.0


class SpikeStatisticsCallback(L.Callback):
    """Add the spiking network's spike rates, synaptic operations and energy estimate to the run summary."""

    def __init__(self) -> None:
        self.module: SpikingClassifierModule | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(pl_module, SpikingClassifierModule):
            self.module = pl_module

    def summary(self) -> dict[str, Any]:
        """Return the figures of the last test: per-layer spike rates, operations and energy, with constants."""
        statistics = self.module.spike_statistics if self.module is not None else None
        if statistics is None:
            return {}
        result = statistics.as_dict()
        result["snn/spike_rate"] = mean_spike_rate(statistics)
        result["snn/energy_constants"] = statistics.constants_text()
        result["snn/statistics_images"] = statistics.images
        result["snn/thresholds"] = self.module.thresholds()
        result["snn/leaks"] = self.module.leaks()
        return result

    def summary_rows(self) -> list[tuple[str, str]]:
        """Return ``(label, text)`` rows for the terminal summary."""
        statistics = self.module.spike_statistics if self.module is not None else None
        if statistics is None:
            return []
        rates = ", ".join(f"{layer.name} {layer.spike_rate:.3f}" for layer in statistics.neuron_layers)
        return [
            ("timesteps", str(statistics.timesteps)),
            ("spike rate per layer", f"{rates} (spikes per neuron per timestep)"),
            ("MACs counted", "first layer x T only, because the other layers accumulate spikes"),
            ("synaptic accumulates", f"{statistics.snn_accumulates:.4g} per image"),
            (
                "energy vs ANN",
                f"SNN {statistics.snn_energy_pj / 1e6:.4g} uJ, ANN {statistics.ann_energy_pj / 1e6:.4g} uJ, "
                f"ratio {statistics.energy_ratio:.3g}x ({statistics.constants_text()})",
            ),
        ]
