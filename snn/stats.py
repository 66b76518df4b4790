"""Spike rates, synaptic operations and estimated compute energy of a :class:`SpikingNetwork` on data.

Energy is estimated from operation counts with the 45 nm figures of Horowitz,
"Computing's energy problem", ISSCC 2014: 4.6 pJ per 32-bit float multiply-accumulate
(MAC) and 0.9 pJ per 32-bit float accumulate (AC). Memory traffic is not included.

- The spiking network: its first layer receives the analog image, so it performs
  MACs, counted once per timestep (``MACs_1 * T``). Every other synaptic layer
  receives binary spikes and performs one accumulate per spike per synapse that the
  spike reaches (its fan-out), summed over the T timesteps. The readout, global average
  pooling then a linear layer, counts ``num_classes`` accumulates per incoming spike.
  Behind an average pooling (one, or several in a row), each spike in a pooling window
  reaches the synapses of the pooled position, weighted by one over the number of inputs
  in the window, so it counts one accumulate per synapse of that position. An average
  pooling of currents, before a neuron layer, counts nothing.
- The same network as an ANN: the MACs of all its convolutions and linear layers,
  counted as ``torch.utils.flop_counter`` does (padded positions included).

The spike counts are exact per spike, so a spike at an image border counts only the
synapses inside the image. The literature's ``spike_rate * MACs * T`` counts padded
positions too, so it gives slightly more accumulates for the same spikes. For the hidden
layers that no average pooling precedes, the counts equal SpikingJelly's
``op_counter.SynOpCounter``. SynOpCounter counts a layer only when its whole input is
binary, so it counts nothing for the readout, whose input is pooled, and rarely anything
behind an average pooling. Where a pooled input happens to be binary, it counts a pooled
position once, however many spikes its window holds.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from snn.network import SpikeReadout, SpikingNetwork
from snn.neuron import spiking_neurons

if TYPE_CHECKING:
    from lightning_modules.callbacks.energy import OperationCounts

# Horowitz, ISSCC 2014, 45 nm, 32-bit float.
ENERGY_PER_MAC_PJ = 4.6
ENERGY_PER_ACCUMULATE_PJ = 0.9


@dataclass(frozen=True)
class NeuronLayerStatistics:
    """Spikes of one layer of neurons, per image."""

    name: str
    neurons: int
    spikes: float
    spike_rate: float  # spikes per neuron per timestep


@dataclass(frozen=True)
class SynapticLayerCost:
    """Operations of one synaptic layer (convolution or linear layer), per image over all timesteps."""

    name: str
    input_kind: str  # "image" (analog, MACs) or "spikes" (binary, accumulates)
    ann_macs: float  # the same layer in an ANN, one pass
    macs: float
    accumulates: float


@dataclass(frozen=True)
class SpikeStatistics:
    """Spike rates and operation counts of a spiking network, averaged over the images measured."""

    timesteps: int
    images: int
    neuron_layers: tuple[NeuronLayerStatistics, ...]
    synaptic_layers: tuple[SynapticLayerCost, ...]
    energy_per_mac_pj: float = ENERGY_PER_MAC_PJ
    energy_per_accumulate_pj: float = ENERGY_PER_ACCUMULATE_PJ

    @property
    def snn_macs(self) -> float:
        """MACs per image of the spiking network: the first layer's, times T."""
        return sum(layer.macs for layer in self.synaptic_layers)

    @property
    def snn_accumulates(self) -> float:
        """Accumulates (synaptic operations on spikes) per image, over all timesteps."""
        return sum(layer.accumulates for layer in self.synaptic_layers)

    @property
    def ann_macs(self) -> float:
        """MACs per image of the same network run once as an ANN."""
        return sum(layer.ann_macs for layer in self.synaptic_layers)

    @property
    def snn_energy_pj(self) -> float:
        """Estimated compute energy of one inference of the spiking network, in picojoules."""
        return self.snn_macs * self.energy_per_mac_pj + self.snn_accumulates * self.energy_per_accumulate_pj

    @property
    def ann_energy_pj(self) -> float:
        """Estimated compute energy of one inference of the same network as an ANN, in picojoules."""
        return self.ann_macs * self.energy_per_mac_pj

    @property
    def energy_ratio(self) -> float:
        """Ratio of the ANN's estimated energy to the spiking network's, above 1 when the spiking network needs less."""
        return self.ann_energy_pj / self.snn_energy_pj if self.snn_energy_pj > 0 else float("inf")

    def constants_text(self) -> str:
        """Return a description of the energy constants, to print next to every estimate."""
        return (
            f"{self.energy_per_mac_pj} pJ/MAC, {self.energy_per_accumulate_pj} pJ/accumulate, "
            "45 nm, Horowitz ISSCC 2014, compute only"
        )

    def operation_counts(self) -> "OperationCounts":
        """Return the counts per inference for ``EnergyCallback``, whose ``operation_counts()`` hook reads them.

        A Lightning module that trains a spiking network can return this from its own
        ``operation_counts()``.
        """
        # Imported here so that the snn package does not load Lightning on import.
        from lightning_modules.callbacks.energy import OperationCounts

        return OperationCounts(
            macs=self.snn_macs,
            accumulates=self.snn_accumulates,
            source=(
                f"spiking network at T={self.timesteps}, spike counts on {self.images} images: "
                "first-layer MACs x T, accumulates = spikes x fan-out"
            ),
        )

    def format_report(self) -> str:
        """Return a table of spike rates and operations per layer, and the energy estimate with its constants."""
        lines = [f"Spike statistics at T={self.timesteps} on {self.images} images (per image)"]
        lines.append(f"{'neuron layer':<24} {'neurons':>10} {'spike rate':>11}")
        for neurons in self.neuron_layers:
            lines.append(f"{neurons.name:<24} {neurons.neurons:>10} {neurons.spike_rate:>11.4f}")
        lines.append(f"{'synaptic layer':<24} {'input':>7} {'ANN MACs':>12} {'SNN MACs':>12} {'accumulates':>12}")
        for cost in self.synaptic_layers:
            lines.append(
                f"{cost.name:<24} {cost.input_kind:>7} {cost.ann_macs:>12.4g} "
                f"{cost.macs:>12.4g} {cost.accumulates:>12.4g}"
            )
        lines.append(
            f"energy: SNN {self.snn_energy_pj / 1e6:.4g} uJ, ANN {self.ann_energy_pj / 1e6:.4g} uJ, "
            f"ratio {self.energy_ratio:.3g}x ({self.constants_text()})"
        )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """Return the figures as a flat dictionary of numbers, for loggers."""
        result: dict[str, Any] = {
            "snn/timesteps": self.timesteps,
            "snn/macs_per_image": self.snn_macs,
            "snn/accumulates_per_image": self.snn_accumulates,
            "snn/ann_macs_per_image": self.ann_macs,
            "snn/energy_pj": self.snn_energy_pj,
            "snn/ann_energy_pj": self.ann_energy_pj,
            "snn/energy_ratio": self.energy_ratio,
        }
        for neurons in self.neuron_layers:
            result[f"snn/spike_rate/{neurons.name}"] = neurons.spike_rate
        return result


class _LayerCounter:
    """Totals of one synaptic layer over every forward pass seen by its hook."""

    def __init__(self, name: str, input_kind: str) -> None:
        self.name = name
        self.input_kind = input_kind
        self.ann_macs = 0.0
        self.accumulates: torch.Tensor | float = 0.0


@torch.no_grad()
def measure_spike_statistics(
    network: SpikingNetwork,
    batches: Iterable[Any],
    max_batches: int | None = None,
    energy_per_mac_pj: float = ENERGY_PER_MAC_PJ,
    energy_per_accumulate_pj: float = ENERGY_PER_ACCUMULATE_PJ,
) -> SpikeStatistics:
    """Run ``network`` in eval mode on ``batches`` and count its spikes and synaptic operations per image.

    Args:
        network: the spiking network, at the T it should be measured with.
        batches: images ``[N, C, H, W]``, or ``(images, labels, ...)`` tuples as a
            DataLoader yields them.
        max_batches: stop after this many batches. None measures all of them.
        energy_per_mac_pj, energy_per_accumulate_pj: the energy constants stored with the result.

    The network's training mode and its neurons' recording switches are restored afterwards.
    """
    if energy_per_mac_pj < 0 or energy_per_accumulate_pj < 0:
        raise ValueError(
            f"energies per operation must be >= 0 pJ, got energy_per_mac_pj={energy_per_mac_pj}, "
            f"energy_per_accumulate_pj={energy_per_accumulate_pj}"
        )
    neurons = spiking_neurons(network)
    was_training = network.training
    was_recording = [node.record_spikes for _, node in neurons]
    counters, handles = _register_counters(network)
    image_count = 0
    device = next(network.parameters()).device

    try:
        network.eval()
        for _, node in neurons:
            node.reset_spike_counts()
            node.record_spikes = True
        for batch_index, batch in enumerate(batches):
            if max_batches is not None and batch_index >= max_batches:
                break
            images = batch if isinstance(batch, torch.Tensor) else batch[0]
            network(images.to(device))
            image_count += images.shape[0]
        if image_count == 0:
            raise ValueError("no images to measure, because batches is empty or max_batches is 0")

        timesteps = network.timesteps
        neuron_layers = tuple(
            NeuronLayerStatistics(
                name=name,
                neurons=node.neuron_timesteps // (timesteps * image_count),
                spikes=node.spike_count.item() / image_count,
                spike_rate=node.spike_count.item() / node.neuron_timesteps,
            )
            for name, node in neurons
        )
    finally:
        for handle in handles:
            handle.remove()
        for (_, node), recording in zip(neurons, was_recording, strict=True):
            node.record_spikes = recording
        network.train(was_training)

    synaptic_layers = tuple(_layer_cost(counter, timesteps, image_count) for counter in counters)
    return SpikeStatistics(
        timesteps=timesteps,
        images=image_count,
        neuron_layers=neuron_layers,
        synaptic_layers=synaptic_layers,
        energy_per_mac_pj=energy_per_mac_pj,
        energy_per_accumulate_pj=energy_per_accumulate_pj,
    )


def _layer_cost(counter: _LayerCounter, timesteps: int, image_count: int) -> SynapticLayerCost:
    if counter.input_kind == "image":
        # The encoder runs once per image, but the image enters it at every timestep.
        ann_macs = counter.ann_macs / image_count
        return SynapticLayerCost(counter.name, "image", ann_macs, macs=ann_macs * timesteps, accumulates=0.0)
    # Spiking layers run on all T timesteps at once, so their dense count covers T passes.
    ann_macs = counter.ann_macs / (timesteps * image_count)
    accumulates = float(counter.accumulates) / image_count
    return SynapticLayerCost(counter.name, "spikes", ann_macs, macs=0.0, accumulates=accumulates)


def _register_counters(network: SpikingNetwork) -> tuple[list[_LayerCounter], list[Any]]:
    counters: list[_LayerCounter] = []
    handles = []

    encoder_counter = _LayerCounter("encoder", "image")
    counters.append(encoder_counter)
    handles.append(network.encoder.register_forward_hook(_encoder_hook(encoder_counter)))

    pooled_counts = _PooledSpikeCounts()
    for name, module in network.features.named_modules():
        if isinstance(module, nn.AvgPool2d):
            handles.append(module.register_forward_hook(pooled_counts.pool_hook(f"features.{name}")))
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            counter = _LayerCounter(f"features.{name}", "spikes")
            counters.append(counter)
            handles.append(module.register_forward_hook(_spike_layer_hook(counter, pooled_counts)))

    readout_counter = _LayerCounter("readout", "spikes")
    counters.append(readout_counter)
    handles.append(network.readout.register_forward_hook(_readout_hook(readout_counter, pooled_counts)))
    return counters, handles


class _PooledSpikeCounts:
    """The number of spikes in each window of the last average pooling, for the layer that reads its output.

    The synaptic layer receives the windows' mean, a fraction. Its accumulates are counted on
    the spikes instead: each spike in a window reaches the synapses of the pooled position.
    A layer reads the counts only when its input shares storage with the pooling's output,
    as views through SeqToANNContainer reshapes and eval-mode dropout do. Any other input
    must be binary spikes and is counted as such.
    """

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def pool_hook(self, name: str):
        def hook(module: nn.AvgPool2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            source = inputs[0]
            if self._reads_pooled_output(source):
                # A second pooling in a row pools the spike counts of the first.
                source = self.counts.reshape(source.shape)
            elif ((source != 0) & (source != 1)).any():
                # A pooling of currents, before a neuron, has no spikes to count.
                self.counts = self.output = None
                return
            # A multi-step SpikingJelly pooling receives [T, N, C, H, W].
            spatial = source.flatten(0, source.dim() - 4) if source.dim() > 4 else source
            self.counts = F.avg_pool2d(
                spatial, module.kernel_size, module.stride, module.padding, module.ceil_mode, divisor_override=1
            )
            self.output = output

        return hook

    def spikes_into(self, inputs: torch.Tensor, name: str) -> torch.Tensor:
        """Return the spike counts behind a synaptic layer's input: the pooled counts, or the binary input itself."""
        if not self._reads_pooled_output(inputs):
            _check_binary(inputs, name)
            return inputs
        counts = self.counts
        self.counts = self.output = None
        return counts.reshape(inputs.shape)

    def _reads_pooled_output(self, tensor: torch.Tensor) -> bool:
        return (
            self.output is not None
            and tensor.data_ptr() == self.output.data_ptr()
            and tensor.numel() == self.output.numel()
        )


def _encoder_hook(counter: _LayerCounter):
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        counter.ann_macs += _dense_macs(module, output, counter.name)

    return hook


def _spike_layer_hook(counter: _LayerCounter, pooled_counts: _PooledSpikeCounts):
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        spikes = pooled_counts.spikes_into(inputs[0], counter.name)
        counter.ann_macs += _dense_macs(module, output, counter.name)
        counter.accumulates = counter.accumulates + _fan_out_accumulates(module, spikes, counter.name)

    return hook


def _readout_hook(counter: _LayerCounter, pooled_counts: _PooledSpikeCounts):
    def hook(module: SpikeReadout, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        spikes = pooled_counts.spikes_into(inputs[0], counter.name)
        classifier = module.classifier
        # Pooling then a linear layer: each spike adds its weight (divided by the pooled
        # area, which can be folded into the weights) to every output class.
        counter.ann_macs += spikes.shape[0] * spikes.shape[1] * classifier.in_features * classifier.out_features
        counter.accumulates = counter.accumulates + spikes.sum(dtype=torch.float64) * classifier.out_features

    return hook


def _dense_macs(module: nn.Module, output: torch.Tensor, name: str) -> float:
    """Return the MACs of ``module`` on a whole batch as a dense (ANN) layer, counted like FlopCounterMode."""
    if isinstance(module, nn.Conv2d):
        kernel_height, kernel_width = module.kernel_size
        return float(output.numel() * (module.in_channels // module.groups) * kernel_height * kernel_width)
    if isinstance(module, nn.Linear):
        return float(output.numel() * module.in_features)
    raise ValueError(f"cannot count the MACs of {name} ({type(module).__name__}): only Conv2d and Linear are counted")


def _fan_out_accumulates(module: nn.Module, spikes: torch.Tensor, name: str) -> torch.Tensor:
    """Return the number of synapses reached by the spikes ``spikes`` (one accumulate each), on the batch."""
    if isinstance(module, nn.Linear):
        return spikes.sum(dtype=torch.float64) * module.out_features
    if module.padding_mode != "zeros":
        raise ValueError(f"cannot count the accumulates of {name}: padding_mode={module.padding_mode!r} is not 'zeros'")
    # A convolution with all-one weights counts the spikes in each output position's
    # receptive field. Summed over positions, that is the number of synapses the spikes
    # reach in one output channel of each group.
    ones_shape = (module.groups, module.in_channels // module.groups, *module.kernel_size)
    ones = torch.ones(ones_shape, dtype=spikes.dtype, device=spikes.device)
    occupancy = F.conv2d(spikes, ones, None, module.stride, module.padding, module.dilation, module.groups)
    return occupancy.sum(dtype=torch.float64) * (module.out_channels // module.groups)


def _check_binary(spikes: torch.Tensor, name: str) -> None:
    if ((spikes != 0) & (spikes != 1)).any():
        raise ValueError(
            f"the input of {name} is not binary spikes, so its operations are not accumulates. "
            "Only pooling, dropout and reshaping may come between a neuron and a synaptic layer"
        )
