"""Time-shift sampling against plain sampling: Frechet distance and wall time, per sampler and step count.

One trained DDPM checkpoint (``python train.py module=ddpm ...``) is sampled with DDPM,
DDIM (eta 0) and DPM-Solver++(2M), each at every step count of ``--steps``, with and
without time-shift, for every seed of ``--seeds``. Every configuration is scored by the
Frechet distance of its samples to the training images, in the feature space of the
classifier of ``--feature-checkpoint`` (for example "FD-ResNet20 (256 samples)"), and
timed. The two arms of a configuration run one after the other with the same initial
noise, so load from other processes affects both alike.

Whole sampling runs are too noisy on a shared machine to resolve an overhead of a few
per cent, so the script also times time-shift's own work per step (the variance and the
window argmin) against one network evaluation on the same batch.

The time-shift arm uses ``--placement`` (where the shifted timestep enters each step).
``--placement-steps`` adds, at the step counts it names, the other placements:
``"sample"``, ``"time_input"`` and ``"end_point"`` (see :mod:`diffusion.time_shift`).

``--trace-steps`` records, for each sampler at those step counts, the samples' mean
variance before every step, plain and with time-shift, next to the variance of the
training data noised to that timestep. Samples whose variance exceeds the data's are
noisier than their timestep (the exposure bias that time-shift assumes).

Each result is appended to ``<output>/results.jsonl`` as soon as it is measured, and
configurations already there are skipped, so an interrupted run continues where it
stopped. ``<output>/settings.json`` records what all of them share (the checkpoints,
data, sample count, spacing, cutoff), and a run with other settings stops with an error
rather than mix its results in. ``--report-only`` prints the table and draws the plot
from the results file.

    python scripts/benchmark_time_shift.py --checkpoint logs/ddpm_cifar10_cpu/runs/<time> \\
        --feature-checkpoint logs/cifar10_resnet20/runs/<time> --output /tmp/bench_time_shift
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["LEANLIGHT_ROOT"] = str(ROOT)

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from diffusion.frechet import (  # noqa: E402
    frechet_distance_to_reference,
    load_feature_network,
    reference_data_from_datamodule,
    reference_statistics,
)
from diffusion.time_shift import PLACEMENTS, select_shifted_timesteps  # noqa: E402
from lightning_modules.diffusion import (  # noqa: E402
    SamplerSettings,
    build_sampler,
    generate_samples,
    load_denoiser,
    per_evaluation_flops,
    to_uint8,
)
from lightning_modules.seeds import STEP_NOISE_STREAM, derive_seed  # noqa: E402
from lightning_modules.setup_run import instantiate_user_object, resolve_checkpoint_path  # noqa: E402

SAMPLERS = ("ddpm", "ddim", "dpm_solver")
RESULTS_FILE = "results.jsonl"
COST_FILE = "selection_cost.json"
TRACE_FILE = "variance_trace.json"
SETTINGS_FILE = "settings.json"


def configuration_key(entry: dict[str, Any]) -> tuple:
    return (entry["sampler"], entry["steps"], entry["window"], entry["placement"], entry["seed"])


def load_results(output: Path) -> list[dict[str, Any]]:
    path = output / RESULTS_FILE
    if not path.is_file():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for entry in entries:
        # Files written before the placement option record a boolean, shift_alphabar.
        if "placement" not in entry:
            shift_alphabar = entry.pop("shift_alphabar")
            if entry["window"] == 0:
                entry["placement"] = None
            elif shift_alphabar:
                entry["placement"] = "sample"
            else:
                entry["placement"] = "time_input"
    return entries


def reference_data(data_overrides: list[str]) -> Any:
    """Build the data module of ``configs/data/<name>`` with the overrides, as the DDPM run saw its data."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=data_overrides)
    return instantiate_user_object(cfg.data)


def planned_configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    """List every configuration to measure, the time-shift arms next to their plain arm."""
    plans = []
    for steps in args.steps:
        others = [placement for placement in PLACEMENTS if placement != args.placement]
        placements = [args.placement, *others] if steps in args.placement_steps else [args.placement]
        for seed in args.seeds:
            for sampler in args.samplers:
                plans.append({"sampler": sampler, "steps": steps, "window": 0, "placement": None, "seed": seed})
                for window in args.windows:
                    for placement in placements:
                        plans.append(
                            {"sampler": sampler, "steps": steps, "window": window, "placement": placement, "seed": seed}
                        )
    return plans


def output_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Return the settings that every result in ``--output`` shares, besides its own configuration."""
    return {
        "checkpoint": str(resolve_checkpoint_path(args.checkpoint)),
        "feature_checkpoint": str(args.feature_checkpoint),
        "data_override": args.data_override or ["data=cifar10"],
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "spacing": args.spacing,
        "cutoff": args.cutoff,
        "no_ema": args.no_ema,
    }


def check_output_settings(args: argparse.Namespace) -> None:
    """Record the shared settings in ``--output``, and exit if its results were measured with different ones."""
    path = args.output / SETTINGS_FILE
    settings = output_settings(args)
    if path.is_file():
        stored = json.loads(path.read_text())
        changed = sorted(name for name in settings if stored.get(name) != settings[name])
        if changed:
            raise SystemExit(
                f"{args.output} contains results measured with a different {', '.join(changed)} "
                f"({', '.join(f'{name}={stored.get(name)!r}' for name in changed)}); pass a new --output"
            )
        return
    if (args.output / RESULTS_FILE).is_file():
        print(f"{args.output} has results but no {SETTINGS_FILE}; assuming they were measured with these settings")
    path.write_text(json.dumps(settings, indent=2) + "\n")


def measure(args: argparse.Namespace) -> None:
    args.output.mkdir(parents=True, exist_ok=True)
    check_output_settings(args)
    done = {configuration_key(entry) for entry in load_results(args.output)}
    plans = [plan for plan in planned_configurations(args) if configuration_key(plan) not in done]
    print(f"{len(plans)} configurations to measure, {len(done)} already in {args.output / RESULTS_FILE}", flush=True)
    if not plans and (not args.trace_steps or trace_is_current(args)):
        return

    denoiser = load_denoiser(resolve_checkpoint_path(args.checkpoint), use_ema=not args.no_ema)
    datamodule = reference_data(args.data_override or ["data=cifar10"])
    reference = reference_data_from_datamodule(datamodule, "train")
    if tuple(reference.images.shape[1:]) != (denoiser.image_shape[1], denoiser.image_shape[2], denoiser.image_shape[0]):
        raise ValueError(
            f"the reference images have shape {reference.images.shape[1:]} (H, W, C) but the model makes "
            f"{denoiser.image_shape} (C, H, W); pass the model's data options with --data-override"
        )
    # NOTE: the feature checkpoint does not store its normalisation, so the reference data
    # module's is used; it matches when the classifier trained on the same data options.
    network = load_feature_network(args.feature_checkpoint, reference.mean, reference.std)
    cache_dir = args.cache_dir or ROOT / ".cache"
    reference_stats = reference_statistics(reference.images, network, reference.label, cache_dir, 256, "cpu")
    flops_per_evaluation = per_evaluation_flops(denoiser.net, denoiser.image_shape, "cpu")

    with (args.output / RESULTS_FILE).open("a") as results:
        for plan in plans:
            settings = SamplerSettings(
                name=plan["sampler"],
                num_steps=plan["steps"],
                spacing=args.spacing,
                eta=0.0,
                time_shift={
                    "window": plan["window"],
                    "cutoff": args.cutoff,
                    "placement": plan["placement"] or "sample",
                },
            )
            sampler = build_sampler(settings, denoiser.alphabar, denoiser.prediction_type)
            start = time.perf_counter()
            samples, evaluations = generate_samples(
                denoiser.net,
                sampler,
                settings,
                denoiser.image_shape,
                args.num_samples,
                args.batch_size,
                plan["seed"],
                "cpu",
            )
            wall = time.perf_counter() - start
            images = to_uint8(samples).permute(0, 2, 3, 1).numpy()
            frechet = frechet_distance_to_reference(images, network, reference_stats, reference.label, 256, "cpu")
            entry = {
                **plan,
                "cutoff": args.cutoff if plan["window"] else None,
                "spacing": args.spacing,
                "describe": settings.describe(),
                "frechet": frechet.value,
                "metric": frechet.name,
                "num_samples": args.num_samples,
                "wall_s": wall,
                "wall_s_per_image": wall / args.num_samples,
                "evaluations_per_image": evaluations,
                "gflops_per_image": flops_per_evaluation * evaluations / 1e9,
                "brightness_mean": float(np.mean(images) / 255),
                "threads": torch.get_num_threads(),
            }
            results.write(json.dumps(entry) + "\n")
            results.flush()
            print(f"{settings.describe()}, seed {plan['seed']}: {frechet.describe()}, {wall:.1f} s", flush=True)

    measure_variance_traces(args, denoiser, reference.images)


def data_variance(images: np.ndarray) -> float:
    """Return the mean over images of each image's unbiased variance, uint8 ``(N, H, W, C)`` taken to [-1, 1]."""
    variances = []
    for start in range(0, len(images), 4096):
        chunk = torch.from_numpy(images[start : start + 4096]).double() / 127.5 - 1.0
        variances.append(chunk.flatten(1).var(dim=1))
    return float(torch.cat(variances).mean())


@torch.no_grad()
def trace_variance(
    denoiser: Any, settings: SamplerSettings, image_variance: float, num_samples: int, seed: int
) -> list[dict[str, float]]:
    """Sample once and record the samples' mean variance before each step and after the last, with the data's.

    The data's variance at timestep ``t`` is ``alphabar_t * v + 1 - alphabar_t``, the expected
    variance of a training image noised to ``t``, with ``v`` the images' mean variance.
    """
    sample_variances = []

    def recording_net(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sample_variances.append(float(x.flatten(1).var(dim=1).mean()))
        return denoiser.net(x, timesteps)

    sampler = build_sampler(settings, denoiser.alphabar, denoiser.prediction_type)
    shape = (num_samples, *denoiser.image_shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    step_generator = torch.Generator().manual_seed(derive_seed(STEP_NOISE_STREAM, seed, 0))
    denoiser.net.eval()
    output = sampler.sample(
        recording_net, shape, settings.num_steps, settings.spacing, generator=step_generator, noise=noise
    )
    sample_variances.append(float(output.samples.flatten(1).var(dim=1).mean()))

    rows = []
    for timestep, sample_variance in zip([*sampler.timesteps.tolist(), -1], sample_variances, strict=True):
        alphabar = float(sampler.alphabar[timestep]) if timestep >= 0 else 1.0
        rows.append(
            {
                "timestep": timestep,
                "sample_variance": sample_variance,
                "data_variance": alphabar * image_variance + 1.0 - alphabar,
            }
        )
    return rows


def trace_is_current(args: argparse.Namespace) -> bool:
    """Return whether ``--output`` has a variance trace for this ``--placement`` and ``--trace-steps``."""
    path = args.output / TRACE_FILE
    if not path.is_file():
        return False
    stored = json.loads(path.read_text())
    return stored.get("placement") == args.placement and stored.get("trace_steps") == args.trace_steps


def measure_variance_traces(args: argparse.Namespace, denoiser: Any, images: np.ndarray) -> None:
    """Write ``variance_trace.json``: for each sampler and ``--trace-steps``, plain and time-shifted traces."""
    path = args.output / TRACE_FILE
    if not args.trace_steps or trace_is_current(args):
        return
    image_variance = data_variance(images)
    traces = []
    for steps in args.trace_steps:
        for sampler in args.samplers:
            for window in (0, *args.windows):
                settings = SamplerSettings(
                    name=sampler,
                    num_steps=steps,
                    spacing=args.spacing,
                    time_shift={"window": window, "cutoff": args.cutoff, "placement": args.placement},
                )
                rows = trace_variance(denoiser, settings, image_variance, args.num_samples, args.seeds[0])
                traces.append({"describe": settings.describe(), "sampler": sampler, "steps": steps, "rows": rows})
                print(f"variance trace: {settings.describe()}", flush=True)
    record = {
        "placement": args.placement,
        "trace_steps": args.trace_steps,
        "image_variance": image_variance,
        "traces": traces,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


def format_traces(record: dict[str, Any]) -> str:
    """Return one markdown table per trace: timestep, the data's variance and the samples'."""
    lines = [f"Mean variance per sample before each step; the data's images have {record['image_variance']:.4f}."]
    for trace in record["traces"]:
        lines += ["", f"{trace['describe']}:", "", "| timestep | data | samples | ratio |", "|---|---|---|---|"]
        for row in trace["rows"]:
            timestep = row["timestep"] if row["timestep"] >= 0 else "after the last step"
            ratio = row["sample_variance"] / row["data_variance"]
            lines.append(f"| {timestep} | {row['data_variance']:.4f} | {row['sample_variance']:.4f} | {ratio:.3f} |")
    return "\n".join(lines)


def measure_selection_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Time time-shift's per-step work (variance and window argmin) against one network evaluation.

    Both run on the same batch of ``--batch-size`` samples at timestep 500, alternating, and
    the medians are compared. This isolates the extra cost from the noise of timing whole
    sampling runs on a shared machine.
    """
    denoiser = load_denoiser(resolve_checkpoint_path(args.checkpoint), use_ema=not args.no_ema)
    net = denoiser.net.eval()
    sample = torch.randn((args.batch_size, *denoiser.image_shape), generator=torch.Generator().manual_seed(0))
    timesteps = torch.full((args.batch_size,), 500, dtype=torch.int64)
    half_window = max(args.windows) // 2
    selection_times, network_times = [], []
    with torch.inference_mode():
        net(sample, timesteps)
        for _ in range(args.cost_rounds):
            start = time.perf_counter()
            select_shifted_timesteps(sample, denoiser.alphabar, 500 - half_window, 500 + half_window)
            selection_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            net(sample, timesteps)
            network_times.append(time.perf_counter() - start)
    selection, network = statistics.median(selection_times), statistics.median(network_times)
    return {
        "batch_size": args.batch_size,
        "window": 2 * half_window,
        "rounds": args.cost_rounds,
        "threads": torch.get_num_threads(),
        "selection_median_s": selection,
        "network_evaluation_median_s": network,
        "overhead_per_step": selection / network,
    }


def summarise(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group the results by configuration over the seeds: mean and spread of the distance, time-shift's gain."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for entry in entries:
        key = (entry["sampler"], entry["steps"], entry["window"], entry["placement"] or "")
        groups.setdefault(key, []).append(entry)

    rows = []
    for (sampler, steps, window, placement), group in sorted(groups.items()):
        plain = {entry["seed"]: entry for entry in groups.get((sampler, steps, 0, ""), [])}
        paired = [entry for entry in group if entry["seed"] in plain]
        values = [entry["frechet"] for entry in group]
        row = {
            "sampler": sampler,
            "steps": steps,
            "window": window,
            "placement": placement or None,
            "seeds": len(group),
            "frechet_mean": statistics.mean(values),
            "frechet_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "metric": group[0]["metric"],
            "gflops_per_image": group[0]["gflops_per_image"],
        }
        if window and paired:
            gains = [1 - entry["frechet"] / plain[entry["seed"]]["frechet"] for entry in paired]
            # The seeds' ratios of time-shift's wall time to the plain arm's, the arms timed back to back.
            overheads = [entry["wall_s"] / plain[entry["seed"]]["wall_s"] - 1 for entry in paired]
            row["gain_mean"] = statistics.mean(gains)
            row["gain_min"] = min(gains)
            row["improved_seeds"] = sum(gain > 0 for gain in gains)
            row["paired_seeds"] = len(paired)
            row["wall_overhead_median"] = statistics.median(overheads)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], entries: list[dict[str, Any]]) -> str:
    first = entries[0]
    lines = [
        f"{first['metric']} per seed, mean +- std over seeds; spacing {first['spacing']}, "
        f"time-shift cutoff {next((e['cutoff'] for e in entries if e['window']), '-')}",
        "",
        "| sampler | steps | time-shift | FD | gain vs plain (mean, worst seed) | seeds improved "
        "| wall time vs plain (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["window"] == 0:
            arm = "off"
        else:
            arm = f"w={row['window']}, {row['placement']}"
        gain = overhead = improved = "-"
        if "gain_mean" in row:
            gain = f"{100 * row['gain_mean']:+.1f} %, {100 * row['gain_min']:+.1f} %"
            improved = f"{row['improved_seeds']}/{row['paired_seeds']}"
            overhead = f"{100 * row['wall_overhead_median']:+.1f} %"
        lines.append(
            f"| {row['sampler']} | {row['steps']} | {arm} | {row['frechet_mean']:.3f} +- {row['frechet_std']:.3f} "
            f"| {gain} | {improved} | {overhead} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(SAMPLERS), figsize=(4 * len(SAMPLERS), 3.5), sharey=True)
    for axis, sampler in zip(axes, SAMPLERS, strict=True):
        arms = sorted({(row["window"], row["placement"] or "") for row in rows if row["sampler"] == sampler})
        for window, placement in arms:
            selected = [
                row
                for row in rows
                if row["sampler"] == sampler and row["window"] == window and (row["placement"] or "") == placement
            ]
            selected.sort(key=lambda row: row["steps"])
            label = "plain" if window == 0 else f"time-shift w={window}, {placement}"
            axis.errorbar(
                [row["steps"] for row in selected],
                [row["frechet_mean"] for row in selected],
                yerr=[row["frechet_std"] for row in selected],
                marker="o",
                capsize=3,
                label=label,
            )
        axis.set_xscale("log")
        steps = sorted({row["steps"] for row in rows})
        axis.set_xticks(steps, [str(count) for count in steps])
        axis.minorticks_off()
        axis.set_title(sampler)
        axis.set_xlabel("sampling steps")
    axes[0].set_ylabel(rows[0]["metric"] if rows else "Frechet distance")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def report(output: Path) -> None:
    entries = load_results(output)
    if not entries:
        print(f"no results in {output / RESULTS_FILE}")
        return
    rows = summarise(entries)
    table = format_table(rows, entries)
    cost_path = output / COST_FILE
    if cost_path.is_file():
        cost = json.loads(cost_path.read_text())
        table += (
            f"\n\nTime-shift's work per step (variance and argmin over a {cost['window']}-step window) on "
            f"{cost['batch_size']} samples: {1000 * cost['selection_median_s']:.3f} ms against "
            f"{1000 * cost['network_evaluation_median_s']:.1f} ms for one network evaluation "
            f"({100 * cost['overhead_per_step']:.2f} %; medians of {cost['rounds']}, {cost['threads']} thread(s))"
        )
    trace_path = output / TRACE_FILE
    if trace_path.is_file():
        table += "\n\n" + format_traces(json.loads(trace_path.read_text()))
    (output / "report.md").write_text(table + "\n")
    (output / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    print(f"plot: {plot(rows, output / 'frechet_vs_steps.png')}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="DDPM run folder or .ckpt (module=ddpm)")
    parser.add_argument("--feature-checkpoint", help="run folder or .ckpt of a CIFAR ResNet classifier")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument(
        "--data-override",
        action="append",
        default=None,
        help="Hydra override of the model's data, e.g. data=digits or data.downsample_factor=2; default data=cifar10",
    )
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 5, 20, 50], help="measured in this order")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--windows", type=int, nargs="+", default=[40], help="time-shift windows, training timesteps")
    parser.add_argument("--cutoff", type=int, default=300, help="time-shift cutoff, training timesteps")
    parser.add_argument(
        "--placement", choices=PLACEMENTS, default="sample", help="where the shifted timestep enters each step"
    )
    parser.add_argument(
        "--placement-steps", type=int, nargs="*", default=[10], help="step counts that also run the other placements"
    )
    parser.add_argument(
        "--trace-steps", type=int, nargs="*", default=[10], help="step counts whose variance per step is recorded"
    )
    parser.add_argument("--spacing", default="trailing")
    parser.add_argument("--num-samples", type=int, default=256, help="samples per configuration and seed")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--no-ema", action="store_true", help="sample with the trained weights, not the EMA")
    parser.add_argument("--cache-dir", type=Path, default=None, help="reference statistics cache; default .cache")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cost-rounds", type=int, default=30, help="timed rounds of the selection cost")
    parser.add_argument("--report-only", action="store_true")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if any(window <= 0 for window in args.windows):
        raise SystemExit(f"--windows must be positive, got {args.windows}; the plain arm (window 0) always runs")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.report_only:
        if not args.checkpoint or not args.feature_checkpoint:
            raise SystemExit("--checkpoint and --feature-checkpoint are required unless --report-only is given")
        measure(args)
        cost = measure_selection_cost(args)
        (args.output / COST_FILE).write_text(json.dumps(cost, indent=2) + "\n")
    report(args.output)


if __name__ == "__main__":
    main()
