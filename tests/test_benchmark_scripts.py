"""The bookkeeping of the benchmark scripts: which configurations run, and how results are paired."""

import argparse
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from diffusion.schedules import make_schedule
from lightning_modules.diffusion import SamplerSettings

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def time_shift_script():
    return load_script("benchmark_time_shift")


def result(sampler: str, window: int, seed: int, frechet: float, wall_s: float, placement: str = "sample") -> dict:
    return {
        "sampler": sampler,
        "steps": 10,
        "window": window,
        "placement": placement if window else None,
        "seed": seed,
        "frechet": frechet,
        "wall_s": wall_s,
        "metric": "FD-ResNet20 (256 samples)",
        "gflops_per_image": 1.0,
        "cutoff": 300 if window else None,
        "spacing": "trailing",
    }


def test_time_shift_plan_pairs_arms(time_shift_script):
    args = argparse.Namespace(
        steps=[10, 5], seeds=[0, 1], samplers=["ddim"], windows=[40], placement="end_point", placement_steps=[10]
    )
    plans = time_shift_script.planned_configurations(args)

    assert len(plans) == 2 * 4 + 2 * 2
    assert [plan["steps"] for plan in plans[:8]] == [10] * 8
    assert plans[0] == {"sampler": "ddim", "steps": 10, "window": 0, "placement": None, "seed": 0}
    assert [plan["placement"] for plan in plans[1:4]] == ["end_point", "sample", "time_input"]
    assert [plan["placement"] for plan in plans if plan["steps"] == 5] == [None, "end_point"] * 2


def test_time_shift_reads_results_before_placement(time_shift_script, tmp_path):
    old_entries = [
        {"sampler": "ddpm", "steps": 10, "window": 0, "shift_alphabar": True, "seed": 0},
        {"sampler": "ddpm", "steps": 10, "window": 40, "shift_alphabar": True, "seed": 0},
        {"sampler": "ddpm", "steps": 10, "window": 40, "shift_alphabar": False, "seed": 0},
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in old_entries))

    entries = time_shift_script.load_results(tmp_path)
    assert [entry["placement"] for entry in entries] == [None, "sample", "time_input"]
    assert all("shift_alphabar" not in entry for entry in entries)


class ExactGaussianEpsilon(nn.Module):
    """The exact epsilon prediction for data whose pixels are independent N(0, std^2)."""

    def __init__(self, alphabar: torch.Tensor, std: float) -> None:
        super().__init__()
        self.alphabar = alphabar
        self.std = std

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        level = self.alphabar[timesteps].to(sample.dtype).view(-1, 1, 1, 1)
        return (1 - level).sqrt() / (level * self.std**2 + 1 - level) * sample


def test_time_shift_data_variance_per_image(time_shift_script):
    images = np.zeros((2, 2, 2, 1), dtype=np.uint8)
    images[0, 0, 0, 0] = 255

    # Image 0 in [-1, 1] is one 1 and three -1: mean -0.5, unbiased variance (2.25 + 3 * 0.25) / 3 = 1.
    # Image 1 is constant.
    assert time_shift_script.data_variance(images) == pytest.approx(0.5)


def test_time_shift_trace_follows_exact_model(time_shift_script):
    alphabar = make_schedule("linear", 1000)
    denoiser = SimpleNamespace(
        alphabar=alphabar, prediction_type="epsilon", image_shape=(1, 8, 8), net=ExactGaussianEpsilon(alphabar, 0.5)
    )
    # With all 1000 steps, DDPM with the exact model samples the data's distribution at every timestep.
    settings = SamplerSettings(name="ddpm", num_steps=1000, clip_x0=None)
    rows = time_shift_script.trace_variance(denoiser, settings, image_variance=0.25, num_samples=2000, seed=0)

    assert [row["timestep"] for row in rows[:3]] == [999, 998, 997]
    assert rows[-1]["timestep"] == -1
    assert rows[-1]["data_variance"] == pytest.approx(0.25)
    for row in rows:
        assert row["sample_variance"] == pytest.approx(row["data_variance"], rel=0.03), row


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
    assert "| ddim | 10 | w=40, sample | 9.000 +- 0.000 | +10.0 %, +10.0 % | 1/1 | +0.0 % |" in table


@pytest.fixture(scope="module")
def slimflow_script():
    return load_script("benchmark_slimflow")


def slimflow_results(ablation: bool) -> dict:
    student = {"fd_one_step": 2.2, "fd_reflow_one_step": 2.3}
    results = {
        "metric": "FD-ResNet20 (2000 samples)",
        "distance": "pseudo-Huber",
        "budget": {"num_pairs": 10000},
        "pair_solver": "Euler 16 steps",
        "parameters": {"teacher": 1_063_651, "student": 267_891},
        "teacher": {"fd_by_euler_steps": {"1": 23.9, "32": 1.19}, "rk45": None},
        "slimflow": student,
        "baseline": {"fd_one_step": 2.06, "fd_reflow_one_step": 2.37},
        "data_floor_fd": 0.02,
        "images_per_second": {"student_one_step": 2000.0},
        "threads": 1,
    }
    if ablation:
        results["annealing_plain"] = {"fd_one_step": 1.95, "fd_reflow_one_step": 2.28}
    return results


def test_slimflow_report_lists_ablation_arm(slimflow_script):
    with_ablation = slimflow_script.format_markdown(slimflow_results(ablation=True))
    without_ablation = slimflow_script.format_markdown(slimflow_results(ablation=False))

    assert "| ablation student (annealing reflow + one-step distillation) | 267,891 | 1 | 1.95 |" in with_ablation
    assert "ablation student" not in without_ablation
    assert "| baseline student (plain reflow + one-step distillation) | 267,891 | 1 | 2.06 |" in without_ablation


def test_slimflow_report_gives_distillation_targets(slimflow_script):
    results = slimflow_results(ablation=False)
    assert "What the SlimFlow distillation pulls towards" not in slimflow_script.format_markdown(results)

    results["distillation_target_fds"] = {
        "term1_pairs": 1.68,
        "term2_at_start": 2.51,
        "term2_at_end": 2.44,
        "guide_euler_2_steps": 2.9,
    }
    report = slimflow_script.format_markdown(results)
    assert "term 1, the teacher's pairs 1.68; term 2 with the guide, at the start 2.51 and at the end 2.44" in report


class ConstantVelocity(nn.Module):
    """A velocity network that returns ``value`` everywhere, whatever the input and time."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.value)


def test_guidance_targets_use_evaluation_noise(slimflow_script):
    args = argparse.Namespace(resolution=4)
    targets = slimflow_script.guidance_targets(ConstantVelocity(0.0), ConstantVelocity(1.0), 300, args)

    # A still student leaves x_t' at the noise, so the guide's step adds (1 - t'), with t' in [0.2, 0.8].
    noise = torch.randn((300, 3, 4, 4), generator=torch.Generator().manual_seed(12345))
    step = targets - noise.clamp(-1.0, 1.0)
    unclamped = noise.abs() < 0.2
    assert targets.shape == (300, 3, 4, 4)
    assert step[unclamped].min() >= 0.2 - 1e-6
    assert step[unclamped].max() <= 0.8 + 1e-6
    per_image = step.flatten(1)[:, 0][unclamped.flatten(1)[:, 0]]
    assert per_image.std() > 0.1  # t' differs between images


def test_slimflow_ablation_flag(slimflow_script):
    arguments = ["--feature-checkpoint", "resnet20.ckpt"]
    assert slimflow_script.parse_arguments(arguments).ablation is False
    assert slimflow_script.parse_arguments([*arguments, "--ablation"]).ablation is True


def test_slimflow_cache_recomputes_for_new_settings(slimflow_script, tmp_path):
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"fd": float(len(calls))}

    path = tmp_path / "teacher_fd.json"
    assert slimflow_script.cached(path, compute, {"num_samples": 100}) == {"fd": 1.0}
    assert slimflow_script.cached(path, compute, {"num_samples": 100}) == {"fd": 1.0}
    assert slimflow_script.cached(path, compute, {"num_samples": 200}) == {"fd": 2.0}
    assert len(calls) == 2


def test_slimflow_cache_recomputes_unkeyed_file(slimflow_script, tmp_path):
    path = tmp_path / "data_floor.json"
    path.write_text(json.dumps({"fd": 9.0}))

    assert slimflow_script.cached(path, lambda: {"fd": 0.5}, {"seed": 0}) == {"fd": 0.5}


def test_slimflow_student_key_follows_teacher(slimflow_script):
    arguments = ["--feature-checkpoint", "resnet20.ckpt"]
    base = slimflow_script.parse_arguments(arguments)
    longer_teacher = slimflow_script.parse_arguments([*arguments, "--teacher-steps", "4000"])

    def student_key(args) -> dict:
        return slimflow_script.stage_keys(args)["students"]

    assert student_key(base) == student_key(slimflow_script.parse_arguments(arguments))
    assert student_key(base) != student_key(longer_teacher)
    assert json.loads(json.dumps(student_key(base))) == student_key(base)


def test_time_shift_output_rejects_other_settings(time_shift_script, tmp_path):
    checkpoint = tmp_path / "ddpm.ckpt"
    checkpoint.write_bytes(b"")
    args = argparse.Namespace(
        output=tmp_path / "out",
        checkpoint=str(checkpoint),
        feature_checkpoint="resnet20.ckpt",
        data_override=None,
        num_samples=500,
        batch_size=500,
        spacing="trailing",
        cutoff=300,
        no_ema=False,
    )
    args.output.mkdir()
    time_shift_script.check_output_settings(args)
    time_shift_script.check_output_settings(args)

    args.cutoff = 200
    with pytest.raises(SystemExit, match="different cutoff"):
        time_shift_script.check_output_settings(args)


def test_time_shift_counts_paired_seeds(time_shift_script):
    entries = [
        result("ddim", 0, 0, frechet=10.0, wall_s=1.0),
        result("ddim", 40, 0, frechet=9.0, wall_s=1.0),
        result("ddim", 40, 1, frechet=8.0, wall_s=1.0),
    ]
    shifted = [row for row in time_shift_script.summarise(entries) if row["window"] == 40][0]

    assert shifted["seeds"] == 2
    assert shifted["paired_seeds"] == 1
    assert "| 1/1 |" in time_shift_script.format_table(time_shift_script.summarise(entries), entries)


def test_pruning_results_include_renamed_runs(tmp_path: Path) -> None:
    script = load_script("benchmark_pruning")
    for name in ("polarization_blocks", "l1", "dense", "polarization", "speed"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"arm": name}))

    results = script.load_results(tmp_path)

    # The standard arms in their order, then renamed runs by name; speed.json is not a run.
    assert list(results) == ["dense", "polarization", "l1", "polarization_blocks"]
