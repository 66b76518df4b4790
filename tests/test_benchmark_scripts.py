"""The bookkeeping of the benchmark scripts: which configurations run, and how results are paired."""

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def time_shift_script():
    return load_script("benchmark_time_shift")


def result(sampler: str, window: int, seed: int, frechet: float, wall_s: float, shift_alphabar: bool = True) -> dict:
    return {
        "sampler": sampler,
        "steps": 10,
        "window": window,
        "shift_alphabar": shift_alphabar,
        "seed": seed,
        "frechet": frechet,
        "wall_s": wall_s,
        "metric": "FD-ResNet20 (256 samples)",
        "gflops_per_image": 1.0,
        "cutoff": 300 if window else None,
        "spacing": "trailing",
    }


def test_time_shift_plan_pairs_arms(time_shift_script):
    args = argparse.Namespace(steps=[10, 5], seeds=[0, 1], samplers=["ddim"], windows=[40], alphabar_choice=[10])
    plans = time_shift_script.planned_configurations(args)

    assert len(plans) == 2 * 3 + 2 * 2
    assert [plan["steps"] for plan in plans[:6]] == [10] * 6
    assert plans[0] == {"sampler": "ddim", "steps": 10, "window": 0, "shift_alphabar": True, "seed": 0}
    assert plans[1]["window"] == 40
    assert plans[2]["shift_alphabar"] is False
    assert all(plan["shift_alphabar"] for plan in plans if plan["steps"] == 5)


def test_time_shift_gain_paired_by_seed(time_shift_script):
    entries = [
        result("ddim", 0, 0, frechet=10.0, wall_s=1.0),
        result("ddim", 0, 1, frechet=20.0, wall_s=2.0),
        result("ddim", 40, 0, frechet=8.0, wall_s=1.1),
        result("ddim", 40, 1, frechet=21.0, wall_s=2.0),
    ]
    rows = {row["window"]: row for row in time_shift_script.summarise(entries)}

    assert rows[0]["frechet_mean"] == pytest.approx(15.0)
    assert "gain_mean" not in rows[0]
    shifted = rows[40]
    assert shifted["gain_mean"] == pytest.approx((0.2 - 0.05) / 2)
    assert shifted["gain_min"] == pytest.approx(-0.05)
    assert shifted["improved_seeds"] == 1
    assert shifted["wall_overhead_median"] == pytest.approx(0.05)


def test_time_shift_report_names_metric(time_shift_script, tmp_path):
    entries = [result("ddim", 0, 0, 10.0, 1.0), result("ddim", 40, 0, 9.0, 1.0)]
    table = time_shift_script.format_table(time_shift_script.summarise(entries), entries)

    assert table.startswith("FD-ResNet20 (256 samples)")
    assert "| ddim | 10 | w=40 | 9.000 +- 0.000 | +10.0 %, +10.0 % | 1/1 | +0.0 % |" in table
