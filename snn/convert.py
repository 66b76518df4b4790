"""ANN-to-SNN conversion of the shared CIFAR VGG (``vgg11_bn``, ``vgg16_bn``).

Supported: :class:`models.vgg.CifarVGG` and any model of the same layout, a
``features`` ``nn.Sequential`` of ``Conv2d`` [``BatchNorm2d``] ``ReLU`` groups,
``MaxPool2d``, ``AvgPool2d`` and ``Dropout`` layers, then ``pool`` (global average
pooling) and one ``classifier`` ``nn.Linear``. Each ReLU becomes an
:class:`snn.neuron.IIRLIFNode`.

Not supported: the CIFAR ResNets (``resnet20`` ... ``resnet110``). Their blocks add
the shortcut to the second convolution's output before the ReLU, which this chain of
spiking layers cannot express. They also call ``F.relu`` inside ``forward``, so no
module marks where a neuron belongs. :func:`convert_vgg_to_snn` raises a ``ValueError``
that names the first residual block.

Conversion, with the weights of the trained ANN:

1. Fold each BatchNorm into the preceding convolution (running statistics, so the
   ANN's eval-mode function is kept).
2. Run the folded ANN on a calibration batch and take, for each layer l, the
   ``percentile``-th percentile ``lambda_l`` of its positive pre-activations.
3. Set the threshold of layer l to ``lambda_l`` and multiply the weights of the next
   synaptic layer by ``lambda_l``. A spike then represents an activation of
   ``lambda_l``, so each layer's mean input current approximates the ANN's
   pre-activation, and activations above ``lambda_l`` are clipped. The leaks start
   at 1 (integrate-and-fire).

With ``threshold_source="spiking"`` the thresholds come from the spiking network
instead, as in IIR-SNN's own code (``find_threshold`` in ``snncifar_bnfused.py``). The
weights keep the ANN's scale, and the layers are calibrated one after another. Each
layer runs the spiking network, with the thresholds already set, on the calibration
images for ``calibration_timesteps``. Its threshold is the ``percentile``-th percentile
of all its input currents, negative ones included, at each timestep, and the maximum of
that over the timesteps. IIR-SNN's code calibrates at 500 timesteps. The multi-step
network here keeps every timestep in memory at once, so the default is the network's T.

NOTE: with ``"spiking"`` a layer's input is roughly the ANN's activation divided by the
earlier thresholds, while each folded bias keeps the ANN's scale, so the biases weigh
more than in the ANN. In a one-thread check outside the tests, the digits VGG of
``tests/test_snn.py`` converted to chance (18 % at T=32, against 96 % with ``"ann"``).
Dividing each bias by the product of the earlier thresholds raised it to 65 %, so the
biases explain most, not all, of the loss. IIR-SNN's code keeps the biases as they are, and so does this one.

Each ``MaxPool2d`` becomes a :class:`snn.network.RateGatedMaxPool2d`, which passes
the spikes of the window's most active input. Plain max-pooling of spikes fires when
any input fires. With the digits VGG of ``tests/test_snn.py`` (one CPU thread), it made
the converted network less accurate at T=64 than at T=8: 93% and 96%, against 99% for
the ANN. With the gated pooling, T=64 reaches 99%.

Each ``AvgPool2d`` stays an average pooling, applied at every timestep, as in IIR-SNN's
code. Its output is a fraction of spikes, which the next synaptic layer receives as
input current. Each ``Dropout`` becomes SpikingJelly's ``layer.Dropout``, which draws
one mask per forward pass and applies it at every timestep, as IIR-SNN does. A mask
drawn anew at each timestep would average out over T.
"""

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from spikingjelly.activation_based import layer
from torch.nn.utils.fusion import fuse_conv_bn_eval

from models.cifar_resnet import BasicBlock
from snn.network import RateGatedMaxPool2d, SpikeReadout, SpikingNetwork
from snn.neuron import IIRLIFNode, spiking_neurons

DEFAULT_PERCENTILE = 99.7

# Sources of the thresholds: the ANN's positive pre-activations, or the spiking
# network's input currents (IIR-SNN's code).
THRESHOLD_SOURCES = ("ann", "spiking")

# Layers that may follow a convolution's ReLU. nn.Dropout2d and nn.AlphaDropout are not
# nn.Dropout subclasses, so they get the error that names the supported layers.
_LAYERS_AFTER_RELU = (nn.MaxPool2d, nn.AvgPool2d, nn.Dropout)


@dataclass
class _ConvStage:
    """One convolution with BatchNorm folded in, its ReLU, and the pooling and dropout layers after it."""

    name: str
    conv: nn.Conv2d
    after: list[nn.Module] = field(default_factory=list)


def fold_batchnorm(conv: nn.Conv2d, batchnorm: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a new convolution, with a bias, that computes ``batchnorm(conv(x))`` with the running statistics.

    Neither argument is changed, whatever its training mode.
    """
    return fuse_conv_bn_eval(copy.deepcopy(conv).eval(), copy.deepcopy(batchnorm).eval())


def convert_vgg_to_snn(
    model: nn.Module,
    calibration_images: torch.Tensor,
    timesteps: int = 5,
    percentile: float = DEFAULT_PERCENTILE,
    output_reduction: str = "mean",
    threshold_source: str = "ann",
    calibration_timesteps: int | None = None,
) -> SpikingNetwork:
    """Convert a trained VGG with BatchNorm into a :class:`SpikingNetwork` with IIR-SNN neurons.

    Args:
        model: a :class:`models.vgg.CifarVGG`, or a model of the same layout. It is not changed.
        calibration_images: a batch ``[N, C, H, W]``, prepared as for the ANN, whose
            activations set the thresholds. IIR-SNN's code calibrates on 512 training images.
        timesteps: T of the returned network (``set_timesteps`` changes it later).
        percentile: percentile in (0, 100] that becomes each layer's threshold: of its
            positive pre-activations in the ANN (``threshold_source="ann"``), or of all its
            input currents in the spiking network (``"spiking"``). 100 takes the maximum.
        output_reduction: ``"mean"`` or ``"sum"`` of the readout over timesteps.
        threshold_source: ``"ann"`` or ``"spiking"`` (see the module docstring).
        calibration_timesteps: T of the calibration runs with ``threshold_source="spiking"``.
            None uses ``timesteps``.

    Returns the network on the model's device, in eval mode.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if calibration_images.dim() != 4 or calibration_images.shape[0] == 0:
        raise ValueError(
            f"calibration_images must be a non-empty batch [N, C, H, W], got shape {tuple(calibration_images.shape)}"
        )
    if threshold_source not in THRESHOLD_SOURCES:
        raise ValueError(f"threshold_source must be one of {', '.join(THRESHOLD_SOURCES)}, got {threshold_source!r}")

    stages, classifier = _parse_vgg(model)
    device = classifier.weight.device
    if threshold_source == "spiking":
        # Thresholds of 1 are placeholders, set layer by layer below. Each spike then
        # carries the weight of an ANN activation of 1.
        network = _build_network(stages, classifier, [1.0] * len(stages), False, timesteps, output_reduction)
        network.to(device)
        if calibration_timesteps is None:
            calibration_timesteps = timesteps
        _calibrate_spiking_thresholds(network, calibration_images.to(device), percentile, calibration_timesteps)
        return network.eval()

    thresholds = _calibrate_thresholds(stages, calibration_images.to(device), percentile)
    network = _build_network(stages, classifier, thresholds, True, timesteps, output_reduction)
    return network.to(device).eval()


def _build_network(
    stages: list[_ConvStage],
    classifier: nn.Linear,
    thresholds: list[float],
    scale_weights: bool,
    timesteps: int,
    output_reduction: str,
) -> SpikingNetwork:
    """Assemble the spiking network from the ANN's stages.

    With ``scale_weights`` each synaptic layer's weights are multiplied by the threshold of
    the neuron layer before it, so that a spike stands for an ANN activation of that size.
    """
    layers: list[nn.Module] = []
    encoder: nn.Module | None = None
    input_scale = 1.0  # The image is analog, so the first layer's weights keep their scale.
    for index, (stage, threshold) in enumerate(zip(stages, thresholds, strict=True)):
        conv = stage.conv
        with torch.no_grad():
            conv.weight.mul_(input_scale)
        if index == 0:
            encoder = conv
        else:
            layers.append(layer.SeqToANNContainer(conv))
        layers.append(IIRLIFNode(threshold=threshold, leak=1.0))
        layers.extend(_spiking_layer(module) for module in stage.after)
        input_scale = threshold if scale_weights else 1.0

    readout_classifier = copy.deepcopy(classifier)
    with torch.no_grad():
        readout_classifier.weight.mul_(input_scale)

    return SpikingNetwork(
        encoder=encoder,
        features=nn.Sequential(*layers),
        readout=SpikeReadout(readout_classifier),
        timesteps=timesteps,
        output_reduction=output_reduction,
    )


class _CalibrationDone(Exception):
    """Raised by a calibration hook once it has the currents, so the rest of the network does not run."""


@torch.no_grad()
def _calibrate_spiking_thresholds(
    network: SpikingNetwork, images: torch.Tensor, percentile: float, calibration_timesteps: int
) -> None:
    """Set each neuron layer's threshold from its input currents, one layer after another."""
    timesteps = network.timesteps
    network.eval()
    network.set_timesteps(calibration_timesteps)
    try:
        for name, node in spiking_neurons(network):
            currents: list[torch.Tensor] = []

            def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], store=currents) -> None:
                store.append(inputs[0])
                raise _CalibrationDone

            handle = node.register_forward_pre_hook(record)
            try:
                network(images)
            except _CalibrationDone:
                pass
            finally:
                handle.remove()

            threshold = max(_percentile(current, percentile) for current in currents[0])
            if threshold <= 0:
                raise ValueError(
                    f"{name}: the {percentile}th percentile of its input currents on the {len(images)} calibration "
                    f"images is {threshold:.4g}, not positive, so it cannot be a threshold. Raise "
                    "module.conversion.percentile, or check that the ANN is trained"
                )
            node.threshold.fill_(threshold)
    finally:
        network.set_timesteps(timesteps)


def _spiking_layer(module: nn.Module) -> nn.Module:
    """Return the multi-step spiking counterpart of a pooling or dropout layer that follows a ReLU."""
    if isinstance(module, nn.MaxPool2d):
        if module.dilation not in (1, (1, 1)) or module.return_indices:
            raise ValueError(
                f"cannot convert {module!r}, because only max-pooling without dilation or indices is supported"
            )
        return RateGatedMaxPool2d(module.kernel_size, module.stride, module.padding, ceil_mode=module.ceil_mode)
    if isinstance(module, nn.AvgPool2d):
        return layer.SeqToANNContainer(copy.deepcopy(module))
    return layer.Dropout(module.p, step_mode="m")


def _parse_vgg(model: nn.Module) -> tuple[list[_ConvStage], nn.Linear]:
    """Split a VGG into convolution stages (BatchNorm folded, modules copied) and its classifier."""
    _reject_residual_networks(model)
    model_name = type(model).__name__
    features = getattr(model, "features", None)
    pool = getattr(model, "pool", None)
    classifier = getattr(model, "classifier", None)
    if not isinstance(features, nn.Sequential) or not isinstance(classifier, nn.Linear):
        raise ValueError(
            f"cannot convert {model_name}, because ANN-to-SNN conversion needs the CifarVGG layout: a 'features' "
            "nn.Sequential, a global average 'pool' and a 'classifier' nn.Linear (models vgg_bn, vgg11_bn, vgg16_bn)"
        )
    if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (1, (1, 1)):
        raise ValueError(f"cannot convert {model_name}.pool ({pool!r}), because it is not nn.AdaptiveAvgPool2d(1)")

    stages: list[_ConvStage] = []
    modules = list(features.named_children())
    index = 0
    while index < len(modules):
        name, module = modules[index]
        if isinstance(module, nn.Conv2d):
            stage, index = _parse_conv_group(modules, index)
            stages.append(stage)
        elif isinstance(module, _LAYERS_AFTER_RELU) and stages:
            stages[-1].after.append(copy.deepcopy(module).eval())
            index += 1
        elif isinstance(module, _LAYERS_AFTER_RELU):
            raise ValueError(
                f"cannot convert features.{name} ({type(module).__name__}), because features must start with a Conv2d"
            )
        else:
            raise ValueError(
                f"cannot convert features.{name} ({type(module).__name__}), because VGG features may contain "
                "only Conv2d, BatchNorm2d, ReLU, MaxPool2d, AvgPool2d and Dropout"
            )
    if not stages:
        raise ValueError(f"cannot convert {model_name}, because its features contain no Conv2d")
    return stages, classifier


def _parse_conv_group(modules: list[tuple[str, nn.Module]], index: int) -> tuple[_ConvStage, int]:
    """Read ``Conv2d [BatchNorm2d] ReLU`` from ``modules[index]`` and return the stage and the index after the ReLU."""
    conv_name, conv = modules[index]
    index += 1
    if index < len(modules) and isinstance(modules[index][1], nn.BatchNorm2d):
        folded = fold_batchnorm(conv, modules[index][1])
        index += 1
    else:
        folded = copy.deepcopy(conv).eval()
    if index >= len(modules) or not isinstance(modules[index][1], nn.ReLU):
        found = type(modules[index][1]).__name__ if index < len(modules) else "the end of features"
        raise ValueError(
            f"cannot convert features.{conv_name}, because a convolution must be followed by [BatchNorm2d and] "
            f"ReLU, which becomes the spiking neuron, but found {found}"
        )
    return _ConvStage(name=f"features.{conv_name}", conv=folded), index + 1


def _reject_residual_networks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        # CifarResNet's blocks are BasicBlocks. A "shortcut" attribute marks other residual blocks.
        if isinstance(module, BasicBlock) or hasattr(module, "shortcut"):
            model_name = type(model).__name__
            raise ValueError(
                f"cannot convert {model_name}, because residual block {name!r} ({type(module).__name__}) adds its "
                "shortcut before the ReLU, which the chain of spiking layers cannot express. ANN-to-SNN conversion "
                "supports the VGG models (vgg_bn, vgg11_bn, vgg16_bn) only"
            )


@torch.no_grad()
def _calibrate_thresholds(stages: list[_ConvStage], images: torch.Tensor, percentile: float) -> list[float]:
    """Return each stage's threshold: the percentile of its positive pre-activations on ``images``."""
    thresholds = []
    activations = images
    for stage in stages:
        pre_activation = stage.conv(activations)
        positive = pre_activation[pre_activation > 0]
        if positive.numel() == 0:
            raise ValueError(
                f"{stage.name} has no positive pre-activation on the {len(images)} calibration images, so "
                "its threshold cannot be set. Calibrate with more images, or check that the ANN is trained"
            )
        thresholds.append(_percentile(positive, percentile))
        activations = torch.relu(pre_activation)
        for module in stage.after:
            # The copies are in eval mode, so dropout passes the activations unchanged.
            activations = module(activations)
    return thresholds


def _percentile(values: torch.Tensor, percentile: float) -> float:
    # Nearest rank. torch.quantile rejects inputs of more than 2**24 elements, which the first
    # VGG layer's 64 x 32 x 32 pre-activations per image reach on 512 CIFAR images.
    rank = max(1, math.ceil(percentile / 100 * values.numel()))
    return values.flatten().kthvalue(rank).values.item()
