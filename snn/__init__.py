"""Spiking networks for IIR-SNN: the neuron, ANN-to-SNN conversion of VGG, the network wrapper, spike statistics.

Typical use::

    snn_net = convert_vgg_to_snn(trained_vgg, calibration_images, timesteps=5)
    logits = snn_net(images)                      # [N, num_classes]; state is reset inside
    snn_net.set_timesteps(4)                      # the next IIR-SNN stage
    stats = measure_spike_statistics(snn_net, test_loader, max_batches=10)
    print(stats.format_report())
"""

from snn.convert import convert_vgg_to_snn, fold_batchnorm
from snn.network import SpikeReadout, SpikingNetwork
from snn.neuron import (
    IIRLIFNode,
    TriangleSurrogate,
    clamp_leaks_,
    register_leak_clamp,
    spiking_neurons,
)
from snn.stats import (
    ENERGY_PER_ACCUMULATE_PJ,
    ENERGY_PER_MAC_PJ,
    NeuronLayerStatistics,
    SpikeStatistics,
    SynapticLayerCost,
    measure_spike_statistics,
)

__all__ = [
    "ENERGY_PER_ACCUMULATE_PJ",
    "ENERGY_PER_MAC_PJ",
    "IIRLIFNode",
    "NeuronLayerStatistics",
    "SpikeReadout",
    "SpikeStatistics",
    "SpikingNetwork",
    "SynapticLayerCost",
    "TriangleSurrogate",
    "clamp_leaks_",
    "convert_vgg_to_snn",
    "fold_batchnorm",
    "measure_spike_statistics",
    "register_leak_clamp",
    "spiking_neurons",
]
