"""Channel pruning without training: graph, gates, extraction, optimizer state, saving, errors."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lightning_modules.callbacks.flops import count_forward_cost
from lightning_modules.polarization import polarization_direction_warning
from models import create_model
from pruning import (
    ChannelGates,
    UnsupportedModelError,
    binary_gate,
    build_channel_graph,
    dense_macs,
    extract_subnetwork,
    fit_masks_to_budget,
    l1_norm_keep_masks,
    load_pruned,
    macs_from_counts,
    polarization_gradient_on_open,
    polarization_regularizer,
    remap_optimizer_state,
    round_kept_channels,
    save_pruned,
)

FAMILIES = [
    ("resnet20", {"shortcut": "A"}),
    ("resnet20", {"shortcut": "B"}),
    ("vgg11_bn", {}),
    ("resnet18", {}),
    ("mobilenetv2_050", {}),
]


def _randomised_model(name: str, kwargs: dict, seed: int = 0) -> nn.Module:
    """Create a model whose BatchNorm layers have non-trivial statistics and affine parameters."""
    torch.manual_seed(seed)
    net = create_model(name, in_channels=3, num_classes=10, **kwargs)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return net.eval()


def _gated(net: nn.Module, closed_fraction: float = 0.5, seed: int = 0):
    graph = build_channel_graph(net, torch.zeros(1, 3, 32, 32))
    gates = ChannelGates(graph)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for score in gates.scores.values():
            score.copy_((torch.rand(score.shape, generator=generator) > closed_fraction).float() * 0.8 + 0.1)
    gates.attach(net)
    return graph, gates


def _kept_counts(masks: dict[int, torch.Tensor]) -> dict[int, float]:
    return {index: float(mask.sum()) for index, mask in masks.items()}


@pytest.mark.parametrize(("name", "kwargs"), FAMILIES, ids=lambda value: str(value))
def test_extracted_output_matches_gated(name: str, kwargs: dict) -> None:
    net = _randomised_model(name, kwargs)
    graph, gates = _gated(net)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        gated_output = net(images)
    masks = gates.keep_masks()
    dense_parameters = sum(parameter.numel() for parameter in net.parameters())

    gates.detach_from(net)
    extract_subnetwork(net, graph, masks)
    with torch.no_grad():
        extracted_output = net(images)

    assert not any(module._forward_hooks or module._forward_pre_hooks for module in net.modules())
    assert torch.allclose(extracted_output, gated_output, atol=1e-5, rtol=0)
    assert sum(parameter.numel() for parameter in net.parameters()) < dense_parameters
    counted = count_forward_cost(net, images[:1]).macs
    assert counted == pytest.approx(float(macs_from_counts(graph, _kept_counts(masks))), abs=0.5)
    assert counted < dense_macs(graph)


@pytest.mark.parametrize(("name", "kwargs"), FAMILIES, ids=lambda value: str(value))
def test_fully_closed_group_stays_exact(name: str, kwargs: dict) -> None:
    net = _randomised_model(name, kwargs)
    graph, gates = _gated(net)
    first = str(graph.prunable_groups[0].index)
    with torch.no_grad():
        gates.scores[first].zero_()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        gated_output = net(images)
    masks = gates.keep_masks()
    gates.detach_from(net)
    extract_subnetwork(net, graph, masks)

    first_writer = (graph.prunable_groups[0].producers + graph.prunable_groups[0].depthwise)[0]
    assert net.get_submodule(first_writer).out_channels == 1
    with torch.no_grad():
        assert torch.allclose(net(images), gated_output, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "kwargs"), [FAMILIES[0], FAMILIES[4]], ids=["resnet20-A", "mobilenetv2_050"])
def test_closed_gates_get_task_gradient(name: str, kwargs: dict) -> None:
    # Without a task gradient a closed gate could only reopen through the regularizers.
    net = _randomised_model(name, kwargs).train()
    _, gates = _gated(net)
    labels = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
    nn.functional.cross_entropy(net(torch.randn(8, 3, 32, 32)), labels).backward()

    scores = gates.all_scores().detach()
    gradients = torch.cat([score.grad for score in gates.scores.values()])
    closed = scores <= 0.5
    assert closed.sum() > 10
    assert (gradients[closed] != 0).float().mean() > 0.9


def test_scores_concatenate_in_group_order() -> None:
    # ResNet-20's group indices run past 10, where sorting them as strings puts "11" before "2".
    graph = build_channel_graph(create_model("resnet20", 3, 10), torch.zeros(1, 3, 32, 32))
    indices = [str(group.index) for group in graph.prunable_groups]
    assert sorted(indices) != indices
    gates = ChannelGates(graph)
    with torch.no_grad():
        for group in graph.prunable_groups:
            gates.scores[str(group.index)].fill_(group.index / 100)

    expected = torch.cat([torch.full((group.channels,), group.index / 100) for group in graph.prunable_groups])
    assert torch.equal(gates.all_scores(), expected)


def test_option_a_prunes_only_inside_blocks() -> None:
    graph = build_channel_graph(create_model("resnet20", 3, 10, shortcut="A"), torch.zeros(1, 3, 32, 32))
    prunable = {group.producers[0] for group in graph.prunable_groups}
    assert prunable == {f"layer{stage}.{block}.conv1" for stage in (1, 2, 3) for block in range(3)}
    stream = next(group for group in graph.groups if "conv1" in group.producers)
    assert "padding" in stream.fixed_reason


def test_option_b_prunes_residual_stream() -> None:
    graph = build_channel_graph(create_model("resnet20", 3, 10, shortcut="B"), torch.zeros(1, 3, 32, 32))
    stream = next(group for group in graph.groups if "layer2.0.shortcut.0" in group.producers)
    assert stream.prunable
    assert set(stream.producers) == {"layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2"}
    assert "layer3.0.conv1" in stream.consumers
    assert "layer3.0.shortcut.0" in stream.consumers


def test_depthwise_convolution_is_coupled() -> None:
    graph = build_channel_graph(create_model("mobilenetv2_050", 3, 10), torch.zeros(1, 3, 32, 32))
    group = next(group for group in graph.groups if "blocks.1.0.conv_dw" in group.depthwise)
    assert group.producers == ["blocks.1.0.conv_pw"]
    assert group.consumers == ["blocks.1.0.conv_pwl"]
    assert set(group.norms) == {"blocks.1.0.bn1", "blocks.1.0.bn2"}


def test_polarization_regularizer_hand_computed() -> None:
    scores = torch.tensor([0.0, 0.25, 1.0, 0.75])
    # mean 0.5; t * sum|s| = 1.2 * 2.0 = 2.4; sum|s - mean| = 0.5 + 0.25 + 0.5 + 0.25 = 1.5.
    assert polarization_regularizer(scores, t=1.2).item() == pytest.approx(0.9)
    assert polarization_regularizer(torch.tensor([1.0, 0.0]), t=1.0).item() == pytest.approx(0.0)


@pytest.mark.parametrize(("t", "pulls_down"), [(1.2, True), (0.9, False), (0.5, False)])
def test_polarization_gradient_on_open_gates(t: float, pulls_down: bool) -> None:
    # 45 of 100 gates open, all above the mean: R pushes them up only for t < 2 * (1 - 0.45) = 1.1.
    scores = torch.cat([torch.full((45,), 0.8), torch.zeros(55)])
    gradient = polarization_gradient_on_open(scores, t)
    assert gradient == pytest.approx(t - 1.1)
    assert (gradient > 0) == pulls_down


def test_polarization_gradient_ignores_open_gates_below_mean() -> None:
    # 80 gates at 1, 10 open at 0.6 (below the mean of 0.86), 10 closed: f = 0.8, so the
    # gates above the mean get t - 0.4, and t = 0.3 separates them.
    scores = torch.cat([torch.ones(80), torch.full((10,), 0.6), torch.zeros(10)])
    assert polarization_gradient_on_open(scores, 0.3) == pytest.approx(0.3 - 0.4)


def test_polarization_warning_advises_a_lower_t() -> None:
    # Nearly every gate open at t = 0.5: R separates them only for t < 2 * (1 - 0.99) = 0.02,
    # so the warning must not offer the 0.5 in use as the fix.
    message = polarization_direction_warning(0.5, 0.48, 0.99)
    assert "with 99.0% of the scores above their mean it does only for t < 0.02" in message
    assert "Lower module.polarization_t below 0.02." in message
    assert "for example to 0.5" not in message

    message = polarization_direction_warning(1.2, 0.1, 0.45)
    assert "Lower module.polarization_t below 1.1, for example to 0.5" in message


def test_polarization_gradient_needs_both_states() -> None:
    assert polarization_gradient_on_open(torch.ones(10), 1.2) is None
    assert polarization_gradient_on_open(torch.zeros(10), 1.2) is None


def test_binary_gate_passes_gradient_straight_through() -> None:
    scores = torch.tensor([0.2, 0.5, 0.51, 0.9], requires_grad=True)
    gate = binary_gate(scores)
    (gate * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert gate.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert scores.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_flops_estimate_weights_resolution() -> None:
    graph = build_channel_graph(create_model("resnet20", 3, 10), torch.zeros(1, 3, 32, 32))
    gates = ChannelGates(graph)
    dense = dense_macs(graph)
    kept = macs_from_counts(graph, gates.kept_counts(straight_through=True))
    kept.backward()
    first_stage = gates.scores[str(graph.prunable_groups[0].index)].grad
    last_stage = gates.scores[str(graph.prunable_groups[-1].index)].grad
    assert kept.item() == pytest.approx(dense)
    # An inner channel of a block costs 2 * 9 * (channels around it) * (output positions):
    # 16 channels at 32x32 in the first stage, 64 channels at 8x8 in the last.
    assert first_stage[0].item() == pytest.approx(2 * 9 * 16 * 32 * 32)
    assert last_stage[0].item() == pytest.approx(2 * 9 * 64 * 8 * 8)


def test_optimizer_state_valid_after_extraction() -> None:
    net = _randomised_model("resnet20", {"shortcut": "B"}).train()
    graph, gates = _gated(net)
    optimizers = [
        torch.optim.SGD(
            [{"params": net.parameters()}, {"params": gates.parameters(), "lr": 0.5}], lr=0.1, momentum=0.9
        ),
        torch.optim.AdamW([{"params": net.parameters()}, {"params": gates.parameters()}], lr=1e-3),
    ]
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for optimizer in optimizers:
        nn.functional.cross_entropy(net(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    conv = net.layer1[0].conv1
    old_weight = conv.weight
    old_momentum = optimizers[0].state[old_weight]["momentum_buffer"].clone()
    masks = gates.keep_masks()
    # layer1.0.conv1 writes a block-internal group and reads the residual stream: both prunable here.
    output_group = next(group for group in graph.prunable_groups if "layer1.0.conv1" in group.producers)
    input_group = next(group for group in graph.prunable_groups if "layer1.0.conv1" in group.consumers)
    kept_outputs = torch.nonzero(masks[output_group.index]).flatten()
    kept_inputs = torch.nonzero(masks[input_group.index]).flatten()

    gates.detach_from(net)
    extraction = extract_subnetwork(net, graph, masks)
    for optimizer in optimizers:
        remap_optimizer_state(optimizer, extraction, removed=set(gates.parameters()))

    expected_momentum = old_momentum[kept_outputs][:, kept_inputs]
    assert torch.equal(optimizers[0].state[conv.weight]["momentum_buffer"], expected_momentum)
    parameters = set(net.parameters())
    for optimizer in optimizers:
        assert optimizer.param_groups[1]["params"] == []
        for parameter in optimizer.param_groups[0]["params"]:
            assert parameter in parameters
            for value in optimizer.state[parameter].values():
                if value.ndim:
                    assert value.shape == parameter.shape
        nn.functional.cross_entropy(net(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
        optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))


@pytest.mark.parametrize(("name", "kwargs"), [FAMILIES[0], FAMILIES[4]], ids=["resnet20-A", "mobilenetv2_050"])
def test_pruned_model_round_trips(name: str, kwargs: dict, tmp_path: Path) -> None:
    net = _randomised_model(name, kwargs)
    graph, gates = _gated(net)
    masks = gates.keep_masks()
    gates.detach_from(net)
    extract_subnetwork(net, graph, masks)
    path = save_pruned(tmp_path / "pruned.pt", net, report={"flops_reduction": 0.5})

    payload = torch.load(path, weights_only=True)
    loaded = load_pruned(path)

    assert payload["model"]["name"] == name
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), net(images))
    for key, value in net.state_dict().items():
        assert loaded.state_dict()[key].shape == value.shape


def test_interrupted_save_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = create_model("resnet20", 3, 10)
    path = save_pruned(tmp_path / "pruned.pt", net, report={"epoch": 1})
    original_save = torch.save

    def save_then_die(payload: dict, target: Path) -> None:
        original_save(payload, target)
        Path(target).write_bytes(Path(target).read_bytes()[:100])
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(path, net, report={"epoch": 2})
    monkeypatch.undo()

    assert torch.load(path, weights_only=True)["report"] == {"epoch": 1}


def test_load_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a pruned model"):
        load_pruned(path)


def test_l1_masks_meet_budget() -> None:
    net = create_model("resnet20", 3, 10, shortcut="B")
    graph = build_channel_graph(net, torch.zeros(1, 3, 32, 32))
    masks = l1_norm_keep_masks(net, graph, flops_reduction=0.5)
    reduction = 1 - float(macs_from_counts(graph, _kept_counts(masks))) / dense_macs(graph)
    assert 0.5 <= reduction < 0.55


def test_fit_masks_to_budget_closes_lowest_scores() -> None:
    graph = build_channel_graph(create_model("resnet20", 3, 10), torch.zeros(1, 3, 32, 32))
    scores = {group.index: torch.linspace(0.6, 1.0, group.channels) for group in graph.prunable_groups}
    masks = fit_masks_to_budget(graph, scores, flops_reduction=0.3, tolerance=0.02)
    reduction = 1 - float(macs_from_counts(graph, _kept_counts(masks))) / dense_macs(graph)
    assert 0.3 <= reduction <= 0.32
    for mask in masks.values():
        if not mask.all():
            assert not mask[0]

    scores = {group.index: torch.linspace(0.0, 0.4, group.channels) for group in graph.prunable_groups}
    masks = fit_masks_to_budget(graph, scores, flops_reduction=0.3, tolerance=0.02)
    reduction = 1 - float(macs_from_counts(graph, _kept_counts(masks))) / dense_macs(graph)
    assert 0.3 <= reduction <= 0.32


def test_rounded_widths_stay_in_budget() -> None:
    graph = build_channel_graph(create_model("resnet20", 3, 10), torch.zeros(1, 3, 32, 32))
    generator = torch.Generator().manual_seed(0)
    scores = {group.index: torch.rand(group.channels, generator=generator) for group in graph.prunable_groups}
    masks = fit_masks_to_budget(graph, scores, flops_reduction=0.5, tolerance=0.03)

    rounded = round_kept_channels(graph, scores, masks, multiple=8, flops_reduction=0.5, tolerance=0.03)

    reduction = 1 - float(macs_from_counts(graph, _kept_counts(rounded))) / dense_macs(graph)
    assert 0.5 <= reduction <= 0.53
    for index, mask in rounded.items():
        kept = int(mask.sum())
        assert kept % 8 == 0 or kept == mask.numel()
        # The kept channels are the group's highest-scoring ones.
        if 0 < kept < mask.numel():
            assert scores[index][mask].min() >= scores[index][~mask].max()


def test_rounding_to_one_changes_nothing() -> None:
    graph = build_channel_graph(create_model("resnet20", 3, 10), torch.zeros(1, 3, 32, 32))
    scores = {group.index: torch.linspace(0.0, 1.0, group.channels) for group in graph.prunable_groups}
    masks = fit_masks_to_budget(graph, scores, flops_reduction=0.4, tolerance=0.03)

    rounded = round_kept_channels(graph, scores, masks, multiple=1, flops_reduction=0.4, tolerance=0.03)

    assert all(torch.equal(rounded[index], masks[index]) for index in masks)


class _ChannelLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(1, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


class _Sigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sigmoid(self.conv(x)).mean((2, 3)))


def test_unsupported_layer_is_named() -> None:
    with pytest.raises(UnsupportedModelError, match="layer 'norm' \\(GroupNorm\\)"):
        build_channel_graph(_ChannelLayerNorm(), torch.zeros(1, 3, 8, 8))


def test_unsupported_operation_is_named() -> None:
    with pytest.raises(UnsupportedModelError, match="'sigmoid'"):
        build_channel_graph(_Sigmoid(), torch.zeros(1, 3, 8, 8))


class _SpatialView(nn.Module):
    """Reads a feature map as rows of 8 values with view(-1, 8), which mixes channels with positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.relu(self.conv(x)).view(-1, 8)
        return self.head(rows).view(x.shape[0], -1).mean(1)


class _WeightNormConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.normed = nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 1, bias=False))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.normed(self.stem(x)).mean((2, 3)))


def test_spatial_view_not_pruned() -> None:
    graph = build_channel_graph(_SpatialView(), torch.zeros(1, 3, 8, 8))

    conv_group = next(group for group in graph.groups if "conv" in group.producers)
    assert not conv_group.prunable
    assert "flatten of a spatial map" in conv_group.fixed_reason


def test_parametrized_layer_rejected() -> None:
    # Extraction would slice the computed weight, not weight_norm's magnitude and direction.
    with pytest.raises(UnsupportedModelError, match="'normed'.*parametrized weights"):
        build_channel_graph(_WeightNormConv(), torch.zeros(1, 3, 8, 8))


class _MeanHead(nn.Module):
    def __init__(self, spatial_mean) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)
        self.spatial_mean = spatial_mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.spatial_mean(torch.relu(self.conv(x))))


@pytest.mark.parametrize(
    "spatial_mean",
    [lambda x: x.mean((2, 3)), lambda x: x.mean(dim=-1).mean(-1), lambda x: torch.mean(x, [-2, -1])],
    ids=["tuple", "last-dims", "torch.mean"],
)
def test_spatial_mean_keeps_channels(spatial_mean) -> None:
    net = _MeanHead(spatial_mean).eval()
    graph, gates = _gated(net)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        gated_output = net(images)
    masks = gates.keep_masks()
    gates.detach_from(net)
    extract_subnetwork(net, graph, masks)

    assert [group.producers for group in graph.prunable_groups] == [["conv"]]
    with torch.no_grad():
        assert torch.allclose(net(images), gated_output, atol=1e-5, rtol=0)
