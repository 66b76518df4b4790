"""Channel pruning: gates, the polarization regularizer, FLOPs from gates, extraction and saving.

Typical use, around any network built from convolutions, BatchNorm, activations,
pooling and residual additions::

    graph = build_channel_graph(net, torch.zeros(1, 3, 32, 32))
    gates = ChannelGates(graph)
    gates.attach(net)                     # train net and gates together ...
    masks = gates.keep_masks()
    gates.detach_from(net)
    extract_subnetwork(net, graph, masks)  # net is now physically smaller
    # With ChannelGates(graph, blocks=True), closed residual branches go too:
    remove_residual_branches(net, graph, gates.removed_blocks())
    save_pruned("pruned.pt", net)
    net = load_pruned("pruned.pt")
"""

from pruning.blocks import branch_parameters, remove_residual_branches
from pruning.checkpoint import load_pruned, resize_to_state_dict, save_pruned
from pruning.extract import Extraction, extract_subnetwork, remap_optimizer_state
from pruning.gates import (
    ChannelGates,
    binary_gate,
    block_costs,
    channel_costs,
    dense_macs,
    fit_masks_to_budget,
    macs_from_counts,
    polarization_gradient_on_open,
    polarization_regularizer,
    reopen_blocks_to_budget,
    round_kept_channels,
)
from pruning.graph import ChannelGraph, ChannelGroup, ResidualBlock, UnsupportedModelError, build_channel_graph
from pruning.l1 import l1_norm_keep_masks
from pruning.report import channel_table, format_channel_table

__all__ = [
    "ChannelGates",
    "ChannelGraph",
    "ChannelGroup",
    "Extraction",
    "ResidualBlock",
    "UnsupportedModelError",
    "binary_gate",
    "block_costs",
    "branch_parameters",
    "build_channel_graph",
    "channel_costs",
    "channel_table",
    "dense_macs",
    "extract_subnetwork",
    "fit_masks_to_budget",
    "format_channel_table",
    "l1_norm_keep_masks",
    "load_pruned",
    "macs_from_counts",
    "polarization_gradient_on_open",
    "polarization_regularizer",
    "remap_optimizer_state",
    "remove_residual_branches",
    "reopen_blocks_to_budget",
    "resize_to_state_dict",
    "round_kept_channels",
    "save_pruned",
]
