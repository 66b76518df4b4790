"""IIR-SNN on CIFAR-10: accuracy from T=5 down to T=1, direct T=1 training, energy and CPU latency.

Every arm uses ``experiment=iir_snn_vgg11_cifar10_cpu`` (a half-width VGG-11) and the
same budget, set by the options below and printed with the table:

- ``iir``: the whole pipeline. The ANN trains for ``--ann-epochs``, is converted, and
  retrains for ``--snn-epochs`` at each T of ``--timesteps``, every stage starting from
  the previous one.
- ``direct``: the same converted ANN (the ``iir`` arm's ANN weights) trains at T=1 only,
  for as many epochs as the ``iir`` arm's spiking stages took together. IIR-SNN's
  authors report that this fails to converge. The arm shows what happens at this budget.
- ``latency``: CPU inference time of the ``iir`` arm's T=1 network against its network at
  the first T (median of ``--rounds`` timed batches, the networks alternating so that
  load from other processes affects both alike), and of the ANN for reference.
- ``report``: the table from ``<output>/<arm>.json`` with the goals: T=1 within 2 points
  of T=5, ANN/SNN energy >= 10x at T=1, T=1 at least 4x faster than T=5.

The energy is the estimate of :mod:`snn.stats` (45 nm constants), not a measurement.

    python scripts/benchmark_iir_snn.py --arm iir --arm direct --arm latency --arm report \\
        --threads 1 --output /tmp/bench_iir_snn
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["LEANLIGHT_ROOT"] = str(ROOT)

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from lightning_modules.iir_snn import IIRSNNPipeline, stage_name  # noqa: E402
from lightning_modules.pipeline import STATE_FILE, PipelineState, load_stage_weights  # noqa: E402

ARMS = ("iir", "direct", "latency")
EXPERIMENT = "iir_snn_vgg11_cifar10_cpu"


def budget_overrides(args: argparse.Namespace) -> list[str]:
    """Return the overrides shared by every arm: data subset, epochs, test batches, logger."""
    overrides = [
        f"experiment={EXPERIMENT}",
        "trainer.accelerator=cpu",
        "logger=csv",
        f"data.train_subset={args.train_subset}",
        f"module.ann.max_epochs={args.ann_epochs}",
        f"module.snn.max_epochs={args.snn_epochs}",
        f"module.snn.statistics_batches={args.statistics_batches}",
        f"seed={args.seed}",
    ]
    if args.test_batches is not None:
        overrides.append(f"trainer.limit_test_batches={args.test_batches}")
    return overrides + list(args.override)


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=overrides)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def timesteps_override(timesteps: list[int]) -> str:
    return "module.timesteps=[" + ",".join(str(value) for value in timesteps) + "]"


def run_iir(args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """Run the whole pipeline, ANN to the last T, and return its stage table."""
    from lightning_modules.training import train

    run_dir = output / "iir"
    overrides = budget_overrides(args) + [timesteps_override(args.timesteps)]
    start = time.perf_counter()
    train(compose_config(overrides, run_dir))
    wall = time.perf_counter() - start
    return {"arm": "iir", "wall_s": wall, "run_dir": str(run_dir), "overrides": overrides, **stage_table(run_dir)}


def run_direct(args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """Train the ``iir`` arm's converted ANN at T=1 for the epochs of all its spiking stages."""
    from lightning_modules.training import train

    iir_dir = output / "iir"
    ann_checkpoint = finished_checkpoint(iir_dir, "ann")
    epochs = args.snn_epochs * len(args.timesteps)
    run_dir = output / "direct"
    overrides = budget_overrides(args) + [
        timesteps_override([1]),
        f"module.snn.max_epochs={epochs}",
        f"module.ann_checkpoint={ann_checkpoint}",
        "task_name=iir_snn_direct_t1",
    ]
    start = time.perf_counter()
    train(compose_config(overrides, run_dir))
    wall = time.perf_counter() - start
    return {
        "arm": "direct",
        "epochs_at_t1": epochs,
        "wall_s": wall,
        "run_dir": str(run_dir),
        "overrides": overrides,
        **stage_table(run_dir),
    }


def finished_checkpoint(run_dir: Path, stage: str) -> Path:
    state = json.loads((run_dir / STATE_FILE).read_text())
    record = state["stages"].get(stage) or {}
    if not record.get("finished"):
        raise RuntimeError(f"stage {stage} of {run_dir} has not finished: run --arm iir first")
    path = Path(record["checkpoint"])
    return path if path.is_absolute() else run_dir / path


def stage_table(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "iir_snn_stages.json").read_text())


def measure_latency(args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """Time the ``iir`` arm's networks at T=1 and at the first T, and the ANN, on one batch of test images."""
    run_dir = output / "iir"
    overrides = budget_overrides(args) + [timesteps_override(args.timesteps), f"ckpt_path={run_dir}"]
    cfg = compose_config(overrides, output / "latency")
    pipeline = IIRSNNPipeline(cfg)
    names = [stage.name for stage in pipeline.stages()]
    pipeline.state = PipelineState.open(pipeline.folder / STATE_FILE, pipeline.name, names, pipeline.recorded_config())

    first, last = args.timesteps[0], args.timesteps[-1]
    networks: dict[str, torch.nn.Module] = {"ann": pipeline.trained_ann()}
    for timesteps in (first, last):
        module = pipeline.build_spiking_module(pipeline.spiking_network_skeleton(timesteps))
        module.load_state_dict(load_stage_weights(pipeline.stage_checkpoint(stage_name(timesteps))))
        networks[f"T{timesteps}"] = module.network.eval()

    images, _ = next(iter(pipeline.datamodule.test_dataloader()))
    images = images[: args.latency_batch]
    times: dict[str, list[float]] = {name: [] for name in networks}
    with torch.inference_mode():
        for network in networks.values():
            network(images)
        for _ in range(args.rounds):
            for name, network in networks.items():
                start = time.perf_counter()
                network(images)
                times[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "arm": "latency",
        "batch_size": len(images),
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "median_s": medians,
        "speedup_t1_over_first": medians[f"T{first}"] / medians[f"T{last}"],
    }


def format_report(output: Path) -> str:
    results = {
        arm: json.loads((output / f"{arm}.json").read_text()) for arm in ARMS if (output / f"{arm}.json").is_file()
    }
    if "iir" not in results:
        return f"no results in {output}: run --arm iir first"

    iir = results["iir"]
    lines = [
        f"IIR-SNN, {EXPERIMENT}; budget overrides: {' '.join(iir['overrides'][1:])}",
        f"energy constants: {iir['energy_constants']}",
        "",
        "| arm | stage | T | test acc % | spike rate | est. energy uJ | ANN/SNN energy |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ("iir", "direct"):
        for row in results.get(arm, {}).get("stages", []):
            lines.append(
                f"| {arm} | {row['stage']} | {row.get('timesteps') or '-'} | {100 * row['accuracy']:.2f} | "
                f"{_number(row.get('spike_rate'))} | {_number(row.get('energy_uj'))} | "
                f"{_number(row.get('energy_ratio'))} |"
            )

    by_stage = {row["stage"]: row for row in iir["stages"]}
    first, last = f"T{iir['stages'][2]['timesteps']}", f"T{iir['stages'][-1]['timesteps']}"
    gap = 100 * (by_stage[first]["accuracy"] - by_stage[last]["accuracy"])
    ratio = by_stage[last].get("energy_ratio")
    lines += [
        "",
        f"{first} -> {last} accuracy drop: {gap:.2f} points (goal <= 2): {'met' if gap <= 2 else 'NOT met'}",
        f"ANN/SNN estimated energy at {last}: {_number(ratio)}x (goal >= 10): "
        f"{'met' if ratio and ratio >= 10 else 'NOT met'}",
    ]
    if "direct" in results:
        direct_row = results["direct"]["stages"][-1]
        lines.append(
            f"direct T=1 training for {results['direct']['epochs_at_t1']} epochs: "
            f"{100 * direct_row['accuracy']:.2f} % against {100 * by_stage[last]['accuracy']:.2f} % through IIR"
        )
    if "latency" in results:
        latency = results["latency"]
        medians = ", ".join(f"{name} {1000 * value:.1f} ms" for name, value in latency["median_s"].items())
        speedup = latency["speedup_t1_over_first"]
        lines.append(
            f"CPU latency, batch {latency['batch_size']}, {latency['threads']} thread(s), median of "
            f"{latency['rounds']}: {medians}; {first}/{last} = {speedup:.2f}x (goal >= 4): "
            f"{'met' if speedup >= 4 else 'NOT met'}"
        )
    return "\n".join(lines)


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", choices=[*ARMS, "report"], required=True)
    parser.add_argument("--output", type=Path, required=True, help="folder of the runs and <arm>.json results")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[5, 4, 3, 2, 1])
    parser.add_argument("--ann-epochs", type=int, default=15)
    parser.add_argument("--snn-epochs", type=int, default=5, help="epochs of each spiking stage of the iir arm")
    parser.add_argument("--train-subset", type=int, default=10000, help="class-stratified training images")
    parser.add_argument("--test-batches", type=int, default=None, help="test batches per stage; default all")
    parser.add_argument("--statistics-batches", type=int, default=40, help="test batches on which spikes are counted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default torch's choice")
    parser.add_argument("--rounds", type=int, default=20, help="timed batches per network in the latency arm")
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override for every arm")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    for arm in args.arm:
        if arm == "report":
            report = format_report(args.output)
            (args.output / "report.md").write_text(report + "\n")
            print(report)
            continue
        runner = {"iir": run_iir, "direct": run_direct, "latency": measure_latency}[arm]
        result = runner(args, args.output)
        (args.output / f"{arm}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"[{arm}] written to {args.output / f'{arm}.json'}", flush=True)


if __name__ == "__main__":
    main()
