"""Layer pruning: residual blocks found in the graph, gated, removed, costed, saved and resumed."""

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_modules.callbacks.flops import count_forward_cost
from lightning_modules.polarization import PolarizationModule, PruningReportCallback
from lightning_modules.setup_run import instantiate_user_object
from models import create_model
from pruning import (
    ChannelGates,
    block_costs,
    branch_parameters,
    build_channel_graph,
    channel_table,
    dense_macs,
    extract_subnetwork,
    fit_masks_to_budget,
    load_pruned,
    macs_from_counts,
    remap_optimizer_state,
    remove_residual_branches,
    save_pruned,
)
from pruning.blocks import RemovedConv2d, ZerosLike
from tests.conftest import ComposeConfig
from tests.test_pruning import FAMILIES, _randomised_model
from tests.test_pruning_training import SMALL


def create(name: str, kwargs: dict) -> nn.Module:
    return create_model(name, in_channels=3, num_classes=10, **kwargs)


RESIDUAL_FAMILIES = [family for family in FAMILIES if family[0] != "vgg11_bn"]


def _gated_with_blocks(net: nn.Module, closed_blocks: list[int], seed: int = 0):
    """Gate ``net`` with half its channels and the blocks at the given positions of ``graph.blocks`` closed."""
    graph = build_channel_graph(net, torch.zeros(1, 3, 32, 32))
    gates = ChannelGates(graph, blocks=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for score in gates.scores.values():
            score.copy_((torch.rand(score.shape, generator=generator) > 0.5).float() * 0.8 + 0.1)
        for position in closed_blocks:
            gates.block_scores[str(graph.blocks[position].index)].fill_(0.2)
    gates.attach(net)
    return graph, gates


def _extract(net: nn.Module, graph, gates: ChannelGates) -> tuple[dict[int, torch.Tensor], set[int]]:
    masks, removed = gates.keep_masks(), gates.removed_blocks()
    gates.detach_from(net)
    extract_subnetwork(net, graph, masks)
    remove_residual_branches(net, graph, removed)
    return masks, removed


@pytest.mark.parametrize(
    ("name", "kwargs", "blocks", "first_layers"),
    [
        ("resnet20", {"shortcut": "A"}, 9, ["layer1.0.conv1", "layer1.0.conv2"]),
        ("resnet20", {"shortcut": "B"}, 9, ["layer1.0.conv1", "layer1.0.conv2"]),
        ("resnet18", {}, 8, ["layer1.0.conv1", "layer1.0.conv2"]),
        # Only MobileNetV2's stride-1 blocks of unchanged width have a shortcut.
        ("mobilenetv2_050", {}, 10, ["blocks.1.1.conv_pw", "blocks.1.1.conv_dw", "blocks.1.1.conv_pwl"]),
        ("vgg11_bn", {}, 0, None),
    ],
)
def test_blocks_found_per_family(name: str, kwargs: dict, blocks: int, first_layers: list[str] | None) -> None:
    graph = build_channel_graph(create(name, kwargs), torch.zeros(1, 3, 32, 32))
    assert len(graph.blocks) == blocks
    if first_layers:
        assert graph.blocks[0].layers == first_layers
        assert graph.blocks[0].name == first_layers[0].rsplit(".", 1)[0]
    # A projection shortcut belongs to the shortcut, never to the branch.
    for block in graph.blocks:
        assert not any("downsample" in layer or "shortcut" in layer for layer in block.modules)


@pytest.mark.parametrize(("name", "kwargs"), RESIDUAL_FAMILIES, ids=lambda value: str(value))
def test_removed_blocks_match_gated(name: str, kwargs: dict) -> None:
    net = _randomised_model(name, kwargs)
    graph, gates = _gated_with_blocks(net, closed_blocks=[0, 2, -1])
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        gated_output = net(images)
        block = gates.block_scores[str(graph.blocks[0].index)]
        block.fill_(0.9)
        with_first_block = net(images)
        block.fill_(0.2)
    # The gate of the first block changes the output, so it gates something.
    assert not torch.allclose(with_first_block, gated_output, atol=1e-3)

    masks, removed = _extract(net, graph, gates)
    with torch.no_grad():
        extracted_output = net(images)

    assert len(removed) == 3
    assert torch.allclose(extracted_output, gated_output, atol=1e-5, rtol=0)
    counted = count_forward_cost(net, images[:1]).macs
    predicted = macs_from_counts(
        graph, {index: float(mask.sum()) for index, mask in masks.items()}, dict.fromkeys(removed, 0.0)
    )
    assert counted == pytest.approx(float(predicted), abs=0.5)
    for block in graph.blocks:
        if block.index in removed:
            for layer in block.layers:
                assert not any(True for _ in net.get_submodule(layer).parameters())


@pytest.mark.parametrize(
    ("name", "kwargs"), [RESIDUAL_FAMILIES[0], RESIDUAL_FAMILIES[3]], ids=["resnet20-A", "mobilenetv2_050"]
)
def test_removed_blocks_round_trip(name: str, kwargs: dict, tmp_path: Path) -> None:
    net = _randomised_model(name, kwargs)
    graph, gates = _gated_with_blocks(net, closed_blocks=[1, -1])
    _extract(net, graph, gates)
    path = save_pruned(tmp_path / "pruned.pt", net)

    loaded = load_pruned(path)

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), net(images))
    assert isinstance(loaded.get_submodule(graph.blocks[1].layers[0]), RemovedConv2d)
    assert sum(parameter.numel() for parameter in loaded.parameters()) == sum(
        parameter.numel() for parameter in net.parameters()
    )


def test_stride_two_branch_keeps_shape() -> None:
    # ResNet-20's layer2.0 halves the resolution; its stand-ins must too, or the addition fails.
    net = _randomised_model("resnet20", {"shortcut": "A"})
    graph, gates = _gated_with_blocks(net, closed_blocks=[3])
    assert graph.blocks[3].name == "layer2.0"
    _extract(net, graph, gates)
    with torch.no_grad():
        assert net.layer2[0](torch.randn(2, 16, 32, 32)).shape == (2, 32, 16, 16)


def test_optimizer_drops_removed_branch() -> None:
    net = _randomised_model("resnet20", {"shortcut": "B"}).train()
    graph, gates = _gated_with_blocks(net, closed_blocks=[0])
    optimizer = torch.optim.SGD(
        [{"params": net.parameters()}, {"params": gates.parameters(), "lr": 0.5}], lr=0.1, momentum=0.9
    )
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    F.cross_entropy(net(images), labels).backward()
    optimizer.step()
    optimizer.zero_grad()

    dropped = set(gates.parameters()) | branch_parameters(net, graph, gates.removed_blocks())
    masks, removed = gates.keep_masks(), gates.removed_blocks()
    gates.detach_from(net)
    extraction = extract_subnetwork(net, graph, masks)
    remove_residual_branches(net, graph, removed)
    remap_optimizer_state(optimizer, extraction, removed=dropped)

    assert set(optimizer.param_groups[0]["params"]) == set(net.parameters())
    assert not any(parameter in optimizer.state for parameter in dropped)
    F.cross_entropy(net(images), labels).backward()
    optimizer.step()
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))


def test_block_gate_gets_task_gradient() -> None:
    net = _randomised_model("resnet20", {"shortcut": "A"}).train()
    graph, gates = _gated_with_blocks(net, closed_blocks=[0])
    F.cross_entropy(net(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
    gradients = torch.stack([score.grad for score in gates.block_scores.values()])
    # Closed or open, every block's gate learns from the task loss.
    assert (gradients != 0).all()
    assert len(gates.all_scores()) == sum(group.channels for group in graph.prunable_groups) + len(graph.blocks)


def test_block_cost_is_its_branch() -> None:
    graph = build_channel_graph(create("resnet20", {"shortcut": "A"}), torch.zeros(1, 3, 32, 32))
    costs = block_costs(graph)
    # layer1.0: two 3x3 convolutions, 16 to 16 channels at 32x32; layer3.2: the same at 64 channels and 8x8.
    assert costs[graph.blocks[0].index] == 2 * 9 * 16 * 16 * 32 * 32
    assert costs[graph.blocks[-1].index] == 2 * 9 * 64 * 64 * 8 * 8

    # A removed block's inner channels cost nothing, so the budget fit leaves them alone.
    removed = {graph.blocks[-1].index}
    dense = dense_macs(graph)
    scores = {group.index: torch.full((group.channels,), 0.9) for group in graph.prunable_groups}
    masks = fit_masks_to_budget(graph, scores, flops_reduction=0.3, tolerance=0.02, removed_blocks=removed)
    kept_channels = {index: float(mask.sum()) for index, mask in masks.items()}
    reduction = 1 - float(macs_from_counts(graph, kept_channels, dict.fromkeys(removed, 0.0))) / dense
    assert 0.3 <= reduction <= 0.32
    rows = {row.layer: row for row in channel_table(graph, masks, removed)}
    assert rows["layer3.2.conv1"].kind == "removed"
    assert rows["layer3.2.conv1"].macs_pruned == 0.0
    assert rows["layer3.1.conv1"].kind == "conv"


class TwoConvolutionBranch(nn.Module):
    """A stem, a branch of two convolutions and a linear head; subclasses wire them in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)


class BranchUsedTwice(TwoConvolutionBranch):
    """A residual addition whose branch output is read again after it, so the branch cannot be removed."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.stem(images)
        branch = self.conv2(F.relu(self.conv1(features)))
        features = features + branch
        features = features + branch.relu()
        return self.head(features.mean(dim=(2, 3)))


def test_shared_branch_not_a_block() -> None:
    graph = build_channel_graph(BranchUsedTwice(), torch.zeros(1, 3, 16, 16))
    assert graph.blocks == []


class PoolEndedBranch(TwoConvolutionBranch):
    """A branch ending in an adaptive pool, which keeps the shape only at the traced resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(16)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.stem(images)
        features = features + self.pool(self.conv2(F.relu(self.conv1(features))))
        return self.head(features.mean(dim=(2, 3)))


def test_pool_ended_branch_not_a_block() -> None:
    graph = build_channel_graph(PoolEndedBranch(), torch.zeros(1, 3, 16, 16))
    assert graph.blocks == []


class InnerBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(features)))))


class NestedBlocks(nn.Module):
    """An outer residual branch with an inner residual block inside it."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.pre = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.inner = InnerBlock(channels)
        self.post = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.post_bn = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.stem(images))
        features = features + self.post_bn(self.post(self.inner(F.relu(self.pre(features)))))
        return self.head(features.mean(dim=(2, 3)))


@pytest.mark.parametrize("removed_names", [["inner"], [""], ["inner", ""]])
def test_nested_blocks_cost(removed_names: list[str]) -> None:
    torch.manual_seed(0)
    net = NestedBlocks().eval()
    graph = build_channel_graph(net, torch.zeros(1, 3, 16, 16))
    by_name = {block.name: block for block in graph.blocks}
    # The outer branch's layers share no module path, so it is named after its addition node.
    outer = next(block for name, block in by_name.items() if name != "inner")
    assert sorted(by_name) == sorted(["inner", outer.name])
    assert block_costs(graph)[by_name["inner"].index] == 2 * 9 * 8 * 8 * 16 * 16

    gates = ChannelGates(graph, blocks=True)
    removed = {by_name["inner"].index if name == "inner" else outer.index for name in removed_names}
    with torch.no_grad():
        for index in removed:
            gates.block_scores[str(index)].fill_(0.2)
    gates.attach(net)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        gated_output = net(images)
    _extract(net, graph, gates)

    with torch.no_grad():
        assert torch.allclose(net(images), gated_output, atol=1e-5, rtol=0)
    counted = count_forward_cost(net, images[:1]).macs
    assert counted == pytest.approx(float(macs_from_counts(graph, {}, dict.fromkeys(removed, 0.0))), abs=0.5)


class GroupedBranch(TwoConvolutionBranch):
    """A residual branch of grouped convolutions, which fix every channel group: block gates only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.stem(images)
        features = features + self.conv2(F.relu(self.conv1(features)))
        return self.head(features.mean(dim=(2, 3)))


def test_block_gates_attach_once() -> None:
    net = GroupedBranch()
    graph = build_channel_graph(net, torch.zeros(1, 3, 16, 16))
    gates = ChannelGates(graph, blocks=True)
    assert not graph.prunable_groups
    assert len(graph.blocks) == 1

    gates.attach(net)

    with pytest.raises(RuntimeError, match="already attached"):
        gates.attach(net)


def test_save_format_names_removed_layers(tmp_path: Path) -> None:
    net = _randomised_model("resnet20", {"shortcut": "A"})
    plain = save_pruned(tmp_path / "plain.pt", net)
    graph, gates = _gated_with_blocks(net, closed_blocks=[0])
    _extract(net, graph, gates)
    with_blocks = save_pruned(tmp_path / "blocks.pt", net)

    # A network without removed blocks stays readable by readers of the first format.
    assert torch.load(plain, weights_only=True)["format"] == "leanlight-pruned-model/1"
    assert torch.load(with_blocks, weights_only=True)["format"] == "leanlight-pruned-model/2"


def _module(compose_config: ComposeConfig, *overrides: str) -> PolarizationModule:
    cfg = compose_config(*SMALL, *overrides)
    net = instantiate_user_object(cfg.model, in_channels=1, num_classes=10)
    module = instantiate_user_object(cfg.module, net=net, num_classes=10)
    module.build_gates(torch.zeros(2, 1, 8, 8))
    module.log = lambda *args, **kwargs: None
    return module


def test_checkpoint_restores_removed_blocks(compose_config: ComposeConfig) -> None:
    module = _module(compose_config, "module.prune_blocks=true")
    with torch.no_grad():
        module.gates.block_scores[str(module.graph.blocks[1].index)].fill_(0.1)
    module.extract([])
    assert module.removed_blocks == {module.graph.blocks[1].index}
    assert module.pruning_report()["pruning_blocks_removed"] == 1
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)

    restored = _module(compose_config, "module.prune_blocks=true")
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"])

    images = torch.randn(3, 1, 8, 8)
    module.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(images), module(images))
    assert restored.kept_flops_fraction() == module.kept_flops_fraction() < 1.0

    without_blocks = _module(compose_config)
    with pytest.raises(ValueError, match="module.prune_blocks=true"):
        without_blocks.on_load_checkpoint(checkpoint)


def test_freeze_reopens_blocks_that_overshoot(compose_config: ComposeConfig) -> None:
    # Five closed blocks remove about 56 % of the MACs; closing channels cannot undo that.
    module = _module(compose_config, "module.prune_blocks=true", "module.flops_reduction=0.3", "module.round_to=4")
    with torch.no_grad():
        for position, block in enumerate(module.graph.blocks[:5]):
            module.gates.block_scores[str(block.index)].fill_(0.1 + 0.05 * position)
    assert 1 - module.kept_flops_fraction() > 0.5

    module.freeze()

    reduction = 1 - module.kept_flops_fraction()
    assert 0.3 <= reduction <= 0.3 + module.freeze_tolerance
    # The highest-scored closed blocks reopened first.
    assert 0 < len(module.removed_blocks) < 5
    assert module.graph.blocks[0].index in module.removed_blocks
    assert module.graph.blocks[4].index not in module.removed_blocks


def test_gated_checkpoint_names_block_setting(compose_config: ComposeConfig) -> None:
    with_blocks = _module(compose_config, "module.prune_blocks=true")
    checkpoint = {"state_dict": with_blocks.state_dict()}
    with_blocks.on_save_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="set module.prune_blocks=true"):
        _module(compose_config).on_load_checkpoint(checkpoint)

    without_blocks = _module(compose_config)
    checkpoint = {"state_dict": without_blocks.state_dict()}
    without_blocks.on_save_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="set module.prune_blocks=false"):
        _module(compose_config, "module.prune_blocks=true").on_load_checkpoint(checkpoint)


# Every channel gate is still at its initial 1, so the polarization warning fires, rightly.
@pytest.mark.filterwarnings("ignore:.*pulls the open gates down")
def test_block_flip_breaks_settling(compose_config: ComposeConfig) -> None:
    module = _module(compose_config, "module.prune_blocks=true")
    for epoch in range(2):
        module.trainer = SimpleNamespace(current_epoch=epoch, max_epochs=10)
        module.on_train_epoch_end()
    assert module.stable_epochs == 1

    with torch.no_grad():
        module.gates.block_scores[str(module.graph.blocks[0].index)].fill_(0.1)
    module.trainer = SimpleNamespace(current_epoch=2, max_epochs=10)
    module.on_train_epoch_end()
    assert module.stable_epochs == 0


def test_summary_without_blocks() -> None:
    callback = PruningReportCallback()
    callback.report = {
        "pruning_flops_reduction": 0.5,
        "pruning_flops_reduction_target": 0.5,
        "pruning_dense_macs_per_sample": 1e6,
        "pruning_params_reduction": 0.4,
        "pruning_dense_params": 1000,
        "pruning_freeze_epoch": 2,
        "pruning_blocks_removed": 0,
        "pruning_blocks": 0,
    }
    rows = dict(callback.summary_rows())
    assert rows["gates frozen after"] == "2 epochs"
    assert rows["residual blocks removed"] == "none: the network has no removable residual block"

    callback.report.update(pruning_blocks_removed=2, pruning_blocks=9)
    assert dict(callback.summary_rows())["residual blocks removed"] == "2 of 9"


def test_stand_ins_before_last_layer_are_thin() -> None:
    net = _randomised_model("resnet20", {"shortcut": "A"})
    graph, gates = _gated_with_blocks(net, closed_blocks=[1])
    _extract(net, graph, gates)
    block = graph.blocks[1]
    # Only layer1.1.conv2's zeros reach the addition, through bn2, which is now an identity.
    assert net.get_submodule(block.layers[0]).out_channels == 1
    assert net.get_submodule(block.layers[-1]).out_channels == 16
    assert not isinstance(net.get_submodule(block.output), ZerosLike)


class ChannelViewBranch(TwoConvolutionBranch):
    """A branch that reshapes its channels by a fixed count, so its stand-ins need the full width."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.stem(images)
        branch = self.conv1(features).view(-1, 2, 4, 16, 16).view(-1, 8, 16, 16)
        features = features + self.conv2(F.relu(branch))
        return self.head(features.mean(dim=(2, 3)))


def test_stand_ins_keep_needed_width() -> None:
    net = ChannelViewBranch().eval()
    graph = build_channel_graph(net, torch.zeros(1, 3, 16, 16))
    gates = ChannelGates(graph, blocks=True)
    with torch.no_grad():
        gates.block_scores[str(graph.blocks[0].index)].fill_(0.2)
    gates.attach(net)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        gated_output = net(images)

    _extract(net, graph, gates)

    assert net.conv1.out_channels == 8
    with torch.no_grad():
        assert torch.allclose(net(images), gated_output, atol=1e-5, rtol=0)
