"""The report tool: tables per technique, CSV and plots from run summaries."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_report_script():
    spec = importlib.util.spec_from_file_location("leanlight_report", ROOT / "scripts" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load_report_script()

DENSE = {
    "module": "ClassifierModule",
    "task_name": "cifar10_resnet20",
    "model": "resnet20",
    "data": "CIFAR10DataModule",
    "test/acc": 0.8467,
    "params": 269722,
    "macs_per_sample": 40.55e6,
    "estimated_inference_energy_uj": 186.5,
    "wall_time_s": 2700.0,
}
PRUNED = {
    "module": "PolarizationModule",
    "task_name": "polarization_resnet20_cifar10_cpu",
    "model": "resnet20",
    "data": "CIFAR10DataModule",
    "test/acc": 0.84,
    "params": 150000,
    "macs_per_sample": 20.0e6,
    "estimated_inference_energy_uj": 92.0,
    "wall_time_s": 2500.0,
    "pruning_flops_reduction": 0.507,
    "pruning_flops_reduction_target": 0.5,
}


def _write_runs(root: Path) -> None:
    for name, summary in (("dense", DENSE), ("pruned", PRUNED)):
        folder = root / name / "runs" / "2026-01-01_00-00-00"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(summary))
    (root / "broken").mkdir()
    (root / "broken" / "summary.json").write_text("{not json")


def test_tables_group_runs_by_technique(tmp_path: Path) -> None:
    _write_runs(tmp_path)

    records = report.records_from_folders([tmp_path])
    tables = report.format_tables(records)

    assert sorted(record.technique for record in records) == ["dense", "polarization pruning"]
    assert "## dense" in tables
    assert "## polarization pruning" in tables
    pruned_row = next(line for line in tables.splitlines() if "polarization_resnet20_cifar10_cpu" in line)
    assert "84.00%" in pruned_row
    assert "50.7%" in pruned_row
    assert "20.000 M" in pruned_row
    # Runs on different data sets can share a model and a technique, so the data set has a column.
    assert "| resnet20 | CIFAR10 |" in pruned_row


def test_report_writes_csv_and_plots(tmp_path: Path) -> None:
    _write_runs(tmp_path / "logs")

    written = report.write_report(report.records_from_folders([tmp_path / "logs"]), tmp_path / "report")

    names = sorted(path.name for path in written)
    assert names == ["accuracy_vs_energy.png", "accuracy_vs_flops.png", "report.md", "runs.csv"]
    with (tmp_path / "report" / "runs.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2
    assert {row["technique"] for row in rows} == {"dense", "polarization pruning"}


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        report.records_from_folders([tmp_path / "nowhere"])
