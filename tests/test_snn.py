"""Spiking networks: the IIR-SNN neuron, VGG conversion, the network wrapper and spike statistics."""

import copy
import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from spikingjelly.activation_based import layer
from spikingjelly.activation_based.op_counter import DispatchCounterMode, SynOpCounter

from lightning_modules.callbacks.energy import estimate_inference_energy, operation_counts_of
from lightning_modules.callbacks.flops import count_forward_cost
from lightning_modules.spiking_classifier import SpikingClassifierModule
from models import create_model
from models.vgg import CifarVGG
from snn import (
    IIRLIFNode,
    SpikeReadout,
    SpikingNetwork,
    TriangleSurrogate,
    convert_vgg_to_snn,
    fold_batchnorm,
    measure_spike_statistics,
    register_leak_clamp,
    spiking_neurons,
)
from snn.network import RateGatedMaxPool2d

# A VGG with the shared model's layout, small enough to train on 8x8 digits in seconds.
DIGITS_LAYOUT: list[int | str] = [16, "M", 32, "M", 64]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return train images, train labels, test images and test labels of scikit-learn's digits, scaled to [0, 1]."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    return images[:1400], labels[:1400], images[1400:], labels[1400:]


def _train_on_digits(model: CifarVGG, digits) -> CifarVGG:
    """Train ``model`` for six epochs on the digits (about 2 s on one CPU thread) and return it in eval mode."""
    train_images, train_labels, _, _ = digits
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(6):
        for start in range(0, len(train_images), 64):
            loss = F.cross_entropy(model(train_images[start : start + 64]), train_labels[start : start + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained_vgg(digits) -> CifarVGG:
    """Return a small CifarVGG trained on the digits."""
    torch.manual_seed(0)
    return _train_on_digits(CifarVGG(DIGITS_LAYOUT, in_channels=1, num_classes=10), digits)


@pytest.fixture(scope="module")
def trained_average_pooling_vgg(digits) -> CifarVGG:
    """Return a digits CifarVGG with IIR-SNN's average pooling and dropout 0.2, trained on the digits."""
    torch.manual_seed(0)
    model = CifarVGG([16, "M", 32, 32, "M", 64], in_channels=1, num_classes=10, pooling="avg", dropout=0.2)
    return _train_on_digits(model, digits)


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(images).argmax(dim=1) == labels).float().mean().item()


def _two_layer_network() -> SpikingNetwork:
    """Return a network whose spikes on ``torch.ones(N, 1, 1, 3)`` at T=4 are worked out by hand.

    The encoder (1x1 convolution) gives a current of 2.0 to channel 0 and 0.75 to channel 1.
    With threshold 1, channel 0 fires at every timestep and channel 1 at timesteps 1 and 2
    (membrane potential 0.75, 1.5, 1.25, 1.0; a spike needs u / threshold - 1 > 0).
    The 3x3 convolution passes channel 0's spike at the same pixel, a current of 1.0; with
    threshold 1.5 the second neuron layer fires at timesteps 1 and 3 (u = 1, 2, 1.5, 2.5).
    """
    encoder = nn.Conv2d(1, 2, kernel_size=1, bias=False)
    hidden = nn.Conv2d(2, 1, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        encoder.weight.copy_(torch.tensor([2.0, 0.75]).view(2, 1, 1, 1))
        hidden.weight.zero_()
        hidden.weight[0, 0, 1, 1] = 1.0
    features = nn.Sequential(IIRLIFNode(threshold=1.0), layer.SeqToANNContainer(hidden), IIRLIFNode(threshold=1.5))
    return SpikingNetwork(encoder, features, SpikeReadout(nn.Linear(1, 3)), timesteps=4)


def test_neuron_soft_reset_spike_train() -> None:
    node = IIRLIFNode(threshold=1.0)
    spikes = node(torch.full((4, 1), 0.75))
    assert spikes.flatten().tolist() == [0.0, 1.0, 1.0, 0.0]
    # 0.75 + 0.75 - 1 + 0.75 - 1 + 0.75: the threshold is subtracted, not reset to zero.
    assert node.v.item() == pytest.approx(1.0)


def test_neuron_leak_scales_membrane_potential() -> None:
    node = IIRLIFNode(threshold=10.0, leak=0.5)
    node(torch.ones(3, 1))
    # u = 1, then 0.5 * 1 + 1, then 0.5 * 1.5 + 1.
    assert node.v.item() == pytest.approx(1.75)


def test_neuron_rejects_invalid_parameters() -> None:
    with pytest.raises(ValueError, match="threshold must be finite and > 0"):
        IIRLIFNode(threshold=0.0)
    with pytest.raises(ValueError, match="leak must be in"):
        IIRLIFNode(leak=1.5)


def test_triangle_surrogate_gradient() -> None:
    x = torch.tensor([-1.5, -0.5, 0.0, 0.5, 1.0, 2.0], requires_grad=True)
    spikes = TriangleSurrogate()(x)
    spikes.sum().backward()
    assert spikes.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert x.grad.tolist() == pytest.approx([0.0, 0.15, 0.3, 0.15, 0.0, 0.0])


def test_triangle_primitive_derivative_is_surrogate() -> None:
    x = torch.linspace(-1.5, 1.5, 31, dtype=torch.float64, requires_grad=True)
    TriangleSurrogate(spiking=False)(x).sum().backward()
    expected = 0.3 * torch.clamp(1 - x.detach().abs(), min=0)
    assert torch.allclose(x.grad, expected)


def test_neuron_multi_step_output_shape() -> None:
    node = IIRLIFNode()
    spikes = node(torch.randn(5, 2, 3, 4, 4))
    assert spikes.shape == (5, 2, 3, 4, 4)


def test_network_output_shapes() -> None:
    network = _two_layer_network()
    images = torch.ones(2, 1, 1, 3)
    assert network.forward_timesteps(images).shape == (4, 2, 3)
    assert network(images).shape == (2, 3)


def test_network_output_is_timestep_mean() -> None:
    network = _two_layer_network()
    images = torch.ones(2, 1, 1, 3)
    per_timestep = network.forward_timesteps(images)
    assert torch.allclose(network(images), per_timestep.mean(dim=0))
    network.output_reduction = "sum"
    assert torch.allclose(network(images), per_timestep.sum(dim=0))


def test_network_rejects_invalid_timesteps() -> None:
    network = _two_layer_network()
    with pytest.raises(ValueError, match="timesteps must be an integer >= 1"):
        network.set_timesteps(0)


def test_same_input_twice_gives_identical_logits(trained_vgg, digits) -> None:
    train_images, _, test_images, _ = digits
    network = convert_vgg_to_snn(trained_vgg, train_images[:128], timesteps=6)
    first = network(test_images[:16])
    second = network(test_images[:16])
    assert torch.equal(first, second)


def test_state_is_reset_after_forward(trained_vgg, digits) -> None:
    train_images, _, test_images, _ = digits
    network = convert_vgg_to_snn(trained_vgg, train_images[:128], timesteps=3)
    network(test_images[:4])
    for name, node in spiking_neurons(network):
        assert torch.as_tensor(node.v).eq(0).all(), f"membrane potential of {name} was not reset"


def test_fold_batchnorm_keeps_function() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    batchnorm = nn.BatchNorm2d(4)
    with torch.no_grad():
        batchnorm.running_mean.uniform_(-1, 1)
        batchnorm.running_var.uniform_(0.5, 2)
        batchnorm.weight.uniform_(0.5, 1.5)
        batchnorm.bias.uniform_(-1, 1)
    batchnorm.eval()
    images = torch.randn(2, 3, 8, 8)
    folded = fold_batchnorm(conv, batchnorm)
    assert torch.allclose(folded(images), batchnorm(conv(images)), atol=1e-5)


# The ANN with average pooling and dropout trains to a lower accuracy in the same six epochs.
# Its converted network also needs more timesteps. At T=64 it reached 95.2 % on one CPU
# thread and 96.2 % on two, because the summation order changes some spikes. At T=128 it
# reached 97.2 % and 97.7 %, against 98.0 % for the ANN.
@pytest.mark.parametrize(
    ("ann_fixture", "min_ann_accuracy", "timesteps"),
    [("trained_vgg", 0.95, 64), ("trained_average_pooling_vgg", 0.9, 128)],
)
def test_conversion_approaches_ann_accuracy(
    request, digits, ann_fixture: str, min_ann_accuracy: float, timesteps: int
) -> None:
    ann = request.getfixturevalue(ann_fixture)
    train_images, _, test_images, test_labels = digits
    ann_accuracy = _accuracy(ann, test_images, test_labels)
    network = convert_vgg_to_snn(ann, train_images[:256], timesteps=timesteps)
    snn_accuracy = _accuracy(network, test_images, test_labels)
    assert ann_accuracy > min_ann_accuracy, "the ANN did not train; the conversion check needs a trained ANN"
    assert snn_accuracy >= ann_accuracy - 0.02


def test_average_pooling_conversion_layers(trained_average_pooling_vgg, digits) -> None:
    network = convert_vgg_to_snn(trained_average_pooling_vgg, digits[0][:64], timesteps=2)
    assert sum(isinstance(module, layer.Dropout) for module in network.modules()) == 2
    assert not any(isinstance(module, RateGatedMaxPool2d) for module in network.modules())


def test_dropout_mask_is_shared_by_timesteps(trained_average_pooling_vgg, digits) -> None:
    network = convert_vgg_to_snn(trained_average_pooling_vgg, digits[0][:128], timesteps=4).train()
    records: list[tuple[torch.Tensor, torch.Tensor]] = []
    dropout = next(module for module in network.modules() if isinstance(module, layer.Dropout))
    dropout.register_forward_hook(lambda module, inputs, output: records.append((inputs[0], output)))

    torch.manual_seed(0)
    network(digits[0][:32])

    spikes, passed = records[0]
    assert spikes.shape[0] == 4
    # Where a neuron fired at some timestep, the mask either kept it at every timestep or at none.
    kept = passed != 0
    fired = spikes != 0
    kept_when_fired = (kept | ~fired).all(dim=0) & fired.any(dim=0)
    dropped_when_fired = (~kept | ~fired).all(dim=0) & fired.any(dim=0)
    assert torch.equal(kept_when_fired | dropped_when_fired, fired.any(dim=0))
    assert dropped_when_fired.any(), "no fired neuron was dropped, so the check saw no mask"
    assert torch.allclose(passed[kept], spikes[kept] / 0.8)


def test_dropout_network_eval_is_deterministic(trained_average_pooling_vgg, digits) -> None:
    network = convert_vgg_to_snn(trained_average_pooling_vgg, digits[0][:128], timesteps=3)
    first = network(digits[2][:16])
    second = network(digits[2][:16])
    assert torch.equal(first, second)


def test_conversion_thresholds_are_percentiles(trained_vgg, digits) -> None:
    train_images = digits[0][:256]
    network = convert_vgg_to_snn(trained_vgg, train_images, timesteps=4, percentile=99.7)
    first_conv = fold_batchnorm(trained_vgg.features[0], trained_vgg.features[1])
    with torch.no_grad():
        pre_activation = first_conv(train_images)
    positive = pre_activation[pre_activation > 0]
    threshold = spiking_neurons(network)[0][1].threshold.item()
    # The 99.7th percentile by nearest rank: less than 99.7% of the values lie below it,
    # and at least 99.7% lie at or below it (up to rounding of 0.997 * count).
    assert (positive < threshold).float().mean().item() < 0.997 + 1e-6
    assert (positive <= threshold).float().mean().item() >= 0.997 - 1e-6
    for name, node in spiking_neurons(network):
        assert node.leak.item() == 1.0, f"leak of {name} does not start at 1"


def _nearest_rank_percentile(values: torch.Tensor, percentile: float) -> float:
    rank = max(1, math.ceil(percentile / 100 * values.numel()))
    return values.flatten().sort().values[rank - 1].item()


def test_spiking_thresholds_follow_input_currents(trained_vgg, digits) -> None:
    images = digits[0][:128]
    network = convert_vgg_to_snn(trained_vgg, images, timesteps=4, percentile=90, threshold_source="spiking")
    neurons = spiking_neurons(network)

    # The first layer's current is the folded convolution of the image, the same at every timestep.
    first_conv = fold_batchnorm(trained_vgg.features[0], trained_vgg.features[1])
    with torch.no_grad():
        first_current = first_conv(images)
    assert neurons[0][1].threshold.item() == pytest.approx(_nearest_rank_percentile(first_current, 90))
    # The weights keep the ANN's scale, because no threshold is folded into them.
    second_conv = network.features[2][0]
    expected = fold_batchnorm(trained_vgg.features[4], trained_vgg.features[5])
    assert torch.allclose(second_conv.weight, expected.weight)

    # Each later threshold is the largest per-timestep percentile of its input current, with
    # the thresholds before it already set.
    currents: list[torch.Tensor] = []
    neurons[1][1].register_forward_pre_hook(lambda module, inputs: currents.append(inputs[0]))
    with torch.no_grad():
        network(images)
    expected_threshold = max(_nearest_rank_percentile(current, 90) for current in currents[0])
    assert neurons[1][1].threshold.item() == pytest.approx(expected_threshold)
    assert network.timesteps == 4


def test_spiking_threshold_is_max_over_timesteps() -> None:
    # Two 1x1-acting convolutions (centre tap 1) and a constant image of 0.75. The first
    # threshold is 0.75, so the first layer fires from the second timestep on, and the second
    # layer's current is 0 at t=0 and 1 afterwards. Its threshold is the maximum, 1.
    model = CifarVGG([1, 1], in_channels=1, num_classes=2).eval()
    with torch.no_grad():
        for conv in (model.features[0], model.features[3]):
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0
    images = torch.full((2, 1, 4, 4), 0.75)

    network = convert_vgg_to_snn(model, images, timesteps=3, percentile=90, threshold_source="spiking")

    first, second = (node.threshold.item() for _, node in spiking_neurons(network))
    # Folding the BatchNorm divides by sqrt(1 + eps), eps = 1e-5.
    assert first == pytest.approx(0.75, rel=1e-4)
    assert second == pytest.approx(1.0, rel=1e-4)


def test_spiking_thresholds_reject_non_positive_percentile(trained_vgg, digits) -> None:
    with pytest.raises(ValueError, match="features.0: the 1.0th percentile of its input currents .* not positive"):
        convert_vgg_to_snn(trained_vgg, digits[0][:64], percentile=1.0, threshold_source="spiking")


def test_conversion_rejects_unknown_threshold_source(trained_vgg, digits) -> None:
    with pytest.raises(ValueError, match="threshold_source must be one of ann, spiking, got 'relu'"):
        convert_vgg_to_snn(trained_vgg, digits[0][:64], threshold_source="relu")


def test_converted_network_is_vgg_sized(trained_vgg, digits) -> None:
    network = convert_vgg_to_snn(trained_vgg, digits[0][:64], timesteps=2)
    # Three convolutions give three neuron layers and two max-pooling layers.
    assert len(spiking_neurons(network)) == 3
    assert sum(isinstance(module, RateGatedMaxPool2d) for module in network.modules()) == 2


def test_vgg16_converts() -> None:
    model = create_model("vgg16_bn", in_channels=3, num_classes=10).eval()
    network = convert_vgg_to_snn(model, torch.rand(4, 3, 32, 32), timesteps=1)
    assert len(spiking_neurons(network)) == 13
    assert network(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_conversion_names_residual_block() -> None:
    model = create_model("resnet20", in_channels=3, num_classes=10)
    with pytest.raises(ValueError, match="residual block 'layer1.0' \\(BasicBlock\\)"):
        convert_vgg_to_snn(model, torch.rand(2, 3, 32, 32))


def test_threshold_and_leak_receive_gradients(trained_vgg, digits) -> None:
    train_images, train_labels, _, _ = digits
    network = convert_vgg_to_snn(trained_vgg, train_images[:128], timesteps=5).train()
    loss = F.cross_entropy(network(train_images[:32]), train_labels[:32])
    loss.backward()
    for name, node in spiking_neurons(network):
        assert node.threshold.grad is not None, f"no threshold gradient in {name}"
        assert node.threshold.grad != 0, f"zero threshold gradient in {name}"
        assert node.leak.grad is not None, f"no leak gradient in {name}"
        assert node.leak.grad != 0, f"zero leak gradient in {name}"


def test_threshold_and_leak_gradients_by_hand() -> None:
    # Currents 1.2 then 0.5, threshold 1, leak 0.9, loss = number of spikes. Timestep 1:
    # u = 1.2 fires (x = u / threshold - 1 = 0.2, surrogate 0.3 * 0.8 = 0.24), and the reset
    # leaves 0.2, whose derivative by the threshold is -1. Timestep 2: u = 0.9 * 0.2 + 0.5 =
    # 0.68 does not fire (x = -0.32, surrogate 0.204).
    #   dL/dthreshold = 0.24 * (-1.2) + 0.204 * (0.9 * (-1) - 0.68) = -0.288 - 0.32232
    #   dL/dleak      = 0.204 * 0.2 (the potential the leak multiplies)
    node = IIRLIFNode(threshold=1.0, leak=0.9)
    spikes = node(torch.tensor([[1.2], [0.5]]))
    spikes.sum().backward()

    assert spikes.flatten().tolist() == [1.0, 0.0]
    assert node.threshold.grad.item() == pytest.approx(-0.288 - 0.32232)
    assert node.leak.grad.item() == pytest.approx(0.204 * 0.2)


def test_module_clamps_leak_after_step() -> None:
    network = _two_layer_network()
    module = SpikingClassifierModule(network, partial(torch.optim.SGD, lr=1.0), {"name": "none"}, num_classes=3)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10, num_training_batches=10, accumulate_grad_batches=1)
    optimizer = module.configure_optimizers()["optimizer"]
    for _, node in spiking_neurons(network):
        node.leak.grad = torch.tensor(-0.5)  # A step of +0.5 would take the leak to 1.5.

    optimizer.step()

    assert [node.leak.item() for _, node in spiking_neurons(network)] == [1.0, 1.0]


def test_leak_clamp_after_optimizer_step() -> None:
    network = _two_layer_network()
    unclamped = copy.deepcopy(network)
    optimizers = []
    for model in (network, unclamped):
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        for _, node in spiking_neurons(model):
            node.leak.grad = torch.tensor(-0.5)  # A step of +0.5 would take the leak to 1.5.
        optimizers.append(optimizer)
    register_leak_clamp(optimizers[0], network)
    for optimizer in optimizers:
        optimizer.step()
    assert [node.leak.item() for _, node in spiking_neurons(unclamped)] == [1.5, 1.5]
    assert [node.leak.item() for _, node in spiking_neurons(network)] == [1.0, 1.0]


def test_neuron_lr_scale_keeps_ratio_under_schedule() -> None:
    network = _two_layer_network()
    scheduler = {"name": "multistep", "milestone_fractions": [0.5], "gamma": 0.2}
    module = SpikingClassifierModule(
        network, partial(torch.optim.Adam, lr=1e-4), scheduler, num_classes=3, neuron_lr_scale=10.0
    )
    module.trainer = SimpleNamespace(estimated_stepping_batches=10, num_training_batches=10, accumulate_grad_batches=1)
    configured = module.configure_optimizers()
    optimizer, lr_scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]

    weight_group, neuron_group = optimizer.param_groups
    neuron_parameters = {id(p) for _, node in spiking_neurons(network) for p in (node.threshold, node.leak)}
    assert {id(p) for p in neuron_group["params"]} == neuron_parameters
    assert neuron_parameters.isdisjoint(id(p) for p in weight_group["params"])
    assert len(weight_group["params"]) + len(neuron_group["params"]) == len(list(network.parameters()))
    assert neuron_group["lr"] == pytest.approx(1e-3)

    for _ in range(5):
        optimizer.step()
        lr_scheduler.step()
    assert weight_group["lr"] == pytest.approx(2e-5)
    assert neuron_group["lr"] == pytest.approx(2e-4)


def test_neuron_lr_scale_one_keeps_single_group() -> None:
    """Scale 1 keeps the optimizer's one group, so that checkpoints from before the option resume."""
    network = _two_layer_network()
    module = SpikingClassifierModule(network, partial(torch.optim.Adam, lr=1e-4), {"name": "none"}, num_classes=3)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10, num_training_batches=10, accumulate_grad_batches=1)
    optimizer = module.configure_optimizers()["optimizer"]

    assert len(optimizer.param_groups) == 1
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in network.parameters()]


def test_neuron_lr_scale_rejects_zero() -> None:
    with pytest.raises(ValueError, match="neuron_lr_scale must be > 0"):
        SpikingClassifierModule(_two_layer_network(), partial(torch.optim.Adam), {"name": "none"}, 3, neuron_lr_scale=0)


def test_rate_gated_pool_passes_max_rate() -> None:
    # Two inputs in one window fire alternately. Plain max-pooling would fire at every timestep.
    spikes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]).view(4, 1, 1, 1, 2)
    pool = RateGatedMaxPool2d(kernel_size=(1, 2))
    assert pool(spikes).flatten().tolist() == [1.0, 0.0, 1.0, 0.0]


def test_energy_of_two_layer_example_by_hand() -> None:
    network = _two_layer_network()
    stats = measure_spike_statistics(network, [torch.ones(2, 1, 1, 3)])

    first, second = stats.neuron_layers
    assert first.neurons == 6
    assert first.spikes == 18.0
    assert first.spike_rate == 0.75
    assert second.neurons == 3
    assert second.spikes == 6.0
    assert second.spike_rate == 0.5

    encoder, hidden, readout = stats.synaptic_layers
    # Encoder: 2 output channels x 3 pixels x 1 input channel x 1x1 kernel, at each of 4 timesteps.
    assert encoder.ann_macs == 6.0
    assert encoder.macs == 24.0
    assert encoder.accumulates == 0.0
    # 3x3 convolution: 3 outputs x 2 input channels x 9 taps as an ANN. A spike at a border
    # pixel reaches 2 outputs and at the middle pixel 3, so 7 per channel and timestep.
    # Channel 0 fires 4 times and channel 1 twice, so (4 + 2) x 7 = 42.
    assert hidden.ann_macs == 54.0
    assert hidden.macs == 0.0
    assert hidden.accumulates == 42.0
    # Readout: 6 spikes, each added to 3 classes.
    assert readout.ann_macs == 3.0
    assert readout.macs == 0.0
    assert readout.accumulates == 18.0

    assert stats.snn_macs == 24.0
    assert stats.snn_accumulates == 60.0
    assert stats.ann_macs == 63.0
    assert stats.snn_energy_pj == pytest.approx(24 * 4.6 + 60 * 0.9)  # 164.4 pJ
    assert stats.ann_energy_pj == pytest.approx(63 * 4.6)  # 289.8 pJ
    assert stats.energy_ratio == pytest.approx(289.8 / 164.4)
    assert "4.6 pJ/MAC, 0.9 pJ/accumulate" in stats.format_report()


def test_energy_callback_reads_spike_statistics() -> None:
    stats = measure_spike_statistics(_two_layer_network(), [torch.ones(1, 1, 1, 3)])

    class SpikingModule:
        def operation_counts(self):
            return stats.operation_counts()

    counts = operation_counts_of(SpikingModule())
    joules = estimate_inference_energy(counts, energy_per_mac_pj=4.6, energy_per_accumulate_pj=0.9)
    assert joules == pytest.approx(164.4e-12)


def test_ann_macs_match_flop_counter(trained_vgg, digits) -> None:
    train_images, _, test_images, _ = digits
    network = convert_vgg_to_snn(trained_vgg, train_images[:64], timesteps=2)
    stats = measure_spike_statistics(network, [(test_images[:8], None)])
    assert stats.ann_macs == count_forward_cost(trained_vgg, test_images[:1]).macs


def test_accumulates_match_spikingjelly_synop_counter(trained_vgg, digits) -> None:
    train_images, _, test_images, _ = digits
    network = convert_vgg_to_snn(trained_vgg, train_images[:64], timesteps=3).eval()
    images = test_images[:16]
    stats = measure_spike_statistics(network, [images])
    counter = SynOpCounter()
    with torch.no_grad(), DispatchCounterMode([counter]):
        network(images)
    spikingjelly_counts = {
        scope.removeprefix("SpikingNetwork."): sum(counts.values()) / len(images)
        for scope, counts in counter.records.items()
    }

    hidden = [cost for cost in stats.synaptic_layers if cost.input_kind == "spikes" and cost.name != "readout"]
    assert len(hidden) >= 2
    for cost in hidden:
        assert cost.accumulates > 0
        assert cost.accumulates == spikingjelly_counts[cost.name], cost.name
    # SynOpCounter counts no operations where the input is not binary: the analog image into the
    # first layer, and the readout's linear layer, which receives pooled spikes. stats.py counts
    # the readout as num_classes accumulates per incoming spike.
    assert spikingjelly_counts["encoder"] == 0


def _fold_average_pooling(pool: nn.AvgPool2d, conv: nn.Conv2d) -> nn.Conv2d:
    """Return one convolution equal to ``conv(pool(x))`` for a 2x2 pooling and a 3x3 convolution with padding 1.

    Each kernel tap of ``conv`` covers a 2x2 input window, so the folded kernel is 6x6 with
    stride 2 and padding 2. It holds for inputs of even size, where no pooling window overhangs.
    """
    assert pool.kernel_size == 2
    assert pool.stride == 2
    assert conv.kernel_size == (3, 3)
    assert conv.padding == (1, 1)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=6, stride=2, padding=2)
    with torch.no_grad():
        folded.weight.copy_(conv.weight.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) / 4)
        folded.bias.copy_(conv.bias)
    return folded


def test_pooled_accumulates_match_folded_convolution(trained_average_pooling_vgg, digits) -> None:
    train_images, _, test_images, _ = digits
    network = convert_vgg_to_snn(trained_average_pooling_vgg, train_images[:64], timesteps=3).eval()
    images = test_images[:16]
    stats = measure_spike_statistics(network, [images])
    costs = {cost.name: cost.accumulates for cost in stats.synaptic_layers}

    # The same network with each average pooling folded into the convolution after it takes
    # binary spikes everywhere, so SpikingJelly's SynOpCounter counts all of its synapses.
    folded_network = copy.deepcopy(network)
    children = list(folded_network.features)
    folded_names = []
    for index, module in enumerate(children[:-1]):
        pool = module[0] if isinstance(module, layer.SeqToANNContainer) else None
        if isinstance(pool, nn.AvgPool2d):
            conv = children[index + 1][0]
            children[index] = layer.SeqToANNContainer(nn.Identity())
            children[index + 1] = layer.SeqToANNContainer(_fold_average_pooling(pool, conv))
            folded_names.append(f"features.{index + 1}.0")
    folded_network.features = nn.Sequential(*children)
    assert torch.allclose(folded_network(images), network(images), atol=1e-4)

    counter = SynOpCounter()
    with torch.no_grad(), DispatchCounterMode([counter]):
        folded_network(images)
    spikingjelly_counts = {
        scope.removeprefix("SpikingNetwork."): sum(counts.values()) / len(images)
        for scope, counts in counter.records.items()
    }
    assert len(folded_names) == 2
    for name in folded_names:
        assert costs[name] > 0
        assert costs[name] == spikingjelly_counts[name], name


def test_statistics_stop_after_max_batches() -> None:
    batches = [torch.ones(1, 1, 1, 3), torch.ones(2, 1, 1, 3)]
    stats = measure_spike_statistics(_two_layer_network(), batches, max_batches=1)
    assert stats.images == 1


def test_statistics_count_spikes_through_average_pooling() -> None:
    encoder = nn.Conv2d(1, 1, kernel_size=1)
    features = nn.Sequential(
        IIRLIFNode(), layer.SeqToANNContainer(nn.AvgPool2d(2), nn.Conv2d(1, 3, kernel_size=1)), IIRLIFNode()
    )
    network = SpikingNetwork(encoder, features, SpikeReadout(nn.Linear(3, 2)), timesteps=2)
    with torch.no_grad():
        encoder.weight.fill_(2.0)
        encoder.bias.zero_()
    # Only the top-left pixel fires, at both timesteps. Average pooling passes 0.25, but the
    # spike behind it reaches the 1x1 convolution's 3 output channels: 3 accumulates per timestep.
    images = torch.zeros(1, 1, 2, 2)
    images[0, 0, 0, 0] = 1.0
    statistics = measure_spike_statistics(network, [images])
    costs = {cost.name: cost for cost in statistics.synaptic_layers}
    assert costs["features.1.1"].accumulates == 6.0


# A 3x3 image that is 1 at its four corners.
CORNERS = torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 0, 1]]).view(1, 1, 3, 3)


def _layer_costs(network: SpikingNetwork, images: torch.Tensor) -> dict:
    return {cost.name: cost for cost in measure_spike_statistics(network, [images]).synaptic_layers}


def _pooling_network(*layers: nn.Module, readout_features: int) -> SpikingNetwork:
    """Return a network whose encoder makes the first neuron fire wherever the image is 1."""
    encoder = nn.Conv2d(1, 1, kernel_size=1)
    with torch.no_grad():
        encoder.weight.fill_(2.0)
        encoder.bias.zero_()
    return SpikingNetwork(
        encoder, nn.Sequential(IIRLIFNode(), *layers), SpikeReadout(nn.Linear(readout_features, 2)), timesteps=2
    )


def test_statistics_count_through_two_average_poolings() -> None:
    pooling = partial(nn.AvgPool2d, 2, 2, ceil_mode=True)
    network = _pooling_network(
        layer.SeqToANNContainer(pooling()),
        layer.SeqToANNContainer(pooling()),
        layer.SeqToANNContainer(nn.Conv2d(1, 2, 3, padding=1)),
        IIRLIFNode(),
        readout_features=2,
    )
    # The four corners of a 3x3 image fire at both timesteps. Both poolings bring them to the
    # single 1x1 position, which reaches the convolution's 2 output channels: 4 * 2 * 2.
    costs = _layer_costs(network, CORNERS)
    assert costs["features.3.0"].accumulates == 16.0


def test_statistics_count_neuron_after_average_pooling() -> None:
    second = IIRLIFNode(threshold=0.3)
    network = _pooling_network(
        layer.SeqToANNContainer(nn.AvgPool2d(2, 2, ceil_mode=True)),
        second,
        layer.SeqToANNContainer(nn.Conv2d(1, 2, 3, padding=1)),
        IIRLIFNode(),
        readout_features=2,
    )
    fired: list[float] = []
    second.register_forward_hook(lambda module, inputs, output: fired.append(output.sum().item()))
    costs = _layer_costs(network, CORNERS)
    # The convolution reads the second neuron's spikes, not the pooling's counts. On the
    # 2x2 map each spike reaches all 4 positions of 2 channels.
    assert fired[-1] > 0
    assert costs["features.3.0"].accumulates == fired[-1] * 8


def test_statistics_allow_average_pooling_of_currents() -> None:
    network = _pooling_network(
        layer.SeqToANNContainer(nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(2, 2, ceil_mode=True)),
        IIRLIFNode(),
        readout_features=2,
    )
    costs = _layer_costs(network, CORNERS)
    # 4 spikes per timestep, each reaching 4 of the 3x3 map's positions in 2 channels.
    assert costs["features.1.0"].accumulates == 64.0


def test_statistics_reject_non_binary_input() -> None:
    encoder = nn.Conv2d(1, 1, kernel_size=1)
    halving = nn.Conv2d(1, 1, kernel_size=1, bias=False)
    features = nn.Sequential(
        IIRLIFNode(), layer.SeqToANNContainer(halving, nn.Conv2d(1, 1, kernel_size=1)), IIRLIFNode()
    )
    network = SpikingNetwork(encoder, features, SpikeReadout(nn.Linear(1, 2)), timesteps=2)
    with torch.no_grad():
        encoder.weight.fill_(2.0)
        encoder.bias.zero_()
        halving.weight.fill_(0.5)
    # The second convolution receives half a spike, which no accumulate can add.
    images = torch.ones(1, 1, 2, 2)
    with pytest.raises(ValueError, match="features.1.1 is not binary spikes"):
        measure_spike_statistics(network, [images])


def test_statistics_restore_network_state() -> None:
    network = _two_layer_network().train()
    measure_spike_statistics(network, [torch.ones(1, 1, 1, 3)])
    assert network.training
    assert not any(node.record_spikes for _, node in spiking_neurons(network))
