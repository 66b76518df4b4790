"""SlimFlow: the flow objective, reflow shards, beta schedules, distillation terms, the pipeline and sampling."""

import json
import logging
import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, open_dict

from diffusion.rectified_flow import (
    T_EPSILON,
    euler_sample,
    network_velocity,
    rectified_flow_loss,
    rk45_sample,
    sample_flow,
    sample_time,
)
from diffusion.reflow_pairs import ReflowPairDataset, generate_reflow_pairs, read_shard, shard_seed
from diffusion.slimflow import (
    anneal_noise,
    annealing_beta,
    flow_guidance_loss,
    flow_guidance_target,
    joint_horizontal_flip,
    l2_distance,
    make_distance,
    paired_distillation_loss,
    pseudo_huber_constant,
    pseudo_huber_distance,
)
from lightning_modules.cluster import SigtermStops
from lightning_modules.image_data import ImageData
from lightning_modules.pipeline import STATE_FILE
from lightning_modules.seeds import SHARD_STREAM, STAGE_STREAM, STEP_NOISE_STREAM, derive_seed
from lightning_modules.slimflow import CHECKPOINT_KEY as FLOW_CHECKPOINT_KEY
from lightning_modules.slimflow import RectifiedFlowModule, load_flow_model, save_flow_checkpoint
from lightning_modules.training import train
from models import create_model
from tests.conftest import compose_sample_config, compose_train_config

# ---------------------------------------------------------------------------------------
# Toy networks


class ToyVelocity(nn.Module):
    """An MLP velocity field for 2-D points, called as ``net(x, t * 999)`` like the UNet."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.cat([x, (timesteps / 999.0)[:, None]], dim=1))


class AffineVelocity(nn.Module):
    """``v(x, t) = a x + c t`` with scalar parameters, so every loss can be computed by hand."""

    def __init__(self, a: float, c: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        t = (timesteps / 999.0).view(-1, *([1] * (x.ndim - 1)))
        return self.a * x + self.c * t


def two_modes(count: int, generator: torch.Generator) -> torch.Tensor:
    """Points at (-2, 0) or (2, 0) with equal probability, plus Gaussian noise of std 0.1."""
    signs = torch.randint(0, 2, (count,), generator=generator).float() * 2 - 1
    centres = torch.stack([signs * 2.0, torch.zeros(count)], dim=1)
    return centres + 0.1 * torch.randn(count, 2, generator=generator)


# ---------------------------------------------------------------------------------------
# Rectified flow


def test_flow_loss_learns_two_modes() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    net = ToyVelocity()
    velocity = network_velocity(net)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(600):
        x1 = two_modes(256, generator)
        z0 = torch.randn(256, 2, generator=generator)
        loss = rectified_flow_loss(velocity, z0, x1, sample_time(256, generator=generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    # Independent pairs leave an irreducible error (the path crossing), well below the start.
    assert sum(losses[-50:]) / 50 < 0.5 * sum(losses[:10]) / 10
    samples = euler_sample(velocity, torch.randn(2000, 2, generator=generator), num_steps=50)
    near_a_mode = ((samples[:, 0].abs() - 2.0).abs() < 0.5) & (samples[:, 1].abs() < 0.5)
    assert near_a_mode.float().mean() > 0.8
    right = (samples[:, 0] > 0).float().mean()
    assert 0.35 < right < 0.65


def test_euler_one_step_is_prediction_at_eps() -> None:
    net = AffineVelocity(0.5, 2.0)
    z0 = torch.randn(3, 4)
    expected = z0 + (0.5 * z0 + 2.0 * T_EPSILON)
    torch.testing.assert_close(euler_sample(network_velocity(net), z0, 1), expected)


def test_rk45_solves_linear_ode() -> None:
    # dx/dt = x has the solution x(1) = x(eps) * exp(1 - eps).
    net = AffineVelocity(1.0, 0.0)
    z0 = torch.randn(2, 3)
    solution = rk45_sample(network_velocity(net), z0, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(solution.x1, z0 * math.exp(1.0 - T_EPSILON), rtol=1e-5, atol=1e-5)
    assert solution.num_evaluations > 6


# ---------------------------------------------------------------------------------------
# Reflow pairs


class CountingTeacher:
    """A fixed map ``x1 = tanh(2 z0) + 0.1`` that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, z0: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(2 * z0) + 0.1


def test_pairs_same_seed_are_identical(tmp_path: Path) -> None:
    shape = (1, 4, 4)
    generate_reflow_pairs(CountingTeacher(), tmp_path / "a", 10, 4, shape, base_seed=7)
    generate_reflow_pairs(CountingTeacher(), tmp_path / "b", 10, 4, shape, base_seed=7)
    generate_reflow_pairs(CountingTeacher(), tmp_path / "c", 10, 4, shape, base_seed=8)
    first, second, other = (ReflowPairDataset(tmp_path / name) for name in "abc")

    assert len(first) == 10
    assert torch.equal(first.z0, second.z0)
    assert torch.equal(first.x1, second.x1)
    assert not torch.equal(first.z0, other.z0)
    expected_seeds = [shard_seed(7, index) for index in range(3)]
    assert first.seeds == expected_seeds
    manifest = json.loads((tmp_path / "a" / "pairs.json").read_text())
    assert [shard["seed"] for shard in manifest["shards"]] == expected_seeds


def test_pairs_from_ode_solve_repeat(tmp_path: Path) -> None:
    # The pipeline's teacher map: an adaptive RK45 solve through a (randomly perturbed) UNet.
    torch.manual_seed(0)
    teacher = create_model("unet", 1, 10, base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    velocity = network_velocity(teacher.eval())

    def teacher_map(z0: torch.Tensor) -> torch.Tensor:
        return sample_flow(velocity, z0, "rk45", rtol=1e-3, atol=1e-3)[0]

    for name in ("a", "b"):
        generate_reflow_pairs(teacher_map, tmp_path / name, 4, 2, (1, 8, 8), base_seed=3, batch_size=1)
    first, second = ReflowPairDataset(tmp_path / "a"), ReflowPairDataset(tmp_path / "b")

    assert torch.equal(first.z0, second.z0)
    assert torch.equal(first.x1, second.x1)
    assert (first.x1 - first.z0).abs().mean() > 0.01


def test_neighbouring_seeds_share_no_pairs(tmp_path: Path) -> None:
    # With seed = base_seed + index, the sets of base seeds 7 and 8 shared two of three shards.
    shape = (1, 4, 4)
    generate_reflow_pairs(CountingTeacher(), tmp_path / "a", 12, 4, shape, base_seed=7)
    generate_reflow_pairs(CountingTeacher(), tmp_path / "b", 12, 4, shape, base_seed=8)
    first, second = ReflowPairDataset(tmp_path / "a"), ReflowPairDataset(tmp_path / "b")

    assert torch.cdist(first.z0.flatten(1), second.z0.flatten(1)).min() > 1.0
    assert not set(first.seeds) & set(second.seeds)


def test_derived_seeds_differ_across_keys() -> None:
    # With seed + index, stage 1 of the run with seed 0 repeated stage 0 of the run with seed 1.
    seeds = [derive_seed(STAGE_STREAM, seed, index) for seed in range(4) for index in range(4)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= seed < 2**32 for seed in seeds)
    assert derive_seed(STAGE_STREAM, 3, 2) == derive_seed(STAGE_STREAM, 3, 2)
    with pytest.raises(ValueError, match="seed=0 or above"):
        derive_seed(STAGE_STREAM, -1, 0)


def test_derived_seeds_per_stream_and_length() -> None:
    # A SeedSequence pads with zeros: hashed alone, (7, 1) and (7, 1, 0) gave the same seed.
    assert derive_seed(STAGE_STREAM, 7, 1) != derive_seed(STAGE_STREAM, 7, 1, 0)
    assert derive_seed(STAGE_STREAM, 7) != derive_seed(STAGE_STREAM, 7, 0)
    assert derive_seed(STAGE_STREAM, 7, 1) != derive_seed(SHARD_STREAM, 7, 1)
    assert derive_seed(STAGE_STREAM, 7, 1) != derive_seed(STEP_NOISE_STREAM, 7, 1)


def test_legacy_flow_checkpoint_gets_old_rule(tmp_path: Path) -> None:
    net = create_model("unet", 1, 10, base_channels=8, channel_multipliers=[1, 2], attention_levels=[])
    module = RectifiedFlowModule(net, optimizer=torch.optim.Adam)
    module.image_data = ImageData((1, 8, 8))
    path = save_flow_checkpoint(module, tmp_path / "new")
    assert load_flow_model(path).net.min_group_channels == 4

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    del checkpoint[FLOW_CHECKPOINT_KEY]["model_spec"]["min_group_channels"]
    torch.save(checkpoint, tmp_path / "old.pt")
    assert load_flow_model(tmp_path / "old.pt").net.min_group_channels == 1

    with pytest.raises(ValueError, match="set model.min_group_channels=1"):
        module.on_load_checkpoint(checkpoint)


def test_pair_shards_resume(tmp_path: Path) -> None:
    shape = (1, 2, 2)
    teacher = CountingTeacher()
    paths = generate_reflow_pairs(teacher, tmp_path, 10, 4, shape, base_seed=0, batch_size=4)
    assert teacher.calls == 3
    original = read_shard(paths[1])

    # A rerun over complete shards calls the teacher no more.
    generate_reflow_pairs(teacher, tmp_path, 10, 4, shape, base_seed=0, batch_size=4)
    assert teacher.calls == 3

    # A missing shard and a truncated one are generated again; a leftover temporary file is ignored.
    paths[1].unlink()
    paths[2].write_bytes(b"truncated")
    (tmp_path / ".shard_00001.pt.tmp").write_bytes(b"partial write")
    generate_reflow_pairs(teacher, tmp_path, 10, 4, shape, base_seed=0, batch_size=4)
    assert teacher.calls == 5
    regenerated = read_shard(paths[1])
    assert torch.equal(regenerated["z0"], original["z0"])
    assert len(ReflowPairDataset(tmp_path)) == 10


def test_pairs_ignore_stale_shards(tmp_path: Path) -> None:
    shape = (1, 2, 2)
    generate_reflow_pairs(CountingTeacher(), tmp_path, 12, 4, shape, base_seed=0)
    # Fewer pairs in the same folder: shard_00002.pt of the first generation stays behind.
    generate_reflow_pairs(CountingTeacher(), tmp_path, 8, 4, shape, base_seed=0)

    assert (tmp_path / "shard_00002.pt").is_file()
    assert len(ReflowPairDataset(tmp_path)) == 8


# ---------------------------------------------------------------------------------------
# Annealing Reflow


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_beta_schedule_endpoints(schedule: str) -> None:
    assert annealing_beta(0, 100, schedule) == 1.0
    assert annealing_beta(50, 100, schedule) == pytest.approx(0.5)
    assert annealing_beta(100, 100, schedule) == pytest.approx(0.0, abs=1e-12)
    assert annealing_beta(500, 100, schedule) == pytest.approx(0.0, abs=1e-12)


def test_beta_schedule_exponential_decays() -> None:
    values = [annealing_beta(step, 100, "exponential") for step in (0, 50, 100, 400)]
    assert values[0] == 1.0
    assert values[2] == pytest.approx(math.exp(-1))
    assert all(later < earlier for earlier, later in zip(values, values[1:], strict=False))
    assert values[-1] > 0


def test_beta_zero_steps_uses_exact_pairs() -> None:
    assert annealing_beta(0, 0, "linear") == 0.0
    z0, fresh = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(anneal_noise(z0, 0.0, fresh), z0)
    torch.testing.assert_close(anneal_noise(z0, 1.0, fresh), fresh)


def test_joint_flip_keeps_pairs_aligned() -> None:
    z0 = torch.randn(3, 1, 4, 4)
    x1 = torch.tanh(z0) + 0.5  # a pixel-wise teacher, so x1 = f(z0) is true only while the pair stays aligned
    generator = torch.Generator().manual_seed(0)

    flipped = [joint_horizontal_flip(x1, z0, 0.5, generator) for _ in range(40)]
    for image, noise in flipped:
        torch.testing.assert_close(image, torch.tanh(noise) + 0.5)
    assert 5 < sum(torch.equal(noise, z0.flip(-1)) for _, noise in flipped) < 35
    assert torch.equal(joint_horizontal_flip(x1, z0, 0.0, generator)[1], z0)
    assert torch.equal(joint_horizontal_flip(x1, z0, 1.0, generator)[1], z0.flip(-1))


def test_module_anneals_pair_noise() -> None:
    # Linear annealing over 4 steps: beta is 1 at step 0, 0.5 at step 2 and 0 from step 4 on.
    net = create_model("unet", 1, 10, base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1)
    module = RectifiedFlowModule(net, optimizer=torch.optim.Adam, anneal_steps=4, beta_schedule="linear")
    module.log = lambda *args, **kwargs: None  # Lightning's log warns on every call without a trainer.
    torch.manual_seed(0)
    z0, x1 = torch.randn(64, 1, 8, 8), torch.randn(64, 1, 8, 8)

    def noise_at(step: int, training: bool = True) -> torch.Tensor:
        module.trainer = SimpleNamespace(global_step=step)
        noise, images = module.pair_batch((z0, x1), None, training)
        assert torch.equal(images, x1)
        return noise

    # beta 1: the pair's noise is replaced by fresh noise, uncorrelated with it.
    assert (noise_at(0) * z0).mean().abs() < 0.1
    # beta 0.5: sqrt(1 - 0.25) z0 plus fresh noise of standard deviation 0.5.
    fresh = noise_at(2) - math.sqrt(0.75) * z0
    assert fresh.std().item() == pytest.approx(0.5, abs=0.03)
    assert (fresh * z0).mean().abs() < 0.05
    # beta 0: the exact pair, and validation never anneals.
    assert torch.equal(noise_at(4), z0)
    assert torch.equal(noise_at(0, training=False), z0)


def test_unknown_beta_schedule_rejected() -> None:
    with pytest.raises(ValueError, match="unknown beta schedule"):
        annealing_beta(0, 10, "step")


# ---------------------------------------------------------------------------------------
# Flow-Guided Distillation


def test_paired_term_by_hand() -> None:
    student = AffineVelocity(0.5, 2.0)
    z0 = torch.tensor([[1.0, -2.0]])
    x1 = torch.tensor([[0.0, 1.0]])
    loss = paired_distillation_loss(network_velocity(student), z0, x1, l2_distance)
    # One step: z0 + 0.5 z0 + 2 eps = (1.5 + 0.002, -3 + 0.002).
    prediction = torch.tensor([1.5 + 2 * T_EPSILON, -3.0 + 2 * T_EPSILON])
    expected = ((prediction - x1[0]) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_guided_term_by_hand() -> None:
    student = AffineVelocity(0.5, 2.0)
    guide = AffineVelocity(-1.0, 3.0).requires_grad_(False)
    noise = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])
    t_prime = torch.tensor([0.25, 0.5])
    loss = flow_guidance_loss(network_velocity(student), network_velocity(guide), noise, t_prime, l2_distance)

    student_velocity = 0.5 * noise + 2.0 * T_EPSILON
    prediction = noise + student_velocity
    x_t = noise + t_prime[:, None] * student_velocity
    target = x_t + (1 - t_prime[:, None]) * (-1.0 * x_t + 3.0 * t_prime[:, None])
    torch.testing.assert_close(loss, ((prediction - target) ** 2).mean())

    # The gradient flows through the prediction only: d/da = mean(2 (p - T) noise).
    loss.backward()
    expected_grad_a = (2 * (prediction - target) * noise).mean()
    torch.testing.assert_close(student.a.grad, expected_grad_a)
    assert guide.a.grad is None


def test_guidance_target_by_hand() -> None:
    guide = AffineVelocity(-1.0, 3.0)
    noise = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])
    student_velocity = torch.tensor([[0.5, -0.5], [2.0, 1.0]])
    t_prime = torch.tensor([0.25, 0.5])
    target = flow_guidance_target(network_velocity(guide), noise, student_velocity, t_prime)

    x_t = noise + t_prime[:, None] * student_velocity
    expected = x_t + (1 - t_prime[:, None]) * (-1.0 * x_t + 3.0 * t_prime[:, None])
    torch.testing.assert_close(target, expected)


def test_pseudo_huber_by_hand() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    y = torch.zeros(2, 2)
    c = pseudo_huber_constant(2)
    assert c == pytest.approx(0.00054 * math.sqrt(2))
    expected = ((math.sqrt(25 + c * c) - c) + 0.0) / 2
    assert float(pseudo_huber_distance(x, y)) == pytest.approx(expected, rel=1e-6)


def test_lpips_without_weights_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vgg_weights"):
        make_distance("lpips")
    with pytest.raises(FileNotFoundError, match="VGG-16 weights"):
        make_distance("lpips", tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------
# Pipeline and train.py

# Seconds on one thread: 128 training digits, a few steps per stage, 64 pairs from 2 Euler steps.
PIPELINE = (
    "experiment=slimflow_digits",
    "trainer.accelerator=cpu",
    "logger=none",
    "data.train_subset=128",
    "data.batch_size=32",
    "module.batch_size=16",
    "module.grid_samples=4",
    "module.teacher.max_steps=4",
    "module.pairs.num_pairs=64",
    "module.pairs.shard_size=32",
    "module.pairs.batch_size=32",
    "module.pairs.solver=euler",
    "module.pairs.num_steps=2",
    "module.pairs.holdout=16",
    "module.annealing_reflow.max_steps=6",
    "module.annealing_reflow.anneal_steps=3",
    "module.distillation.max_steps=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
)


class SimulatedKill(RuntimeError):
    """Raised by :class:`KillInStage` to stop a pipeline as a killed job would stop."""


class KillInStage(L.Callback):
    """Raise when a module with ``role`` starts training, after the stages before it finished."""

    def __init__(self, role: str) -> None:
        self.role = role

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "role", None) == self.role:
            raise SimulatedKill(f"killed at the start of the {self.role} training")


# Roles of the modules that started training, in order.
TRAINED_ROLES: list[str] = []


class RecordRoles(L.Callback):
    """Append the role of every module that starts training to ``TRAINED_ROLES``."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        TRAINED_ROLES.append(getattr(pl_module, "role", "?"))


def compose_pipeline(output_dir: Path, cache_dir: Path, *overrides: str) -> DictConfig:
    """Compose configs/train.yaml with the small pipeline's overrides, writing into ``output_dir``."""
    return compose_train_config(output_dir, cache_dir, *PIPELINE, *overrides)


def test_pipeline_resumes_after_stage(
    tmp_path: Path, cache_dir: Path, recwarn: pytest.WarningsRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "run"
    killed = compose_pipeline(folder, cache_dir)
    with open_dict(killed):
        killed.callbacks.kill = {"_target_": f"{__name__}.KillInStage", "role": "reflow_student"}
    with pytest.raises(SimulatedKill):
        train(killed)

    state = json.loads((folder / STATE_FILE).read_text())
    assert state["stages"]["teacher"]["finished"]
    assert state["stages"]["pairs"]["finished"]
    assert not state["stages"]["annealing_reflow"]["finished"]
    teacher_file = folder / "stages" / "teacher" / "flow.pt"
    shard = folder / "stages" / "pairs" / "pairs" / "shard_00000.pt"
    teacher_mtime, shard_mtime = teacher_file.stat().st_mtime_ns, shard.stat().st_mtime_ns

    TRAINED_ROLES.clear()
    caplog.set_level(logging.INFO)
    resumed = compose_pipeline(tmp_path / "resumed", cache_dir, f"ckpt_path={folder}")
    with open_dict(resumed):
        resumed.callbacks.record = {"_target_": f"{__name__}.RecordRoles"}
    summary = train(resumed)

    assert TRAINED_ROLES == ["reflow_student", "one_step_student"]
    # The distillation stage's frozen guide is in eval mode on purpose; Lightning's warning about it is not shown.
    assert not [warning for warning in recwarn if "in eval mode" in str(warning.message)]
    assert teacher_file.stat().st_mtime_ns == teacher_mtime
    assert shard.stat().st_mtime_ns == shard_mtime
    state = json.loads((folder / STATE_FILE).read_text())
    assert all(record["finished"] for record in state["stages"].values())
    # The pairs stage, which trains nothing, still names its pipeline for a report.
    pairs_summary = json.loads((folder / "stages" / "pairs" / "summary.json").read_text())
    assert (pairs_summary["module"], pairs_summary["stage"]) == ("SlimFlowPipeline", "pairs")
    assert summary["slimflow/distance"].startswith("pseudo-Huber")
    assert summary["slimflow/student_parameters"] * 3 < summary["slimflow/teacher_parameters"]
    assert math.isfinite(summary["test/one_step_distance"])
    # The closing lines are a table, one result per line.
    lines = [line for record in caplog.records for line in record.getMessage().splitlines()]
    student_rows = [line.split() for line in lines if line.startswith("  one-step student ")]
    assert student_rows == [["one-step", "student", f"{summary['slimflow/student_parameters']:,}", "parameters"]]

    # The distilled student is a flow checkpoint that sample.py reads with sampler=flow.
    student = load_flow_model(folder / "stages" / "distillation" / "flow.pt")
    assert student.net.min_group_channels == 4
    assert student.metadata["flow_guidance"] is True
    assert student.metadata["role"] == "one_step_student"
    import sample

    report = run_flow_sample(folder / "stages" / "distillation" / "flow.pt", tmp_path / "samples")
    assert report["network_evaluations_per_image"] == 1
    assert "pseudo-Huber" in report["sampler"]
    assert "Euler 1 step" in sample.format_report(report)
    assert (tmp_path / "samples" / "samples.png").is_file()


def run_flow_sample(checkpoint: Path, output_dir: Path) -> dict[str, Any]:
    """Run sample.py's ``run_sampling`` with ``sampler=flow`` and one Euler step on ``checkpoint``."""
    import sample

    cfg = compose_sample_config(
        f"ckpt_path={checkpoint}",
        "sampler=flow",
        "num_steps=1",
        "num_samples=6",
        "batch_size=4",
        "device=cpu",
        f"output_dir={output_dir}",
    )
    return sample.run_sampling(cfg)


def test_pipeline_checks_lpips_weights_first(tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose_pipeline(
        tmp_path / "run", cache_dir, "module.distance.name=lpips", f"module.distance.vgg_weights={tmp_path / 'no.pth'}"
    )
    TRAINED_ROLES.clear()
    with open_dict(cfg):
        cfg.callbacks.record = {"_target_": f"{__name__}.RecordRoles"}
    with pytest.raises(FileNotFoundError, match="VGG-16 weights file .* not found"):
        train(cfg)
    assert TRAINED_ROLES == []


def test_train_smoke_baseline_given_teacher(tmp_path: Path, cache_dir: Path) -> None:
    # An untrained teacher of the digits experiment's size, saved as a flow checkpoint.
    teacher = create_model("unet", 1, 10, base_channels=16, channel_multipliers=[1, 2, 2], num_res_blocks=1)
    module = RectifiedFlowModule(teacher, optimizer=torch.optim.Adam)
    module.image_data = ImageData((1, 8, 8))
    teacher_file = save_flow_checkpoint(module, tmp_path / "teacher")

    # train() is what train.py calls after Hydra composes the config.
    overrides = ("module.variant=baseline", f"module.teacher_checkpoint={teacher_file}", "trainer.fast_dev_run=true")
    TRAINED_ROLES.clear()
    cfg = compose_pipeline(tmp_path / "run", cache_dir, *overrides)
    with open_dict(cfg):
        cfg.callbacks.record = {"_target_": f"{__name__}.RecordRoles"}
    train(cfg)

    assert TRAINED_ROLES == ["reflow_student", "one_step_student"]
    state = json.loads((tmp_path / "run" / STATE_FILE).read_text())
    assert state["stages"]["teacher"]["summary"]["trained"] is False
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["slimflow/variant"] == "baseline"
    assert summary["slimflow/distance"].startswith("pseudo-Huber")
    assert (tmp_path / "run" / "samples" / "one_step_student.png").is_file()
    # The baseline is plain reflow (no annealing) and plain distillation (term 1 only).
    student = load_flow_model(tmp_path / "run" / "stages" / "distillation" / "flow.pt")
    assert student.metadata["flow_guidance"] is False
    reflow = load_flow_model(tmp_path / "run" / "stages" / "annealing_reflow" / "flow.pt")
    assert reflow.metadata["anneal_steps"] == 0


class TeacherSignalledOnCall:
    """The counting map, which sends this process SIGTERM on call number ``signal_call``."""

    def __init__(self, signal_call: int) -> None:
        self.calls = 0
        self.signal_call = signal_call

    def __call__(self, z0: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.signal_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.tanh(2 * z0) + 0.1


def test_sigterm_stops_pair_generation(tmp_path: Path) -> None:
    # Pair generation runs without a Trainer; the signal stops it at once, complete shards stay.
    shape = (1, 2, 2)
    teacher = TeacherSignalledOnCall(signal_call=2)
    with SigtermStops(), pytest.raises(SIGTERMException):
        generate_reflow_pairs(teacher, tmp_path / "stopped", 12, 4, shape, base_seed=0)
    assert sorted(path.name for path in (tmp_path / "stopped").glob("shard_*.pt")) == ["shard_00000.pt"]

    resumed = generate_reflow_pairs(CountingTeacher(), tmp_path / "stopped", 12, 4, shape, base_seed=0)
    reference = generate_reflow_pairs(CountingTeacher(), tmp_path / "reference", 12, 4, shape, base_seed=0)
    for resumed_path, reference_path in zip(resumed, reference, strict=True):
        assert torch.equal(read_shard(resumed_path)["x1"], read_shard(reference_path)["x1"])
