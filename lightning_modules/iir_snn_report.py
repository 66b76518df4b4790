"""The IIR-SNN stage table and plots, built from the stage summaries in the pipeline's state file."""

from pathlib import Path
from typing import Any

# Figure without pyplot draws on Agg, so no display or global backend is involved.
from matplotlib.figure import Figure

SPIKE_RATE_PREFIX = "snn/spike_rate/"


def stage_table_rows(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Return one row per stage, in stage order: T, test accuracy, spike rates, energy and the ANN/SNN ratio.

    ``summaries`` maps stage names to the summaries the stages recorded. The ``ann`` row
    has no T or spike rate, and its energy is the ANN's, so its ratio is 1. Energies are
    estimates per inference in microjoules.
    """
    rows = []
    for name, summary in summaries.items():
        accuracy = summary.get("test/acc")
        if name == "ann":
            rows.append(
                {
                    "stage": name,
                    "timesteps": None,
                    "accuracy": accuracy,
                    "spike_rate": None,
                    "spike_rates": {},
                    "energy_uj": summary["ann/energy_pj"] / 1e6,
                    "energy_ratio": 1.0,
                    "macs_per_image": summary["ann/macs_per_image"],
                    "accumulates_per_image": 0.0,
                }
            )
            continue
        rows.append(
            {
                "stage": name,
                "timesteps": summary["snn/timesteps"],
                "accuracy": accuracy,
                "spike_rate": summary["snn/spike_rate"],
                "spike_rates": {
                    key.removeprefix(SPIKE_RATE_PREFIX): value
                    for key, value in summary.items()
                    if key.startswith(SPIKE_RATE_PREFIX)
                },
                "energy_uj": summary["snn/energy_pj"] / 1e6,
                "energy_ratio": summary["snn/energy_ratio"],
                "macs_per_image": summary["snn/macs_per_image"],
                "accumulates_per_image": summary["snn/accumulates_per_image"],
            }
        )
    return rows


def format_stage_table(rows: list[dict[str, Any]], constants: str) -> str:
    """Return the stage table as aligned text, with the energy constants under it."""
    header = f"{'stage':<8} {'T':>3} {'accuracy':>9} {'spike rate':>11} {'energy (uJ)':>12} {'ANN/SNN':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        timesteps = "-" if row["timesteps"] is None else str(row["timesteps"])
        accuracy = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f} %"
        spike_rate = "-" if row["spike_rate"] is None else f"{row['spike_rate']:.4f}"
        lines.append(
            f"{row['stage']:<8} {timesteps:>3} {accuracy:>9} {spike_rate:>11} "
            f"{row['energy_uj']:>12.4g} {row['energy_ratio']:>7.3g}x"
        )
    lines.append(f"energy: estimated compute energy per inference ({constants})")
    lines.append("spike rate: spikes per neuron per timestep, over all neuron layers")
    lines.append("ANN/SNN: the ANN's estimated energy divided by the stage's (higher is cheaper)")
    return "\n".join(lines)


def plot_spike_rates(rows: list[dict[str, Any]], path: Path) -> Path:
    """Plot the spike rate of each neuron layer, one line per spiking stage, and save it as PNG at ``path``."""
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    for row in rows:
        if not row["spike_rates"]:
            continue
        layers = list(row["spike_rates"])
        axes.plot(range(len(layers)), list(row["spike_rates"].values()), marker="o", label=_stage_label(row))
        axes.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
    axes.set_xlabel("neuron layer")
    axes.set_ylabel("spikes per neuron per timestep")
    axes.set_title("IIR-SNN spike rate per layer")
    axes.legend()
    return _save(figure, path)


def plot_accuracy_and_energy(rows: list[dict[str, Any]], path: Path) -> Path:
    """Plot test accuracy and estimated energy against T for the trained stages, with the ANN as a line."""
    trained = [row for row in rows if row["stage"] not in ("ann", "convert")]
    ann = next((row for row in rows if row["stage"] == "ann"), None)
    timesteps = [row["timesteps"] for row in trained]

    figure = Figure(figsize=(10, 4))
    accuracy_axes, energy_axes = figure.subplots(1, 2)
    accuracy_axes.plot(timesteps, [100 * (row["accuracy"] or 0.0) for row in trained], marker="o", label="SNN")
    energy_axes.plot(timesteps, [row["energy_uj"] for row in trained], marker="o", label="SNN")
    if ann is not None:
        if ann["accuracy"] is not None:
            accuracy_axes.axhline(100 * ann["accuracy"], color="gray", linestyle="--", label="ANN")
        energy_axes.axhline(ann["energy_uj"], color="gray", linestyle="--", label="ANN")
    for axes in (accuracy_axes, energy_axes):
        axes.set_xticks(timesteps)
        axes.set_xlabel("timesteps T")
        axes.invert_xaxis()  # The stages run from high T to low T.
        axes.legend()
    accuracy_axes.set_ylabel("test accuracy (%)")
    energy_axes.set_ylabel("estimated energy per inference (uJ)")
    figure.suptitle("IIR-SNN: accuracy and energy against timesteps")
    return _save(figure, path)


def _stage_label(row: dict[str, Any]) -> str:
    return f"{row['stage']} (T={row['timesteps']})" if row["stage"] == "convert" else row["stage"]


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path
