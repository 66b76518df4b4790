"""Pruning reports: a table of kept channels per layer, and plots of gate scores and kept channels."""

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pruning.graph import ChannelGraph


@dataclass(frozen=True)
class LayerRow:
    """One convolution or linear layer before and after pruning; MACs are per sample."""

    layer: str
    kind: str
    in_kept: int
    in_total: int
    out_kept: int
    out_total: int
    macs_dense: float
    macs_pruned: float


def channel_table(
    graph: ChannelGraph, keep_masks: dict[int, torch.Tensor], removed_blocks: set[int] | None = None
) -> list[LayerRow]:
    """Return one row per convolution and linear layer with its kept and total input and output channels.

    A layer of a removed residual branch (``removed_blocks``) is of kind ``removed``, with
    no channel kept and no MACs.
    """
    removed_layers = {name for block in graph.blocks if block.index in (removed_blocks or ()) for name in block.layers}
    kept = {group.index: group.channels for group in graph.groups}
    for index, mask in keep_masks.items():
        kept[index] = max(1, int(torch.as_tensor(mask).sum()))
    total = {group.index: group.channels for group in graph.groups}
    rows = []
    for layer in graph.layers:
        if layer.kind == "depthwise":
            dense = total[layer.out_group] * layer.unit_macs
            pruned = kept[layer.out_group] * layer.unit_macs
        else:
            dense = total[layer.in_group] * total[layer.out_group] * layer.unit_macs
            pruned = kept[layer.in_group] * kept[layer.out_group] * layer.unit_macs
        removed = layer.name in removed_layers
        rows.append(
            LayerRow(
                layer=layer.name,
                kind="removed" if removed else layer.kind,
                in_kept=0 if removed else kept[layer.in_group],
                in_total=total[layer.in_group],
                out_kept=0 if removed else kept[layer.out_group],
                out_total=total[layer.out_group],
                macs_dense=dense,
                macs_pruned=0.0 if removed else pruned,
            )
        )
    return rows


def format_channel_table(rows: list[LayerRow]) -> str:
    """Render the rows as an aligned text table with a total line."""
    width = max([len(row.layer) for row in rows] + [5])
    header = f"{'kind':<9}  {'in kept/total':>13}  {'out kept/total':>14}  {'MACs dense':>11}  {'MACs pruned':>11}"
    lines = [f"{'layer':<{width}}  {header}"]
    for row in rows:
        lines.append(
            f"{row.layer:<{width}}  {row.kind:<9}  {f'{row.in_kept}/{row.in_total}':>13}  "
            f"{f'{row.out_kept}/{row.out_total}':>14}  {row.macs_dense:>11,.0f}  {row.macs_pruned:>11,.0f}"
        )
    dense = sum(row.macs_dense for row in rows)
    pruned = sum(row.macs_pruned for row in rows)
    reduction = 1.0 - pruned / dense if dense else 0.0
    blank = " " * (9 + 2 + 13 + 2 + 14)
    lines.append(f"{'total':<{width}}  {blank}  {dense:>11,.0f}  {pruned:>11,.0f}  ({100 * reduction:.1f}% fewer MACs)")
    return "\n".join(lines)


def save_channel_table(rows: list[LayerRow], path: Path) -> None:
    """Write the rows as CSV."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        fields = ["layer", "kind", "in_kept", "in_total", "out_kept", "out_total", "macs_dense", "macs_pruned"]
        writer.writerow(fields)
        for row in rows:
            writer.writerow([getattr(row, name) for name in fields])


def plot_gate_histograms(history: list[tuple[int, np.ndarray]], path: Path) -> Path:
    """Plot the gate-score distribution at each recorded epoch as a heat map and a few histograms; save PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = np.linspace(0.0, 1.0, 41)
    epochs = [epoch for epoch, _ in history]
    counts = np.stack([np.histogram(np.clip(scores, 0, 1), bins=bins)[0] for _, scores in history])

    figure, (heat_axis, line_axis) = plt.subplots(1, 2, figsize=(11, 4))
    image = heat_axis.imshow(
        np.log1p(counts).T, origin="lower", aspect="auto", extent=(epochs[0] - 0.5, epochs[-1] + 0.5, 0.0, 1.0)
    )
    heat_axis.axhline(0.5, color="white", linestyle="--", linewidth=0.8)
    heat_axis.set_xlabel("epoch")
    heat_axis.set_ylabel("gate score")
    heat_axis.set_title("gate scores over training (log(1 + count))")
    figure.colorbar(image, ax=heat_axis)

    shown = sorted({0, len(history) // 2, len(history) - 1})
    centers = (bins[:-1] + bins[1:]) / 2
    for position in shown:
        line_axis.step(centers, counts[position], where="mid", label=f"epoch {epochs[position]}")
    line_axis.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
    # symlog keeps empty bins drawable (log would drop zeros); counts are never negative.
    line_axis.set_yscale("symlog", linthresh=1.0)
    line_axis.set_ylim(bottom=0.0)
    line_axis.set_xlabel("gate score")
    line_axis.set_ylabel("gates")
    line_axis.set_title("gate-score histograms")
    line_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_kept_channels(rows: list[LayerRow], path: Path) -> Path:
    """Plot kept and total output channels of every layer as bars, layers of removed blocks hatched; save PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = np.arange(len(rows))
    removed = [row.kind == "removed" for row in rows]
    figure, axis = plt.subplots(figsize=(max(6, 0.3 * len(rows) + 2), 4))
    axis.bar(positions, [row.out_total for row in rows], color="lightgrey", label="total")
    axis.bar(positions, [row.out_kept for row in rows], color="tab:blue", label="kept")
    if any(removed):
        axis.bar(
            positions[removed],
            [row.out_total for row, gone in zip(rows, removed, strict=True) if gone],
            color="none",
            edgecolor="tab:red",
            hatch="//",
            label="removed block",
        )
    axis.set_xticks(positions)
    axis.set_xticklabels([row.layer for row in rows], rotation=90, fontsize=7)
    axis.set_ylabel("output channels")
    axis.set_title("kept output channels per layer")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
