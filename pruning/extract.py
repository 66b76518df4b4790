"""Physical removal of closed channels, and the optimizer state that goes with it."""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from pruning.graph import ChannelGraph


@dataclass
class Extraction:
    """Record of the parameters that :func:`extract_subnetwork` replaced.

    ``replaced`` maps each old parameter to its new, smaller parameter and the indices
    kept along each dimension (None where the dimension is unchanged), so optimizer
    state can be sliced the same way.
    """

    replaced: dict[nn.Parameter, tuple[nn.Parameter, tuple[torch.Tensor | None, ...]]] = field(default_factory=dict)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)


def kept_indices(graph: ChannelGraph, keep_masks: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Return the indices of the kept channels of every prunable group (at least one per group)."""
    indices: dict[int, torch.Tensor] = {}
    for group in graph.prunable_groups:
        mask = keep_masks.get(group.index)
        if mask is None:
            continue
        mask = torch.as_tensor(mask, dtype=torch.bool).flatten()
        if mask.numel() != group.channels:
            raise ValueError(
                f"keep mask of group {group.index} ({group.name}) has {mask.numel()} entries, expected {group.channels}"
            )
        index = torch.nonzero(mask).flatten()
        indices[group.index] = index if index.numel() else torch.zeros(1, dtype=torch.long)
    return indices


@torch.no_grad()
def extract_subnetwork(net: nn.Module, graph: ChannelGraph, keep_masks: dict[int, torch.Tensor]) -> Extraction:
    """Remove the closed channels of ``net`` in place; return what was replaced.

    For each prunable group, the kept channels are the ``True`` entries of its mask. The
    output channels of producers, the channels of BatchNorm layers (with their running
    statistics) and depthwise convolutions, and the input channels of consumers are
    sliced. A group with no channel kept keeps one channel, which its consumers read with
    zero weights, so the network keeps its structure and computes what the gated one did.
    ``net`` must have no gating hooks attached (see :meth:`ChannelGates.detach_from`).
    """
    indices = kept_indices(graph, keep_masks)
    out_index: dict[str, torch.Tensor] = {}
    in_index: dict[str, torch.Tensor] = {}
    fully_closed_consumers: list[str] = []

    for group in graph.prunable_groups:
        if group.index not in indices:
            continue
        index = indices[group.index]
        if index.numel() == group.channels:
            continue
        for name in group.producers + group.norms + group.depthwise:
            out_index[name] = index
        for name in group.consumers:
            in_index[name] = index
        if not bool(torch.as_tensor(keep_masks[group.index]).any()):
            fully_closed_consumers += group.consumers

    extraction = Extraction(kept=indices)
    for name in sorted(set(out_index) | set(in_index)):
        module = net.get_submodule(name)
        rows, columns = out_index.get(name), in_index.get(name)
        if isinstance(module, nn.Conv2d):
            _slice_conv(module, rows, columns, extraction)
        elif isinstance(module, nn.Linear):
            _slice_linear(module, rows, columns, extraction)
        elif isinstance(module, _BatchNorm):
            _slice_norm(module, rows, extraction)
        else:
            raise TypeError(f"cannot slice layer {name!r} of type {type(module).__name__}")

    # A consumer reads a single group, so all of its input channels are the one kept channel.
    for name in fully_closed_consumers:
        net.get_submodule(name).weight.zero_()
    return extraction


def _replace(
    module: nn.Module, attribute: str, indices: tuple[torch.Tensor | None, ...], extraction: Extraction
) -> None:
    old = getattr(module, attribute)
    if old is None:
        return
    new_value = old.detach()
    for dimension, index in enumerate(indices):
        if index is not None:
            new_value = new_value.index_select(dimension, index.to(new_value.device))
    new_value = new_value.clone()
    if isinstance(old, nn.Parameter):
        parameter = nn.Parameter(new_value, requires_grad=old.requires_grad)
        setattr(module, attribute, parameter)
        extraction.replaced[old] = (parameter, indices)
    else:
        setattr(module, attribute, new_value)


def _slice_conv(
    conv: nn.Conv2d, rows: torch.Tensor | None, columns: torch.Tensor | None, extraction: Extraction
) -> None:
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    if depthwise:
        _replace(conv, "weight", (rows,), extraction)
        _replace(conv, "bias", (rows,), extraction)
        conv.out_channels = conv.in_channels = conv.groups = conv.weight.shape[0]
        return
    if conv.groups != 1:
        raise TypeError(f"cannot slice grouped convolution with groups={conv.groups}")
    _replace(conv, "weight", (rows, columns), extraction)
    _replace(conv, "bias", (rows,), extraction)
    conv.out_channels, conv.in_channels = conv.weight.shape[0], conv.weight.shape[1]


def _slice_linear(
    linear: nn.Linear, rows: torch.Tensor | None, columns: torch.Tensor | None, extraction: Extraction
) -> None:
    _replace(linear, "weight", (rows, columns), extraction)
    _replace(linear, "bias", (rows,), extraction)
    linear.out_features, linear.in_features = linear.weight.shape


def _slice_norm(norm: _BatchNorm, rows: torch.Tensor | None, extraction: Extraction) -> None:
    for attribute in ("weight", "bias", "running_mean", "running_var"):
        _replace(norm, attribute, (rows,), extraction)
    norm.num_features = int(norm.running_mean.shape[0] if norm.running_mean is not None else norm.weight.shape[0])


@torch.no_grad()
def remap_optimizer_state(
    optimizer: torch.optim.Optimizer, extraction: Extraction, removed: set[nn.Parameter] | None = None
) -> None:
    """Point ``optimizer`` at the extracted parameters and slice their state (momentum, Adam moments).

    Parameters in ``removed`` (such as gate scores) leave their param group, which may
    become empty. State tensors shaped like their parameter are sliced with the same
    indices; others (Adam's step count) are kept as they are. Param groups keep their
    order and hyperparameters, so a learning-rate scheduler on ``optimizer`` stays valid.
    """
    removed = removed or set()
    for group in optimizer.param_groups:
        new_params = []
        for parameter in group["params"]:
            if parameter in removed:
                optimizer.state.pop(parameter, None)
                continue
            if parameter not in extraction.replaced:
                new_params.append(parameter)
                continue
            new_parameter, indices = extraction.replaced[parameter]
            state = optimizer.state.pop(parameter, None)
            if state:
                optimizer.state[new_parameter] = {
                    key: _slice_like(value, parameter, indices) for key, value in state.items()
                }
            new_params.append(new_parameter)
        group["params"] = new_params


def _slice_like(value, parameter: torch.Tensor, indices: tuple[torch.Tensor | None, ...]):
    if not isinstance(value, torch.Tensor) or value.shape != parameter.shape:
        return value
    sliced = value
    for dimension, index in enumerate(indices):
        if index is not None:
            sliced = sliced.index_select(dimension, index.to(sliced.device))
    return sliced.clone()
