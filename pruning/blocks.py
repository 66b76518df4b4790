"""Removal of whole residual branches (layer pruning), and the stand-ins that replace their layers.

A removed block still runs its own ``forward``, which adds the branch to the shortcut,
so its layers cannot simply disappear. Each convolution and linear layer of the branch
becomes a stand-in that returns zeros without computing anything: the last one at the
layer's full output shape, the ones before it with one channel. Each BatchNorm (and any
other layer with weights) becomes an identity. Unless the branch ends in its last
convolution (through BatchNorm and identity layers only), the layer that ends it returns
zeros too. So the block passes its shortcut alone. What remains of a removed block costs
no multiply-accumulate: one full-size zero tensor, the one-channel ones before it, the
element-wise activations between them, and the addition.

A saved pruned network records its stand-ins by name (:func:`removed_layers_of`), so
that loading puts the same ones into the dense model before its weights load
(:func:`replace_layers`).
"""

from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from pruning.graph import ChannelGraph, ResidualBlock


class RemovedConv2d(nn.Module):
    """Stand-in for a convolution of a removed branch: it returns zeros of the convolution's output shape."""

    def __init__(
        self,
        out_channels: int,
        kernel_size: tuple[int, ...],
        stride: tuple[int, ...],
        padding: tuple[int, ...] | str,
        dilation: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)

    @classmethod
    def replacing(cls, conv: nn.Conv2d, out_channels: int) -> "RemovedConv2d":
        return cls(out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation)

    def output_size(self, size: int, dimension: int) -> int:
        """Return the convolution's output extent along spatial ``dimension`` (0 or 1) for an input ``size``."""
        if self.padding == "same":
            return size
        padding = 0 if self.padding == "valid" else self.padding[dimension]
        span = self.dilation[dimension] * (self.kernel_size[dimension] - 1) + 1
        return (size + 2 * padding - span) // self.stride[dimension] + 1

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        height, width = features.shape[-2:]
        shape = (features.shape[0], self.out_channels, self.output_size(height, 0), self.output_size(width, 1))
        return features.new_zeros(shape).contiguous(memory_format=_memory_format(features))

    def extra_repr(self) -> str:
        return f"zeros of {self.out_channels} channels, kernel_size={self.kernel_size}, stride={self.stride}"


class RemovedLinear(nn.Module):
    """Stand-in for a linear layer of a removed branch: it returns zeros of shape ``(*batch, out_features)``."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.new_zeros((*features.shape[:-1], self.out_features))

    def extra_repr(self) -> str:
        return f"zeros of {self.out_features} features"


class RemovedNorm(nn.Identity):
    """Stand-in for a BatchNorm (or another layer with weights) inside a removed branch: the identity."""


class ZerosLike(nn.Module):
    """Last layer of a removed branch: zeros shaped like its input, whatever the replaced layer did."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(features)


def remove_residual_branches(net: nn.Module, graph: ChannelGraph, removed: set[int]) -> dict[str, dict[str, Any]]:
    """Replace the layers of the branches in ``removed`` (block indices of ``graph``) in place.

    Call it after :func:`pruning.extract_subnetwork`, so that the stand-ins produce the
    extracted widths. Only the last layer's zeros reach the addition, so the stand-ins
    before it return one channel, which saves a full-size tensor each. A network that
    does not run that way (a layer of the branch that needs its input's width) gets
    full-width stand-ins. Returns the replaced layers by name, as :func:`replace_layers`
    takes them (plain values, safe for ``torch.load(weights_only=True)``).
    """
    if not removed:
        return {}
    full = _stand_ins(net, graph, removed, thin=False)
    thin = _stand_ins(net, graph, removed, thin=True)
    replace_layers(net, thin)
    if _runs(net, graph.input_shape):
        return thin
    replace_layers(net, full)
    return full


def _stand_ins(net: nn.Module, graph: ChannelGraph, removed: set[int], thin: bool) -> dict[str, dict[str, Any]]:
    record: dict[str, dict[str, Any]] = {}
    removed_blocks = [block for block in graph.blocks if block.index in removed]
    # With nested blocks the inner block's last layer is also inside the outer branch.
    outputs = {block.output for block in removed_blocks}
    last_layers = {block.layers[-1] for block in removed_blocks}
    for block in removed_blocks:
        # An addition inside a nested branch may need its operands' full width.
        thin_block = thin and not _contains_other_block(block, graph)
        for name in block.modules:
            module = net.get_submodule(name)
            full_width = name in last_layers or not thin_block
            if isinstance(module, (nn.Conv2d, RemovedConv2d)):
                record[name] = {"kind": "conv2d", "out_channels": module.out_channels if full_width else 1}
            elif isinstance(module, (nn.Linear, RemovedLinear)):
                record[name] = {"kind": "linear", "out_features": module.out_features if full_width else 1}
            elif name in outputs and not block.output_from_last_layer:
                record[name] = {"kind": "zeros_like"}
            elif isinstance(module, (_BatchNorm, RemovedNorm)) or any(True for _ in module.parameters(recurse=False)):
                record[name] = {"kind": "identity"}
    return record


def _contains_other_block(block: ResidualBlock, graph: ChannelGraph) -> bool:
    return any(other is not block and set(other.modules) <= set(block.modules) for other in graph.blocks)


@torch.no_grad()
def _runs(net: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Return whether ``net`` runs on zeros of ``input_shape`` in eval mode (the mode is restored)."""
    tensors = [*net.parameters(), *net.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    was_training = net.training
    net.eval()
    try:
        net(torch.zeros(input_shape, device=device))
    except RuntimeError:
        return False
    finally:
        net.train(was_training)
    return True


def branch_parameters(net: nn.Module, graph: ChannelGraph, removed: set[int]) -> set[nn.Parameter]:
    """Return the parameters of the branches in ``removed``, to drop from the optimizers.

    Collect them before extraction: optimizers hold the parameters of the dense network.
    """
    return {
        parameter
        for block in graph.blocks
        if block.index in removed
        for name in block.modules
        for parameter in net.get_submodule(name).parameters()
    }


def replace_layers(net: nn.Module, record: dict[str, dict[str, Any]]) -> None:
    """Put the stand-ins named in ``record`` (from :func:`remove_residual_branches`) into ``net``."""
    for name, entry in record.items():
        module = net.get_submodule(name)
        kind = entry["kind"]
        if kind == "conv2d":
            replacement: nn.Module = RemovedConv2d.replacing(module, int(entry["out_channels"]))
        elif kind == "linear":
            replacement = RemovedLinear(int(entry["out_features"]))
        elif kind == "zeros_like":
            replacement = ZerosLike()
        elif kind == "identity":
            replacement = RemovedNorm()
        else:
            raise ValueError(
                f"invalid kind {kind!r} of removed layer {name!r}: expected conv2d, linear, zeros_like or identity; "
                "a file written by a newer leanlight needs that version to load"
            )
        net.set_submodule(name, replacement)


def removed_layers_of(net: nn.Module) -> dict[str, dict[str, Any]]:
    """Return the stand-ins in ``net`` by name, in the form :func:`replace_layers` takes."""
    record: dict[str, dict[str, Any]] = {}
    for name, module in net.named_modules():
        if isinstance(module, RemovedConv2d):
            record[name] = {"kind": "conv2d", "out_channels": module.out_channels}
        elif isinstance(module, RemovedLinear):
            record[name] = {"kind": "linear", "out_features": module.out_features}
        elif isinstance(module, ZerosLike):
            record[name] = {"kind": "zeros_like"}
        elif isinstance(module, RemovedNorm):
            record[name] = {"kind": "identity"}
    return record


def _memory_format(features: torch.Tensor) -> torch.memory_format:
    if features.ndim == 4 and features.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
