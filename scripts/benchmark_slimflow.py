"""SlimFlow against its teacher and a plain-reflow student on CIFAR-10, on a CPU budget.

One run trains, on CIFAR-10 (JPEG copy) area-downsampled to ``--resolution`` pixels:

- ``teacher``: a 1-rectified flow (UNet of width ``--teacher-width``) on ``--train-subset``
  training images for ``--teacher-steps`` steps;
- ``pairs``: ``--num-pairs`` reflow pairs from the teacher's ODE, Euler with
  ``--pair-steps`` steps (or RK45 with ``--pair-steps 0``), in resumable shards;
- ``slimflow``: a student of width ``--student-width`` from scratch with Annealing
  Reflow (beta linear from 1 to 0 over ``--anneal-fraction`` of ``--reflow-steps``,
  joint horizontal flips), then Flow-Guided Distillation for ``--distill-steps``
  (both terms, t' ~ U(0.2, 0.8));
- ``baseline``: the same student with plain reflow (beta = 0, no flips) for the same
  steps, then one-step distillation with term 1 only for the same steps;
- ``annealing_plain`` (with ``--ablation``): Annealing Reflow as in ``slimflow``, then the
  baseline's distillation (term 1 only). It differs from ``slimflow`` only in the
  distillation and from ``baseline`` only in the reflow, so it splits their difference
  between the two stages.

All arms see the same pairs, batch size, learning rate and step counts. Then it prints
the one-step Frechet distance of both students and of the teacher (Euler with each of
``--teacher-step-counts``, and RK45 at ``--teacher-rk45-tolerance``), and the images per
second of the one-step student against the teacher's best Euler setting and its RK45 solve.
It also measures what the SlimFlow student's distillation pulls towards: the distance of
term 1's targets (the teacher's pairs) and of term 2's (one student step to t', then one
guide step), with the guide as the student at the start and the distilled student at
the end.

The distance is FD-ResNet20: the Frechet distance in the penultimate features of a
CIFAR-10 ResNet-20 (``--feature-checkpoint``), between ``--num-samples`` samples and the
10,000 test images, both downsampled to the working resolution and upsampled back to
32x32 (bilinear), so the feature network sees the same blur on both sides. It is a
relative measure, not FID. Every stage writes its result to ``--output`` with the
settings it was made with. A rerun with the same folder reuses it only while those
settings, and those of the stages it was built from, are unchanged.

    OMP_NUM_THREADS=1 python scripts/benchmark_slimflow.py --threads 1 \\
        --feature-checkpoint /work/bench_pruning/dense --output /tmp/bench_slimflow
"""

import argparse
import copy
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["LEANLIGHT_ROOT"] = str(ROOT)

from diffusion.frechet import (  # noqa: E402
    frechet_distance_to_reference,
    load_feature_network,
    reference_statistics,
)
from diffusion.rectified_flow import (  # noqa: E402
    T_EPSILON,
    euler_sample,
    network_velocity,
    rectified_flow_loss,
    rk45_sample,
    sample_time,
)
from diffusion.reflow_pairs import ReflowPairDataset, generate_reflow_pairs  # noqa: E402
from diffusion.slimflow import (  # noqa: E402
    anneal_noise,
    annealing_beta,
    describe_distance,
    flow_guidance_loss,
    flow_guidance_target,
    joint_horizontal_flip,
    make_distance,
    paired_distillation_loss,
    sample_t_prime,
)
from lightning_modules.data import CIFAR10DataModule  # noqa: E402
from lightning_modules.diffusion import EMA  # noqa: E402
from models import create_model  # noqa: E402
from models.unet import MIN_GROUP_CHANNELS  # noqa: E402

log = logging.getLogger("benchmark_slimflow")

SHARED_CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


# ---------------------------------------------------------------------------------------
# Data


def downsample(images: np.ndarray, resolution: int) -> torch.Tensor:
    """Return uint8 ``(N, H, W, C)`` images as floats in [-1, 1], ``(N, C, r, r)``, area-downsampled."""
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if tensor.shape[-1] != resolution:
        tensor = F.interpolate(tensor, size=(resolution, resolution), mode="area")
    return tensor


def to_feature_resolution(images: torch.Tensor) -> torch.Tensor:
    """Upsample images in [-1, 1] to 32x32 (bilinear) and clamp, for the ResNet-20 features."""
    if images.shape[-1] != 32:
        images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    return images.clamp(-1.0, 1.0)


def load_cifar10(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, CIFAR10DataModule]:
    """Return the training subset and the test images at the working resolution, and the data module."""
    datamodule = CIFAR10DataModule(path=str(SHARED_CIFAR10), cache_dir=str(args.cache_dir))
    data = datamodule.load_data()
    generator = np.random.default_rng(args.seed)
    indices = generator.permutation(len(data.train_images))[: args.train_subset]
    train = downsample(data.train_images[np.sort(indices)], args.resolution)
    test = downsample(data.test_images, args.resolution)
    return train, test, datamodule


# ---------------------------------------------------------------------------------------
# Networks and training


def build_unet(width: int, min_group_channels: int) -> nn.Module:
    """Return the benchmark's UNet: multipliers 1,2,2, one block per level, attention only in the middle."""
    return create_model(
        "unet",
        3,
        10,
        base_channels=width,
        channel_multipliers=[1, 2, 2],
        num_res_blocks=1,
        attention_levels=[],
        dropout=0.0,
        resample="conv",
        middle_attention=True,
        min_group_channels=min_group_channels,
    )


def count_parameters(net: nn.Module) -> int:
    return sum(parameter.numel() for parameter in net.parameters())


def train_loop(
    net: nn.Module, steps: int, loss_of_step: Any, args: argparse.Namespace, label: str
) -> tuple[EMA, dict[str, Any]]:
    """Train ``net`` with Adam and linear warm-up for ``steps`` steps; return its EMA and a record."""
    ema = EMA(net, args.ema_decay)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    warmup = max(1, int(args.warmup_fraction * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    net.train()
    start = time.perf_counter()
    losses = []
    for step in range(steps):
        loss = loss_of_step(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        ema.update(net)
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 10) == 0:
            log.info(
                "%s step %d/%d loss %.4f (%.0f s)",
                label,
                step + 1,
                steps,
                np.mean(losses[-20:]),
                time.perf_counter() - start,
            )
    ema.model.eval()
    return ema, {"steps": steps, "final_loss": float(np.mean(losses[-50:])), "seconds": time.perf_counter() - start}


def train_teacher(train: torch.Tensor, args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    net = build_unet(args.teacher_width, args.min_group_channels)
    generator = torch.Generator().manual_seed(args.seed)
    velocity = network_velocity(net)

    def loss_of_step(step: int) -> torch.Tensor:
        indices = torch.randint(0, len(train), (args.batch_size,), generator=generator)
        x1 = train[indices]
        if torch.rand((), generator=generator).item() < 0.5:
            x1 = x1.flip(-1)
        z0 = torch.randn(x1.shape, generator=generator)
        return rectified_flow_loss(velocity, z0, x1, sample_time(len(x1), generator=generator))

    ema, record = train_loop(net, args.teacher_steps, loss_of_step, args, "teacher")
    return ema.model, record


def train_reflow(
    pairs: ReflowPairDataset, args: argparse.Namespace, annealing: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a student from scratch on the pairs: Annealing Reflow, or plain reflow (beta = 0, no flips)."""
    torch.manual_seed(args.seed + 10)
    net = build_unet(args.student_width, args.min_group_channels)
    generator = torch.Generator().manual_seed(args.seed + 11)
    velocity = network_velocity(net)
    anneal_steps = int(args.anneal_fraction * args.reflow_steps) if annealing else 0

    def loss_of_step(step: int) -> torch.Tensor:
        indices = torch.randint(0, len(pairs), (args.batch_size,), generator=generator)
        z0, x1 = pairs.z0[indices], pairs.x1[indices]
        if annealing:
            x1, z0 = joint_horizontal_flip(x1, z0, 0.5, generator)
            beta = annealing_beta(step, anneal_steps, "linear")
            z0 = anneal_noise(z0, beta, torch.randn(z0.shape, generator=generator))
        return rectified_flow_loss(velocity, z0, x1, sample_time(len(x1), generator=generator))

    label = "annealing reflow" if annealing else "plain reflow"
    ema, record = train_loop(net, args.reflow_steps, loss_of_step, args, label)
    record["anneal_steps"] = anneal_steps
    return ema.model, record


def train_distillation(
    reflow_model: nn.Module, pairs: ReflowPairDataset, args: argparse.Namespace, flow_guided: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """Distil the reflow student to one step: both terms (Flow-Guided), or term 1 only (plain)."""
    net = copy.deepcopy(reflow_model).requires_grad_(True)
    guide = copy.deepcopy(reflow_model).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(args.seed + 20)
    distance = make_distance(args.distance)
    student, guide_velocity = network_velocity(net), network_velocity(guide)

    def loss_of_step(step: int) -> torch.Tensor:
        indices = torch.randint(0, len(pairs), (args.batch_size,), generator=generator)
        loss = paired_distillation_loss(student, pairs.z0[indices], pairs.x1[indices], distance)
        if flow_guided:
            noise = torch.randn(pairs.z0[indices].shape, generator=generator)
            t_prime = sample_t_prime(len(noise), *T_PRIME_RANGE, generator)
            loss = loss + flow_guidance_loss(student, guide_velocity, noise, t_prime, distance)
        return loss

    label = "flow-guided distillation" if flow_guided else "plain distillation"
    ema, record = train_loop(net, args.distill_steps, loss_of_step, args, label)
    return ema.model, record


# ---------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def generate(net: nn.Module, num_samples: int, num_steps: int, args: argparse.Namespace) -> torch.Tensor:
    """Return ``num_samples`` Euler samples in [-1, 1] from the fixed evaluation noise (seed 12345)."""
    noise = torch.randn(
        (num_samples, 3, args.resolution, args.resolution), generator=torch.Generator().manual_seed(12345)
    )
    velocity = network_velocity(net.eval())
    batches = [euler_sample(velocity, noise[i : i + 250], num_steps) for i in range(0, num_samples, 250)]
    return torch.cat(batches).clamp(-1.0, 1.0)


@torch.no_grad()
def guidance_targets(student: nn.Module, guide: nn.Module, num_samples: int, args: argparse.Namespace) -> torch.Tensor:
    """Return term 2's targets in [-1, 1] for the evaluation noise, with t' ~ U(0.2, 0.8) from a fixed seed."""
    noise = torch.randn(
        (num_samples, 3, args.resolution, args.resolution), generator=torch.Generator().manual_seed(12345)
    )
    t_prime = sample_t_prime(num_samples, *T_PRIME_RANGE, torch.Generator().manual_seed(12346))
    student_velocity, guide_velocity = network_velocity(student.eval()), network_velocity(guide.eval())
    batches = []
    for start in range(0, num_samples, 250):
        z0 = noise[start : start + 250]
        velocity = student_velocity(z0, torch.full((len(z0),), T_EPSILON))
        batches.append(flow_guidance_target(guide_velocity, z0, velocity, t_prime[start : start + 250]))
    return torch.cat(batches).clamp(-1.0, 1.0)


@torch.no_grad()
def generate_rk45(
    net: nn.Module, num_samples: int, tolerance: float, args: argparse.Namespace
) -> tuple[torch.Tensor, float]:
    """Return RK45 samples from the evaluation noise of :func:`generate` and the mean evaluations per batch."""
    noise = torch.randn(
        (num_samples, 3, args.resolution, args.resolution), generator=torch.Generator().manual_seed(12345)
    )
    velocity = network_velocity(net.eval())
    solutions = [rk45_sample(velocity, noise[i : i + 250], tolerance, tolerance) for i in range(0, num_samples, 250)]
    evaluations = statistics.mean(solution.num_evaluations for solution in solutions)
    return torch.cat([solution.x1 for solution in solutions]).clamp(-1.0, 1.0), evaluations


def measure_images_per_second(
    net: nn.Module, args: argparse.Namespace, num_steps: int = 1, rk45_tolerance: float | None = None
) -> float:
    """Return the median images per second over three timed runs of a 256-image batch.

    The batch is sampled with ``num_steps`` Euler steps, or with RK45 at ``rk45_tolerance``.
    """
    velocity = network_velocity(net.eval())
    noise = torch.randn(256, 3, args.resolution, args.resolution)

    def solve(batch: torch.Tensor) -> torch.Tensor:
        if rk45_tolerance is None:
            return euler_sample(velocity, batch, num_steps)
        return rk45_sample(velocity, batch, rk45_tolerance, rk45_tolerance).x1

    rates = []
    with torch.no_grad():
        solve(noise[:8])
        for _ in range(3):
            start = time.perf_counter()
            solve(noise)
            rates.append(len(noise) / (time.perf_counter() - start))
    return statistics.median(rates)


# The arguments each stage's result depends on. A stage stored in --output is reused only
# while these, and those of the stages it was built from, are unchanged.
TEACHER_SETTINGS = (
    "seed",
    "resolution",
    "train_subset",
    "teacher_width",
    "batch_size",
    "lr",
    "warmup_fraction",
    "ema_decay",
    "teacher_steps",
    "min_group_channels",
)
PAIR_SETTINGS = ("num_pairs", "pair_steps")
# The range of t' in Flow-Guided Distillation's term 2, SlimFlow's default.
T_PRIME_RANGE = (0.2, 0.8)
STUDENT_SETTINGS = ("student_width", "reflow_steps", "anneal_fraction", "distill_steps", "distance")
EVALUATION_SETTINGS = ("num_samples", "feature_checkpoint")


def stage_key(args: argparse.Namespace, names: tuple[str, ...], built_from: dict[str, Any] | None = None) -> dict:
    """Return the settings ``names`` of ``args`` as JSON values, with the key of the stage it was built from."""
    key: dict[str, Any] = {}
    for name in names:
        value = getattr(args, name)
        key[name] = str(value) if isinstance(value, Path) else value
    if built_from is not None:
        key["built_from"] = built_from
    return key


def stage_keys(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Return the keys of the teacher, the reflow pairs and the students (each student adds its arm)."""
    teacher = stage_key(args, TEACHER_SETTINGS)
    pairs = stage_key(args, PAIR_SETTINGS, teacher)
    students = stage_key(args, STUDENT_SETTINGS, pairs)
    return {"teacher": teacher, "pairs": pairs, "students": students}


def stored_matches(path: Path, key: dict[str, Any], stage: str) -> bool:
    """Return whether the JSON file at ``path`` was written for ``key``.

    A file written for another key is logged, because its stage is then made again.
    """
    if not path.is_file():
        return False
    stored = json.loads(path.read_text()).get("key")
    if stored == key:
        return True
    log.info("%s in %s was made with different settings, so it is made again", stage, path.parent)
    return False


def cached(path: Path, compute: Any, key: dict[str, Any]) -> dict[str, Any]:
    """Return the record stored at ``path`` for ``key``, or compute it, store it with ``key`` and return it."""
    if stored_matches(path, key, path.stem):
        return json.loads(path.read_text())["value"]
    record = compute()
    path.write_text(json.dumps({"key": key, "value": record}, indent=2) + "\n")
    return record


# ---------------------------------------------------------------------------------------
# Main


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    output = args.output
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    train, test, datamodule = load_cifar10(args)
    feature_network = load_feature_network(args.feature_checkpoint, datamodule.mean, datamodule.std)
    reference_images = to_feature_resolution(test)
    reference_uint8 = (
        ((reference_images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    )
    reference_label = f"CIFAR-10 (JPEG copy) test at {args.resolution}x{args.resolution}"
    reference = reference_statistics(reference_uint8, feature_network, reference_label, args.cache_dir)

    def fd_of(images: torch.Tensor) -> float:
        result = frechet_distance_to_reference(
            to_feature_resolution(images), feature_network, reference, reference_label
        )
        return result.value

    # The data set lists images class by class, so the floor uses a random draw, not the first images.
    floor_indices = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.num_samples]
    floor_key = stage_key(args, ("seed", "resolution", "train_subset", *EVALUATION_SETTINGS))
    data_floor = cached(output / "data_floor.json", lambda: {"fd": fd_of(train[floor_indices])}, floor_key)

    # Teacher
    keys = stage_keys(args)
    teacher_key = keys["teacher"]
    teacher_path = output / "teacher.pt"
    if teacher_path.is_file() and stored_matches(output / "teacher.json", teacher_key, "the teacher"):
        teacher = build_unet(args.teacher_width, args.min_group_channels)
        teacher.load_state_dict(torch.load(teacher_path, weights_only=True))
        teacher_record = json.loads((output / "teacher.json").read_text())["record"]
    else:
        teacher, teacher_record = train_teacher(train, args)
        torch.save(teacher.state_dict(), teacher_path)
        (output / "teacher.json").write_text(
            json.dumps({"key": teacher_key, "record": teacher_record}, indent=2) + "\n"
        )
    teacher.eval()

    # Pairs
    teacher_velocity = network_velocity(teacher)
    if args.pair_steps > 0:
        solver = f"Euler {args.pair_steps} steps"

        def teacher_map(z0: torch.Tensor) -> torch.Tensor:
            return euler_sample(teacher_velocity, z0, args.pair_steps)
    else:
        solver = "RK45 rtol=atol=1e-5"

        def teacher_map(z0: torch.Tensor) -> torch.Tensor:
            return rk45_sample(teacher_velocity, z0).x1

    # Shards of another teacher or solver would pass the pair generator's own checks of seed and shape.
    pairs_key = keys["pairs"]
    pairs_key_path = output / "pairs_key.json"
    if (output / "pairs").exists() and not stored_matches(pairs_key_path, pairs_key, "the reflow pairs"):
        shutil.rmtree(output / "pairs")
    pairs_key_path.write_text(json.dumps({"key": pairs_key}, indent=2) + "\n")

    pair_start = time.perf_counter()
    generate_reflow_pairs(
        teacher_map,
        output / "pairs",
        args.num_pairs,
        shard_size=500,
        image_shape=(3, args.resolution, args.resolution),
        base_seed=args.seed + 1000,
        batch_size=250,
        description={"teacher": str(teacher_path), "solver": solver},
    )
    pair_seconds = time.perf_counter() - pair_start
    pairs = ReflowPairDataset(output / "pairs")

    # Students
    arms = {}
    arm_stages = [("slimflow", True, True), ("baseline", False, False)]
    if args.ablation:
        arm_stages.append(("annealing_plain", True, False))
    for arm, annealing, flow_guided in arm_stages:
        model_path = output / f"{arm}_student.pt"
        record_path = output / f"{arm}.json"
        student_key = {**keys["students"], "arm": arm}
        if model_path.is_file() and stored_matches(record_path, student_key, f"the {arm} student"):
            student = build_unet(args.student_width, args.min_group_channels)
            student.load_state_dict(torch.load(model_path, weights_only=True))
            arms[arm] = {"net": student.eval(), "record": json.loads(record_path.read_text())["record"]}
            continue
        reflow_model, reflow_record = train_reflow(pairs, args, annealing=annealing)
        # Stored with the student's key: a run killed during distillation leaves a new reflow
        # model beside an older student, which must not serve as that student's guide.
        torch.save({"key": student_key, "state_dict": reflow_model.state_dict()}, output / f"{arm}_reflow.pt")
        student, distill_record = train_distillation(reflow_model, pairs, args, flow_guided=flow_guided)
        record = {"reflow": reflow_record, "distillation": distill_record}
        record["fd_reflow_one_step"] = fd_of(generate(reflow_model, args.num_samples, 1, args))
        torch.save(student.state_dict(), model_path)
        record_path.write_text(json.dumps({"key": student_key, "record": record}, indent=2) + "\n")
        arms[arm] = {"net": student.eval(), "record": record}

    # Frechet distances
    def teacher_fd() -> dict[str, Any]:
        return {
            str(steps): fd_of(generate(teacher, args.num_samples, steps, args)) for steps in args.teacher_step_counts
        }

    teacher_fd_key = stage_key(args, (*EVALUATION_SETTINGS, "teacher_step_counts"), teacher_key)
    teacher_fds = cached(output / "teacher_fd.json", teacher_fd, teacher_fd_key)

    # The teacher's adaptive solver, the multi-step sampling a rectified flow is usually evaluated with.
    def teacher_rk45_fd() -> dict[str, Any]:
        images, evaluations = generate_rk45(teacher, args.num_samples, args.teacher_rk45_tolerance, args)
        return {"tolerance": args.teacher_rk45_tolerance, "fd": fd_of(images), "mean_evaluations": evaluations}

    teacher_rk45 = None
    if args.teacher_rk45_tolerance:
        rk45_path = output / f"teacher_rk45_fd_tol{args.teacher_rk45_tolerance:g}.json"
        rk45_key = stage_key(args, (*EVALUATION_SETTINGS, "teacher_rk45_tolerance"), teacher_key)
        teacher_rk45 = cached(rk45_path, teacher_rk45_fd, rk45_key)
    student_fds = {arm: fd_of(generate(entry["net"], args.num_samples, 1, args)) for arm, entry in arms.items()}

    # What each distillation term pulls the SlimFlow student towards, measured like the samples.
    reflow_path = output / "slimflow_reflow.pt"
    stored_reflow = torch.load(reflow_path, weights_only=True) if reflow_path.is_file() else None

    def target_fds() -> dict[str, Any]:
        guide = build_unet(args.student_width, args.min_group_channels)
        guide.load_state_dict(stored_reflow["state_dict"])
        guide.eval()
        return {
            "term1_pairs": fd_of(pairs.x1[: args.num_samples].clamp(-1.0, 1.0)),
            "term2_at_start": fd_of(guidance_targets(guide, guide, args.num_samples, args)),
            "term2_at_end": fd_of(guidance_targets(arms["slimflow"]["net"], guide, args.num_samples, args)),
            "guide_euler_2_steps": fd_of(generate(guide, args.num_samples, 2, args)),
        }

    slimflow_key = {**keys["students"], "arm": "slimflow"}
    targets = None
    if stored_reflow is not None and stored_reflow.get("key") == slimflow_key:
        target_key = {**slimflow_key, **stage_key(args, EVALUATION_SETTINGS)}
        targets = cached(output / "distillation_targets.json", target_fds, target_key)
    else:
        log.info(
            "no slimflow_reflow.pt in %s made with this run's settings, so the distillation targets are not measured; "
            "delete slimflow_student.pt to train the SlimFlow student again and measure them",
            output,
        )
    best_steps = min(teacher_fds, key=lambda steps: teacher_fds[steps])

    speed = {
        "student_one_step": measure_images_per_second(arms["slimflow"]["net"], args, num_steps=1),
        f"teacher_{best_steps}_steps": measure_images_per_second(teacher, args, num_steps=int(best_steps)),
    }
    if teacher_rk45 is not None:
        speed["teacher_rk45"] = measure_images_per_second(teacher, args, rk45_tolerance=teacher_rk45["tolerance"])

    results = {
        "command": " ".join(sys.argv),
        "budget": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "metric": (
            f"FD-ResNet20 ({args.num_samples} samples) against {reference_label} (10,000 images), "
            f"both upsampled to 32x32 bilinear; feature network {args.feature_checkpoint}"
        ),
        "distance": describe_distance(args.distance),
        "pair_solver": solver,
        "pair_seconds": pair_seconds,
        "parameters": {
            "teacher": count_parameters(teacher),
            "student": count_parameters(arms["slimflow"]["net"]),
        },
        "teacher": {
            "training": teacher_record,
            "fd_by_euler_steps": teacher_fds,
            "best_steps": int(best_steps),
            "rk45": teacher_rk45,
        },
        **{arm: {"fd_one_step": student_fds[arm], **entry["record"]} for arm, entry in arms.items()},
        "distillation_target_fds": targets,
        "data_floor_fd": data_floor["fd"],
        "images_per_second": speed,
        "threads": args.threads,
        "wall_seconds_this_run": time.perf_counter() - started,
    }
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (output / "results.md").write_text(format_markdown(results) + "\n")
    return results


def format_markdown(results: dict[str, Any]) -> str:
    parameters = results["parameters"]
    teacher = results["teacher"]
    lines = [
        f"Metric: {results['metric']}. Distillation distance: {results['distance']}. "
        f"Reflow pairs: {results['budget']['num_pairs']} from the teacher with {results['pair_solver']}.",
        "",
        "| generator | parameters | steps | FD-ResNet20 |",
        "|---|---|---|---|",
    ]
    for steps, value in teacher["fd_by_euler_steps"].items():
        lines.append(f"| teacher (1-rectified flow), Euler | {parameters['teacher']:,} | {steps} | {value:.2f} |")
    if teacher.get("rk45"):
        rk45 = teacher["rk45"]
        lines.append(
            f"| teacher (1-rectified flow), RK45 rtol=atol={rk45['tolerance']:g} | {parameters['teacher']:,} | "
            f"{rk45['mean_evaluations']:.0f} (mean) | {rk45['fd']:.2f} |"
        )
    lines.append(
        f"| SlimFlow student (annealing reflow + flow-guided distillation) | {parameters['student']:,} | 1 | "
        f"{results['slimflow']['fd_one_step']:.2f} |"
    )
    lines.append(
        f"| baseline student (plain reflow + one-step distillation) | {parameters['student']:,} | 1 | "
        f"{results['baseline']['fd_one_step']:.2f} |"
    )
    if "annealing_plain" in results:
        lines.append(
            f"| ablation student (annealing reflow + one-step distillation) | {parameters['student']:,} | 1 | "
            f"{results['annealing_plain']['fd_one_step']:.2f} |"
        )
    lines.append(
        f"| SlimFlow student before distillation (annealing reflow) | {parameters['student']:,} | 1 | "
        f"{results['slimflow']['fd_reflow_one_step']:.2f} |"
    )
    lines.append(
        f"| baseline student before distillation (plain reflow) | {parameters['student']:,} | 1 | "
        f"{results['baseline']['fd_reflow_one_step']:.2f} |"
    )
    lines.append(f"| training images (data floor at this sample count) | - | - | {results['data_floor_fd']:.2f} |")
    targets = results.get("distillation_target_fds")
    if targets:
        lines += [
            "",
            "What the SlimFlow distillation pulls towards (FD-ResNet20 of each term's targets):",
            f"term 1, the teacher's pairs {targets['term1_pairs']:.2f}; "
            f"term 2 with the guide, at the start {targets['term2_at_start']:.2f} "
            f"and at the end {targets['term2_at_end']:.2f}; "
            f"the guide alone with 2 Euler steps {targets['guide_euler_2_steps']:.2f}.",
        ]
    lines.append("")
    speed = results["images_per_second"]
    lines.append(
        "Images per second (batch 256, "
        + f"{results['threads']} thread(s)): "
        + ", ".join(f"{name} {rate:.1f}" for name, rate in speed.items())
    )
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feature-checkpoint", type=Path, required=True, help="CIFAR-10 ResNet-20 run folder or .ckpt")
    parser.add_argument("--output", type=Path, default=Path("/tmp/benchmark_slimflow"), help="results folder")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache", help="decoded-data and statistics cache")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=16, help="working image size in pixels (32 or 16)")
    parser.add_argument("--train-subset", type=int, default=10000, help="training images of the teacher")
    parser.add_argument("--teacher-width", type=int, default=32, help="UNet base width of the teacher")
    parser.add_argument("--student-width", type=int, default=16, help="UNet base width of both students")
    parser.add_argument(
        "--min-group-channels",
        type=int,
        default=MIN_GROUP_CHANNELS,
        help="channels per GroupNorm group at the least in every UNet (1: the rule of runs before the minimum existed)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of every stage")
    parser.add_argument("--warmup-fraction", type=float, default=0.05, help="linear warm-up, fraction of each stage")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--num-pairs", type=int, default=3000)
    parser.add_argument("--pair-steps", type=int, default=8, help="Euler steps of the teacher per pair; 0 for RK45")
    parser.add_argument("--reflow-steps", type=int, default=400, help="reflow steps of each student")
    parser.add_argument("--anneal-fraction", type=float, default=0.4, help="beta reaches 0 after this fraction")
    parser.add_argument("--distill-steps", type=int, default=300, help="distillation steps of each student")
    parser.add_argument("--distance", default="pseudo_huber", choices=["pseudo_huber", "l2"])
    parser.add_argument("--num-samples", type=int, default=1000, help="samples per Frechet distance")
    parser.add_argument(
        "--teacher-step-counts", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="Euler steps tried for the teacher"
    )
    parser.add_argument(
        "--teacher-rk45-tolerance",
        type=float,
        default=1e-3,
        help="rtol and atol of the teacher's RK45 arm (FD and speed); 0 skips it",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also train annealing reflow + one-step distillation (term 1 only)",
    )
    return parser.parse_args(argv)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_arguments()
    results = run(args)
    print(format_markdown(results))
    print(f"results in {args.output / 'results.json'}")


if __name__ == "__main__":
    main()
