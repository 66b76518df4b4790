"""Turn a set of runs into one report: a table per technique, and accuracy against FLOPs and energy.

Runs come from local run folders (every ``summary.json`` under the given paths, except a
pipeline's own, since each of its stages has one) or,
with ``--wandb entity/project``, from W&B's public API (which needs ``wandb login``
and the network). The report folder gets:

- ``report.md``: one table per technique (dense training, polarization pruning, ...),
  rows sorted by MACs per sample;
- ``runs.csv``: every run, one row each;
- ``accuracy_vs_flops.png`` and ``accuracy_vs_energy.png``: test accuracy against
  FLOPs and estimated energy per inference, one colour per technique.

    python scripts/report.py logs/ --output reports/cifar10
    python scripts/report.py --wandb my-team/leanlight --output reports/wandb
"""

import argparse
import csv
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Labels of the LightningModules and pipelines a run summary names; others keep their class name.
TECHNIQUES = {
    "ClassifierModule": "dense",
    "PolarizationModule": "polarization pruning",
    "IIRSNNPipeline": "IIR-SNN",
    "SlimFlowPipeline": "SlimFlow",
    "DDPMModule": "diffusion (DDPM)",
    "OMSModule": "One More Step",
}

# Technique-specific summary keys shown as extra columns: key -> (column, format).
EXTRA_COLUMNS = {
    "pruning_flops_reduction": ("FLOPs reduction", "{:.1%}"),
    "pruning_flops_reduction_target": ("target", "{:.0%}"),
    "pruning_params_reduction": ("params reduction", "{:.1%}"),
}


@dataclass
class RunRecord:
    """The figures of one run that a report compares."""

    technique: str
    run: str
    task_name: str | None = None
    stage: str | None = None
    model: str | None = None
    data: str | None = None
    group: str | None = None
    test_acc: float | None = None
    params: int | None = None
    macs_per_sample: float | None = None
    energy_uj: float | None = None
    wall_time_s: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def record_from_summary(summary: dict[str, Any], run: str) -> RunRecord:
    """Build a record from the contents of a run's ``summary.json`` (or a W&B run's summary, keys alike)."""
    module = summary.get("module")
    return RunRecord(
        technique=TECHNIQUES.get(module, module or "unknown"),
        run=run,
        task_name=summary.get("task_name"),
        stage=summary.get("stage"),
        model=summary.get("model"),
        data=summary.get("data"),
        group=summary.get("group"),
        test_acc=summary.get("test/acc"),
        params=summary.get("params"),
        macs_per_sample=summary.get("macs_per_sample"),
        energy_uj=summary.get("estimated_inference_energy_uj"),
        wall_time_s=summary.get("wall_time_s"),
        extra={key: summary[key] for key in EXTRA_COLUMNS if isinstance(summary.get(key), (int, float))},
    )


def records_from_folders(paths: list[Path]) -> list[RunRecord]:
    """Read every ``summary.json`` under ``paths`` (files or folders, searched recursively)."""
    records = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"run folder not found: {path}; give run folders or the folder above them")
        files = [path] if path.is_file() else sorted(path.rglob("summary.json"))
        for file in files:
            try:
                summary = json.loads(file.read_text())
            except json.JSONDecodeError as error:
                print(f"skipped {file}: not valid JSON ({error})", file=sys.stderr)
                continue
            if "pipeline_dir" in summary:
                # A pipeline's overview repeats its last stage, whose own summary is a row already.
                continue
            records.append(record_from_summary(summary, str(file.parent)))
    return records


def records_from_wandb(project: str) -> list[RunRecord]:
    """Read the finished runs of a W&B project (``entity/project``) through the public API.

    A run logs its summary under ``summary/<key>`` and its config with the module's
    ``_target_``, so the records match those of local folders.
    NOTE: this path needs the network and a W&B login, so the tests do not run it.
    """
    import wandb

    records = []
    for run in wandb.Api().runs(project, filters={"state": "finished"}):
        summary = {key.removeprefix("summary/"): value for key, value in run.summary.items()}
        config = run.config
        target = str(config.get("module", {}).get("_target_", ""))
        summary.setdefault("module", target.rsplit(".", 1)[-1] or None)
        summary.setdefault("model", config.get("model", {}).get("name"))
        summary.setdefault("task_name", config.get("task_name"))
        summary.setdefault("group", run.group)
        records.append(record_from_summary(summary, run.url))
    return records


def format_tables(records: list[RunRecord]) -> str:
    """Return Markdown: one table per technique, rows sorted by MACs per sample."""
    sections = []
    for technique in sorted({record.technique for record in records}):
        rows = sorted(
            (record for record in records if record.technique == technique),
            key=lambda record: (record.macs_per_sample is None, record.macs_per_sample or 0.0),
        )
        extra_keys = [key for key in EXTRA_COLUMNS if any(key in record.extra for record in rows)]
        has_stages = any(record.stage for record in rows)
        header = ["task", *(["stage"] if has_stages else []), "model", "data", "test top-1", "params", "MACs/sample"]
        header += ["energy/inference", "wall time", *(EXTRA_COLUMNS[key][0] for key in extra_keys), "run"]
        lines = [f"## {technique}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for record in rows:
            cells = [
                record.task_name or "",
                *([record.stage or ""] if has_stages else []),
                record.model or "",
                (record.data or "").removesuffix("DataModule"),
                _format(record.test_acc, "{:.2%}"),
                _format(record.params, "{:,}"),
                _format(None if record.macs_per_sample is None else record.macs_per_sample / 1e6, "{:.3f} M"),
                _format(record.energy_uj, "{:.4g} uJ"),
                _format(record.wall_time_s, "{:.0f} s"),
            ]
            cells += [_format(record.extra.get(key), EXTRA_COLUMNS[key][1]) for key in extra_keys]
            cells.append(f"`{record.run}`")
            lines.append("| " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def plot_accuracy_against(records: list[RunRecord], cost: str, path: Path) -> Path | None:
    """Scatter test accuracy against ``cost`` (``"flops"`` or ``"energy"``), one colour per technique; save PNG.

    Returns ``None`` (and writes nothing) when no run has both figures.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def cost_of(record: RunRecord) -> float | None:
        if cost == "flops":
            return None if record.macs_per_sample is None else 2 * record.macs_per_sample
        return record.energy_uj

    points = [record for record in records if record.test_acc is not None and cost_of(record) is not None]
    if not points:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for technique in sorted({record.technique for record in points}):
        group = [record for record in points if record.technique == technique]
        costs = [cost_of(record) for record in group]
        axis.scatter(costs, [100 * record.test_acc for record in group], label=technique)
    axis.set_xscale("log")
    axis.set_xlabel("FLOPs per sample" if cost == "flops" else "estimated energy per inference (uJ)")
    axis.set_ylabel("test accuracy, top-1 (%)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_report(records: list[RunRecord], output: Path) -> list[Path]:
    """Write ``report.md``, ``runs.csv`` and the plots to ``output``; return the files written."""
    output.mkdir(parents=True, exist_ok=True)
    written = [output / "report.md", output / "runs.csv"]
    (output / "report.md").write_text("# leanlight report\n\n" + format_tables(records))
    with (output / "runs.csv").open("w", newline="") as file:
        columns = [name for name in RunRecord.__dataclass_fields__ if name != "extra"] + list(EXTRA_COLUMNS)
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for record in records:
            row = asdict(record)
            row.update(row.pop("extra"))
            writer.writerow(row)
    for cost in ("flops", "energy"):
        plot = plot_accuracy_against(records, cost, output / f"accuracy_vs_{cost}.png")
        if plot is not None:
            written.append(plot)
    return written


def _format(value: float | int | None, template: str) -> str:
    return "" if value is None else template.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", type=Path, help="run folders or folders holding them (default: logs/)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read finished runs from this W&B project instead")
    parser.add_argument("--output", type=Path, default=Path("reports"), help="report folder (default: reports/)")
    args = parser.parse_args()

    try:
        records = records_from_wandb(args.wandb) if args.wandb else records_from_folders(args.paths or [Path("logs")])
    except FileNotFoundError as error:
        sys.exit(str(error))
    if not records:
        sys.exit("no runs found: give folders that hold summary.json files, or --wandb entity/project")
    for path in write_report(records, args.output):
        print(path)


if __name__ == "__main__":
    main()
