"""Channel dependency graph: which channels of which layers are kept or removed together.

The network is traced with ``torch.fx`` and every tensor in it gets a channel space
(dimension 1 of a feature map, the last dimension of a ``(B, C)`` tensor). Operations
that keep channels one-to-one (BatchNorm, activations, pooling, depthwise
convolutions, flatten of a 1x1 map) put their output in the same space as their
input, and a residual addition merges the spaces of its operands. The spaces that
remain after merging are the channel groups. Removing channel ``i`` of a group removes
output channel ``i`` of every producer (a convolution or linear layer writing into the
group). It also removes channel ``i`` of every BatchNorm and depthwise convolution in
the group, and input channel ``i`` of every consumer. Torch-Pruning calls these dependency groups.

A group is fixed (never pruned) when it touches the model's input or output, a
channel concatenation or padding (the zero-padding shortcut of CIFAR ResNets,
option A), channel indexing, a grouped convolution or a flatten of a spatial map.
An operation whose effect on channels is unknown raises :class:`UnsupportedModelError`
naming the layer.
"""

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.modules.batchnorm import _BatchNorm


class UnsupportedModelError(ValueError):
    """The network contains a layer or operation that channel pruning cannot handle."""


# Modules and functions that keep channels one-to-one: each output channel depends only
# on the same input channel, so removing a channel before them removes it after them.
CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
CHANNELWISE_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.silu,
    F.gelu,
    F.hardswish,
    F.hardtanh,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    torch.relu,
    torch.tanh,
}
CHANNELWISE_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone", "float", "to"}
# Channel-wise layers whose output shape can differ from their input's at another resolution.
SHAPE_CHANGING_MODULES = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
)
ADD_TARGETS = {operator.add, operator.iadd, torch.add}
FLATTEN_TARGETS = {torch.flatten}
SHAPE_ONLY_METHODS = {"size", "dim"}


@dataclass
class ChannelGroup:
    """Channels that must be kept or removed together, with every layer that touches them.

    Layers are named by module name. ``producers`` (convolutions and linear layers)
    write the group's channels, and ``consumers`` read them as input channels.
    ``depthwise`` convolutions do both. ``norms`` are the BatchNorm layers over the
    channels. A prunable group's channels reach the output only through its consumers, so
    gating the consumers' inputs is enough to remove them.
    """

    index: int
    channels: int
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    depthwise: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    fixed_reason: str | None = None

    @property
    def prunable(self) -> bool:
        return self.fixed_reason is None and self.channels > 1

    @property
    def name(self) -> str:
        """The first layer that writes the group, and how many others write it too."""
        writers = self.producers + [name for name in self.depthwise if name not in self.producers]
        if not writers:
            return f"group{self.index}"
        extra = len(writers) - 1
        return writers[0] + (f" (+{extra} coupled)" if extra else "")


@dataclass
class LayerCost:
    """A convolution or linear layer and what one sample costs in it.

    MACs per sample are ``out * in * unit_macs`` for a dense layer and
    ``channels * unit_macs`` for a depthwise convolution, where the counts are the kept
    channels of ``out_group`` and ``in_group`` and ``unit_macs`` is kernel area times
    output positions divided by the convolution's groups.
    """

    name: str
    kind: str  # "conv", "depthwise" or "linear"
    in_group: int
    out_group: int
    in_channels: int
    out_channels: int
    unit_macs: float


@dataclass
class ResidualBlock:
    """A residual branch that can be removed whole, leaving its block's shortcut.

    The block computes ``shortcut + branch``. ``name`` is the module path that the
    branch's layers share (``layer1.0``), or the addition's node name in the traced graph
    (``add_3``) when they share none. ``output`` is the layer whose output is the branch
    operand of that addition: a gate on its output gates the branch. ``modules`` are
    every layer called on the branch (used nowhere else). ``layers`` are the convolutions
    and linear layers among them, whose MACs the branch costs, in the order they run.
    ``output_from_last_layer`` is true when ``output`` is the last of ``layers`` or reads
    it through BatchNorm and identity layers only, so zeros from that layer reach the
    addition unchanged.
    """

    index: int
    name: str
    output: str
    modules: list[str]
    layers: list[str]
    output_from_last_layer: bool = False


@dataclass
class ChannelGraph:
    """Channel groups of a traced network, the cost of each of its layers and its removable residual branches."""

    groups: list[ChannelGroup]
    layers: list[LayerCost]
    input_shape: tuple[int, ...]
    blocks: list[ResidualBlock] = field(default_factory=list)

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [group for group in self.groups if group.prunable]


class _LeafTracer(fx.Tracer):
    """Keep BatchNorm subclasses (timm's ``BatchNormAct2d``), convolutions and linear layers as leaves."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, (_BatchNorm, nn.Conv2d, nn.Linear)):
            return True
        return super().is_leaf_module(module, qualified_name)


def trace(net: nn.Module) -> fx.GraphModule:
    """Trace ``net`` symbolically; raise :class:`UnsupportedModelError` if ``torch.fx`` cannot."""
    try:
        graph = _LeafTracer().trace(net)
    except Exception as error:  # fx raises TraceError, TypeError, RuntimeError... for untraceable code.
        raise UnsupportedModelError(
            f"torch.fx could not trace {type(net).__name__}: {type(error).__name__}: {error}. "
            "Channel pruning needs a network without data-dependent control flow"
        ) from error
    return fx.GraphModule(net, graph)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, first: int, second: int) -> int:
        first, second = self.find(first), self.find(second)
        if first != second:
            self.parent[second] = first
        return first


@dataclass
class _Member:
    role: str  # "producer", "consumer", "depthwise" or "norm"
    module: str


class _GraphBuilder:
    def __init__(self, traced: fx.GraphModule) -> None:
        self.traced = traced
        self.spaces = _UnionFind()
        self.space_of: dict[fx.Node, int] = {}
        self.channels_of_space: dict[int, int] = {}
        self.members: list[tuple[int, _Member]] = []
        self.fixed: list[tuple[int, str]] = []
        self.layers: list[tuple[str, str, int, int, int, int, float]] = []
        self.calls: dict[str, int] = {}

    def new_space(self, node: fx.Node) -> int:
        space = self.spaces.new()
        self.channels_of_space[space] = _channels(node)
        self.space_of[node] = space
        return space

    def same_space(self, node: fx.Node, source: fx.Node) -> int:
        space = self.space_of[source]
        self.space_of[node] = space
        return space

    def fix(self, space: int, reason: str) -> None:
        self.fixed.append((space, reason))

    def add(self, space: int, role: str, module: str) -> None:
        self.members.append((space, _Member(role, module)))

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            if _is_tensor(node):
                self.fix(self.new_space(node), "model input")
        elif node.op == "output":
            for argument in _tensor_args(node.args, self.space_of):
                self.fix(self.space_of[argument], "model output")
        elif node.op == "get_attr":
            if _is_tensor(node):
                self.fix(self.new_space(node), f"constant tensor {node.target!r}")
        elif node.op == "call_module":
            self.visit_module(node)
        elif node.op in ("call_function", "call_method"):
            self.visit_function(node)

    def visit_module(self, node: fx.Node) -> None:
        name = str(node.target)
        module = self.traced.get_submodule(name)
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] > 1 and _has_parameters(module):
            raise UnsupportedModelError(
                f"layer {name!r} ({type(module).__name__}) is called more than once; "
                "channel pruning does not support weights shared between call sites"
            )
        if parametrize.is_parametrized(module):
            raise UnsupportedModelError(
                f"layer {name!r} ({type(module).__name__}) has parametrized weights (such as weight_norm), which "
                "extraction cannot slice; remove them first with torch.nn.utils.parametrize.remove_parametrizations"
            )
        source = self.single_tensor_input(node, name, module)

        if isinstance(module, nn.Conv2d):
            self.visit_conv(node, name, module, source)
        elif isinstance(module, nn.Linear):
            self.visit_linear(node, name, module, source)
        elif isinstance(module, _BatchNorm):
            _check_children(name, module)
            self.add(self.same_space(node, source), "norm", name)
        elif isinstance(module, CHANNELWISE_MODULES):
            self.same_space(node, source)
        elif isinstance(module, nn.Flatten):
            self.visit_flatten(node, source, f"layer {name!r}")
        else:
            raise UnsupportedModelError(
                f"cannot prune through layer {name!r} ({type(module).__name__}): its effect on channels is "
                "unknown. Supported: Conv2d, Linear, BatchNorm, element-wise activations, "
                "pooling, Flatten, residual additions"
            )

    def single_tensor_input(self, node: fx.Node, name: str, module: nn.Module) -> fx.Node:
        inputs = _tensor_args(node.args, self.space_of)
        if len(inputs) != 1:
            raise UnsupportedModelError(
                f"layer {name!r} ({type(module).__name__}) takes {len(inputs)} tensor inputs; "
                "channel pruning supports layers with one tensor input"
            )
        return inputs[0]

    def visit_conv(self, node: fx.Node, name: str, conv: nn.Conv2d, source: fx.Node) -> None:
        in_space = self.space_of[source]
        output_positions = _spatial_size(node)
        kernel_area = conv.kernel_size[0] * conv.kernel_size[1]
        if conv.groups == 1:
            out_space = self.new_space(node)
            self.add(in_space, "consumer", name)
            self.add(out_space, "producer", name)
            kind = "conv"
        elif conv.groups == conv.in_channels == conv.out_channels:
            out_space = self.same_space(node, source)
            self.add(out_space, "depthwise", name)
            kind = "depthwise"
        else:
            out_space = self.new_space(node)
            reason = f"grouped convolution {name!r} (groups={conv.groups})"
            self.fix(in_space, reason)
            self.fix(out_space, reason)
            kind = "conv"
        unit = kernel_area * output_positions / conv.groups
        if kind == "depthwise":
            unit = kernel_area * output_positions
        self.layers.append((name, kind, in_space, out_space, conv.in_channels, conv.out_channels, unit))

    def visit_linear(self, node: fx.Node, name: str, linear: nn.Linear, source: fx.Node) -> None:
        shape = _shape(source)
        if shape is None or len(shape) != 2:
            raise UnsupportedModelError(
                f"layer {name!r} (Linear) reads a tensor of shape {shape}; channel pruning supports "
                "linear layers on (batch, features) inputs only"
            )
        in_space = self.space_of[source]
        out_space = self.new_space(node)
        self.add(in_space, "consumer", name)
        self.add(out_space, "producer", name)
        self.layers.append((name, "linear", in_space, out_space, linear.in_features, linear.out_features, 1.0))

    def visit_flatten(self, node: fx.Node, source: fx.Node, where: str) -> None:
        in_shape, out_shape = _shape(source), _shape(node)
        # Only a 1x1 map flattens to its channels. A larger map read with view(-1, C) mixes them.
        one_by_one = in_shape is not None and math.prod(in_shape[2:]) == 1
        if one_by_one and out_shape is not None and len(out_shape) == 2 and out_shape[1] == in_shape[1]:
            self.same_space(node, source)
            return
        space = self.new_space(node)
        reason = f"flatten of a spatial map at {where}"
        self.fix(space, reason)
        self.fix(self.space_of[source], reason)

    def visit_function(self, node: fx.Node) -> None:
        if not _is_tensor(node):
            return
        target = node.target
        inputs = _tensor_args(node.args, self.space_of) + _tensor_args(node.kwargs, self.space_of)
        where = f"operation {node.name!r} ({_target_name(target)})"

        if not inputs:
            self.fix(self.new_space(node), f"tensor created at {where}")
        elif target in ADD_TARGETS or (node.op == "call_method" and target in ("add", "add_")):
            self.visit_add(node, inputs, where)
        elif target in CHANNELWISE_FUNCTIONS or (node.op == "call_method" and target in CHANNELWISE_METHODS):
            self.same_space(node, inputs[0])
        elif target in FLATTEN_TARGETS or (node.op == "call_method" and target in ("flatten", "view", "reshape")):
            self.visit_flatten(node, inputs[0], where)
        elif (node.op == "call_method" and target == "mean") or target is torch.mean:
            self.visit_reduction(node, inputs[0], where)
        elif target is operator.getitem:
            self.visit_getitem(node, inputs[0], where)
        elif target is F.pad:
            self.visit_pad(node, inputs[0], where)
        else:
            raise UnsupportedModelError(
                f"cannot prune through {where}: its effect on channels is unknown. Supported operations: "
                "residual additions, element-wise activations, pooling, flatten, mean over spatial "
                "dimensions, spatial indexing and padding"
            )

    def visit_add(self, node: fx.Node, inputs: list[fx.Node], where: str) -> None:
        constants = [arg for arg in node.args if not isinstance(arg, fx.Node)]
        space = self.same_space(node, inputs[0])
        for other in inputs[1:]:
            if _shape(other) != _shape(inputs[0]):
                raise UnsupportedModelError(f"cannot prune through {where}: it adds tensors of different shapes")
            space = self.spaces.union(space, self.space_of[other])
        if any(constant != 0 for constant in constants):
            self.fix(space, f"addition of a constant at {where}")

    def visit_reduction(self, node: fx.Node, source: fx.Node, where: str) -> None:
        # Read the reduced dimensions from the arguments, because sizes can mislead: a batch mean
        # of a map whose height equals its channel count keeps that size at dimension 1.
        in_shape = _shape(source)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if in_shape is not None and dims is not None:
            dims = dims if isinstance(dims, (tuple, list)) else (dims,)
            reduced = {int(dim) % len(in_shape) for dim in dims}
            if not reduced & {0, 1}:
                self.same_space(node, source)
                return
        space = self.new_space(node)
        self.fix(space, f"reduction over channels at {where}")
        self.fix(self.space_of[source], f"reduction over channels at {where}")

    def visit_getitem(self, node: fx.Node, source: fx.Node, where: str) -> None:
        index = node.args[1]
        items = index if isinstance(index, tuple) else (index,)
        keeps_channels = len(items) < 2 or items[1] == slice(None)
        if items and items[0] != slice(None):
            keeps_channels = False
        if keeps_channels:
            self.same_space(node, source)
            return
        space = self.new_space(node)
        self.fix(space, f"channel indexing at {where}")
        self.fix(self.space_of[source], f"channel indexing at {where}")

    def visit_pad(self, node: fx.Node, source: fx.Node, where: str) -> None:
        padding = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
        in_shape = _shape(source)
        spatial_entries = 2 * (len(in_shape) - 2) if in_shape else 4
        if len(padding) <= spatial_entries:
            self.same_space(node, source)
            return
        space = self.new_space(node)
        self.fix(space, f"channel padding at {where}")
        self.fix(self.space_of[source], f"channel padding at {where}")

    def build(self, input_shape: tuple[int, ...]) -> ChannelGraph:
        for node in self.traced.graph.nodes:
            self.visit(node)

        index_of_root: dict[int, int] = {}
        groups: list[ChannelGroup] = []

        def group_of(space: int) -> ChannelGroup:
            root = self.spaces.find(space)
            if root not in index_of_root:
                index_of_root[root] = len(groups)
                groups.append(ChannelGroup(index=len(groups), channels=self.channels_of_space[root]))
            return groups[index_of_root[root]]

        for space, member in self.members:
            group = group_of(space)
            target = {
                "producer": group.producers,
                "consumer": group.consumers,
                "depthwise": group.depthwise,
                "norm": group.norms,
            }[member.role]
            target.append(member.module)
        for space, reason in self.fixed:
            group = group_of(space)
            if group.fixed_reason is None:
                group.fixed_reason = reason

        layers = [
            LayerCost(name, kind, group_of(in_space).index, group_of(out_space).index, cin, cout, unit)
            for name, kind, in_space, out_space, cin, cout, unit in self.layers
        ]
        blocks = find_residual_blocks(self.traced)
        return ChannelGraph(groups=groups, layers=layers, input_shape=input_shape, blocks=blocks)


def build_channel_graph(net: nn.Module, example_input: torch.Tensor) -> ChannelGraph:
    """Trace ``net`` on ``example_input`` (a batch of one is enough) and group its coupled channels.

    Raises :class:`UnsupportedModelError` naming the first layer or operation that
    channel pruning cannot handle.
    """
    traced = trace(net)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            ShapeProp(traced).propagate(example_input.detach().to("cpu").float().contiguous())
    finally:
        net.train(was_training)
    return _GraphBuilder(traced).build(tuple(example_input.shape))


def find_residual_blocks(traced: fx.GraphModule) -> list[ResidualBlock]:
    """Return the residual additions whose branch can be removed, in the order of the graph.

    For an addition ``a + b`` the fork is the latest node that both operands depend on
    (the block's input). The branch is the operand with more convolutions and linear
    layers between the fork and the addition, and the shortcut has at most one (an
    identity, a padding or a projection). An addition is left out when:

    - its operands share no input, or have equally many such layers, or the shortcut has
      more than one;
    - a node of the branch is used outside the block, or a layer of the branch is called
      more than once;
    - the branch does not end in a layer (a function such as ``F.relu`` ends it);
    - that layer is a pooling or flatten layer, or it is not a convolution or linear
      layer and changes the shape of what it reads. Zeros of its input's shape must be
      able to stand in for it at any resolution.
    """
    nodes = list(traced.graph.nodes)
    order = {node: position for position, node in enumerate(nodes)}
    ancestors: dict[fx.Node, set[fx.Node]] = {}
    for node in nodes:
        ancestors[node] = {node}.union(*(ancestors[source] for source in node.all_input_nodes))
    calls: dict[str, int] = {}
    for node in nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1

    blocks: list[ResidualBlock] = []
    for node in nodes:
        is_add = node.target in ADD_TARGETS or (node.op == "call_method" and node.target in ("add", "add_"))
        operands = [argument for argument in node.args if isinstance(argument, fx.Node)]
        if node.op not in ("call_function", "call_method") or not is_add or len(operands) != 2:
            continue
        block = _residual_block(traced, node, operands, ancestors, order, calls, index=len(blocks))
        if block is not None:
            blocks.append(block)
    return blocks


def _residual_block(
    traced: fx.GraphModule,
    add: fx.Node,
    operands: list[fx.Node],
    ancestors: dict[fx.Node, set[fx.Node]],
    order: dict[fx.Node, int],
    calls: dict[str, int],
    index: int,
) -> ResidualBlock | None:
    common = ancestors[operands[0]] & ancestors[operands[1]]
    if not common:
        return None
    fork = max(common, key=order.__getitem__)
    paths = [ancestors[operand] - ancestors[fork] for operand in operands]

    def weighted_layers(path: set[fx.Node]) -> list[fx.Node]:
        return [
            node
            for node in sorted(path, key=order.__getitem__)
            if node.op == "call_module" and isinstance(traced.get_submodule(str(node.target)), (nn.Conv2d, nn.Linear))
        ]

    layer_counts = [len(weighted_layers(path)) for path in paths]
    branch_side = 0 if layer_counts[0] > layer_counts[1] else 1
    branch, shortcut_layers = paths[branch_side], layer_counts[1 - branch_side]
    output = operands[branch_side]
    if layer_counts[branch_side] <= shortcut_layers or shortcut_layers > 1:
        return None
    if output.op != "call_module" or calls[str(output.target)] != 1:
        return None
    if any(user not in branch and user is not add for node in branch for user in node.users):
        return None
    output_module = traced.get_submodule(str(output.target))
    if isinstance(output_module, SHAPE_CHANGING_MODULES):
        return None
    if not isinstance(output_module, (nn.Conv2d, nn.Linear)):
        sources = [source for source in output.all_input_nodes if _is_tensor(source)]
        if len(sources) != 1 or _shape(sources[0]) != _shape(output):
            return None

    modules = [str(node.target) for node in sorted(branch, key=order.__getitem__) if node.op == "call_module"]
    if any(calls[name] != 1 for name in modules):
        return None
    prefix = _common_prefix(modules)
    layers = weighted_layers(branch)
    return ResidualBlock(
        index=index,
        name=prefix or add.name,
        output=str(output.target),
        modules=modules,
        layers=[str(node.target) for node in layers],
        output_from_last_layer=_reads_through_norms(traced, output, layers[-1]),
    )


def _reads_through_norms(traced: fx.GraphModule, node: fx.Node, source: fx.Node) -> bool:
    """Return whether ``node`` is ``source`` or reads it through BatchNorm and identity layers only."""
    while node is not source:
        if node.op != "call_module" or len(node.all_input_nodes) != 1:
            return False
        if not isinstance(traced.get_submodule(str(node.target)), (_BatchNorm, nn.Identity)):
            return False
        node = node.all_input_nodes[0]
    return True


def _common_prefix(names: list[str]) -> str:
    parts = [name.split(".") for name in names]
    prefix: list[str] = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        prefix.append(pieces[0])
    # A prefix that is itself one of the layers (a branch of one layer) names that layer, not a block.
    return ".".join(prefix) if ".".join(prefix) not in names else ".".join(prefix[:-1])


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _channels(node: fx.Node) -> int:
    shape = _shape(node)
    if shape is None or len(shape) < 2:
        return 1
    return int(shape[1])


def _spatial_size(node: fx.Node) -> int:
    shape = _shape(node)
    size = 1
    for extent in shape[2:]:
        size *= int(extent)
    return size


def _tensor_args(arguments, space_of: dict[fx.Node, int]) -> list[fx.Node]:
    found: list[fx.Node] = []

    def collect(value) -> None:
        if isinstance(value, fx.Node):
            if value in space_of:
                found.append(value)
        elif isinstance(value, (tuple, list)):
            for item in value:
                collect(item)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)

    collect(arguments)
    return found


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _check_children(name: str, module: nn.Module) -> None:
    # timm's BatchNormAct2d runs dropout and an activation inside the BatchNorm, and they
    # must keep channels one-to-one like any other activation.
    for child_name, child in module.named_children():
        if not isinstance(child, CHANNELWISE_MODULES):
            raise UnsupportedModelError(
                f"cannot prune through layer {name!r} ({type(module).__name__}): its part {child_name!r} "
                f"({type(child).__name__}) is not an element-wise activation"
            )


def _target_name(target) -> str:
    if isinstance(target, str):
        return f"method {target}"
    return getattr(target, "__name__", str(target))
