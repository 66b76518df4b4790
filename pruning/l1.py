"""L1-norm filter pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017), as a baseline.

One-shot: every prunable group keeps the same fraction of its channels, those whose
producer filters have the largest L1 norm, and the fraction is found by bisection so
that the network meets a FLOPs budget. Li et al. also chose per-layer ratios from a
sensitivity analysis; this baseline uses one ratio for every group.
"""

import math

import torch
import torch.nn as nn

from pruning.gates import dense_macs, macs_from_counts
from pruning.graph import ChannelGraph


def filter_norms(net: nn.Module, graph: ChannelGraph) -> dict[int, torch.Tensor]:
    """Return, per prunable group, the summed L1 norm of each channel's filters over the group's producers.

    Norms of each producer are divided by their mean first, so that coupled layers of
    different sizes count equally.
    """
    norms: dict[int, torch.Tensor] = {}
    for group in graph.prunable_groups:
        total = torch.zeros(group.channels)
        for name in group.producers + group.depthwise:
            weight = net.get_submodule(name).weight.detach().float().cpu()
            norm = weight.abs().flatten(1).sum(dim=1)
            total += norm / norm.mean().clamp(min=1e-12)
        norms[group.index] = total
    return norms


def l1_norm_keep_masks(net: nn.Module, graph: ChannelGraph, flops_reduction: float) -> dict[int, torch.Tensor]:
    """Return keep masks that remove the smallest-norm filters until MACs drop by ``flops_reduction`` (in [0, 1))."""
    if not 0.0 <= flops_reduction < 1.0:
        raise ValueError(f"flops_reduction must be in [0, 1), got {flops_reduction}")
    norms = filter_norms(net, graph)
    budget = (1.0 - flops_reduction) * dense_macs(graph)

    def masks_for(keep_fraction: float) -> dict[int, torch.Tensor]:
        masks = {}
        for index, norm in norms.items():
            kept = max(1, math.ceil(keep_fraction * norm.numel()))
            mask = torch.zeros(norm.numel(), dtype=torch.bool)
            mask[torch.argsort(norm, descending=True)[:kept]] = True
            masks[index] = mask
        return masks

    def macs_for(keep_fraction: float) -> float:
        masks = masks_for(keep_fraction)
        return float(macs_from_counts(graph, {index: float(mask.sum()) for index, mask in masks.items()}))

    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        if macs_for(middle) <= budget:
            low = middle
        else:
            high = middle
    return masks_for(low)
