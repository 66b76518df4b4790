"""Polarization pruning against L1-norm filter pruning and the dense network on CIFAR-10, and the real CPU speed-up.

Every arm trains ResNet-20 in one run, under the CPU budget of the dense baseline
``experiment=cifar10_resnet20``: 15 epochs on the 45,000-image training split, batch
128, SGD with Nesterov momentum, lr 0.1 cosine with 1 warm-up epoch and weight decay
5e-4. ``--epochs`` and ``--override`` (for example ``data.train_subset=10000``) change
the budget of every arm alike, and the table prints the budget it was measured at.

- ``dense``: ``experiment=cifar10_resnet20``, the baseline that both pruned arms are
  compared with.
- ``polarization``: ``experiment=polarization_resnet20_cifar10_cpu``; gates train with
  the weights, freeze by half of the run, and the smaller network trains to the end.
- ``l1``: dense training for the first part of the run, the same fraction as the
  polarization arm's latest freeze. Then one-shot removal of the filters with the
  smallest L1 norms to the same FLOPs, with one ratio for every prunable group, and
  fine-tuning on the same schedule to the end.
- ``speed``: CPU inference throughput of each extracted network against the dense
  ResNet-20 (batch 256, channels-last, eval mode, median of several timed runs; the
  two networks alternate so that load from other processes affects both alike).

Each arm writes ``<output>/<arm>.json``; ``report`` prints the table from them. Any
other ``<name>.json`` in the folder (an arm's result copied under a new name, such as a
polarization run with ``--override module.prune_blocks=true``) is timed and reported as
well. The arms can run in parallel processes (``--threads 1`` each):

    for arm in dense polarization l1; do
        python scripts/benchmark_pruning.py --arm $arm --threads 1 --output /tmp/bench &
    done
    wait; python scripts/benchmark_pruning.py --arm speed --arm report --threads 1 --output /tmp/bench
"""

import argparse
import json
import math
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

from lightning_modules.callbacks.flops import count_forward_cost, example_input_of  # noqa: E402
from lightning_modules.classifier import ClassifierModule  # noqa: E402
from models import create_model  # noqa: E402
from pruning import (  # noqa: E402
    build_channel_graph,
    extract_subnetwork,
    l1_norm_keep_masks,
    load_pruned,
    remap_optimizer_state,
    round_kept_channels,
    save_pruned,
)
from pruning.l1 import filter_norms  # noqa: E402

ARMS = ("dense", "polarization", "l1")


class OneShotL1Module(ClassifierModule):
    """The dense classifier that removes its smallest-norm filters once, at the start of ``prune_epoch``.

    The optimizer's momentum is sliced with the weights and the learning-rate schedule
    continues, so fine-tuning is the rest of the same run.
    """

    def __init__(
        self, *args: Any, flops_reduction: float = 0.5, prune_epoch: int = 7, round_to: int = 1, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.flops_reduction = flops_reduction
        self.prune_epoch = prune_epoch
        self.round_to = round_to
        self.pruned = False

    def on_train_epoch_start(self) -> None:
        if not self.pruned and self.current_epoch >= self.prune_epoch:
            self.prune(self.trainer.optimizers)

    def on_train_end(self) -> None:
        if not self.pruned:
            self.prune(self.trainer.optimizers)
        save_pruned(Path(self.trainer.default_root_dir) / "l1_pruned_model.pt", self.net)

    def prune(self, optimizers: list[torch.optim.Optimizer]) -> None:
        graph = build_channel_graph(self.net, example_input_of(self).cpu())
        masks = l1_norm_keep_masks(self.net, graph, self.flops_reduction)
        # The same rounding as the polarization arm, with the filter norms as scores.
        norms = filter_norms(self.net, graph)
        masks = round_kept_channels(graph, norms, masks, self.round_to, self.flops_reduction, tolerance=0.03)
        extraction = extract_subnetwork(self.net, graph, masks)
        for optimizer in optimizers:
            remap_optimizer_state(optimizer, extraction)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.pruned = True
        print(f"[l1] pruned at epoch {self.current_epoch}", flush=True)


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=overrides)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def dense_cost() -> tuple[float, int]:
    net = create_model("resnet20", in_channels=3, num_classes=10)
    cost = count_forward_cost(net, torch.zeros(1, 3, 32, 32))
    return cost.macs, cost.parameters


def run_arm(arm: str, epochs: int, output: Path, extra_overrides: list[str], round_to: int) -> dict[str, Any]:
    from lightning_modules.training import train

    run_dir = output / arm
    common = ["trainer.accelerator=cpu", "logger=csv", f"trainer.max_epochs={epochs}", *extra_overrides]
    if arm == "dense":
        overrides = ["experiment=cifar10_resnet20", *common]
    elif arm == "polarization":
        overrides = ["experiment=polarization_resnet20_cifar10_cpu", f"module.round_to={round_to}", *common]
    else:
        # The L1 arm prunes where the polarization arm freezes at the latest (freeze_max_fraction 0.5).
        prune_epoch = math.ceil(epochs * 0.5)
        overrides = [
            "experiment=cifar10_resnet20",
            "task_name=l1_resnet20_cifar10_cpu",
            "module._target_=__main__.OneShotL1Module",
            "+module.flops_reduction=0.5",
            f"+module.prune_epoch={prune_epoch}",
            f"+module.round_to={round_to}",
            *common,
        ]
    start = time.perf_counter()
    summary = train(compose_config(overrides, run_dir))
    wall = time.perf_counter() - start

    dense_macs, dense_params = dense_cost()
    result = {
        "arm": arm,
        "epochs": epochs,
        "test_acc": summary["test/acc"],
        "macs": summary["macs_per_sample"],
        "params": summary["params"],
        "dense_macs": dense_macs,
        "dense_params": dense_params,
        "wall_s": wall,
        "overrides": extra_overrides,
        "round_to": round_to,
        "run_dir": str(run_dir),
    }
    if arm == "polarization":
        result["model_path"] = summary.get("pruning_model_path")
        result["freeze_epoch"] = summary.get("pruning_freeze_epoch")
        result["reduction_from_gates"] = summary.get("pruning_flops_reduction_from_gates")
    elif arm == "l1":
        # The module in the summary is the extracted network; save it for the speed test.
        result["model_path"] = str(run_dir / "l1_pruned_model.pt")
    return result


def measure_speed(results: dict[str, dict[str, Any]], rounds: int, batch_size: int) -> dict[str, dict[str, float]]:
    dense = create_model("resnet20", in_channels=3, num_classes=10)
    networks = {"dense": dense}
    for arm, result in results.items():
        if arm != "dense" and result.get("model_path") and Path(result["model_path"]).is_file():
            networks[arm] = load_pruned(result["model_path"])
    images = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for net in networks.values():
        net.eval().to(memory_format=torch.channels_last)

    times: dict[str, list[float]] = {name: [] for name in networks}
    with torch.inference_mode():
        for net in networks.values():
            for _ in range(3):
                net(images)
        for _ in range(rounds):
            for name, net in networks.items():
                start = time.perf_counter()
                net(images)
                times[name].append(time.perf_counter() - start)
    return {
        name: {"median_s": statistics.median(values), "images_per_s": batch_size / statistics.median(values)}
        for name, values in times.items()
    }


def load_results(output: Path) -> dict[str, dict[str, Any]]:
    """Return the results in ``output``: the standard arms first, then any other ``<name>.json`` by name."""
    files = {path.stem: path for path in output.glob("*.json") if path.stem != "speed"}
    names = [arm for arm in ARMS if arm in files] + sorted(name for name in files if name not in ARMS)
    return {name: json.loads(files[name].read_text()) for name in names}


def print_report(output: Path, dense_accuracy: float | None) -> None:
    results = load_results(output)
    if dense_accuracy is None and "dense" in results:
        dense_accuracy = results["dense"]["test_acc"]
    speed = json.loads((output / "speed.json").read_text()) if (output / "speed.json").is_file() else {}
    threads = speed.pop("threads", None)
    print()
    print("ResNet-20, CIFAR-10 test set (10,000 images), target 50% fewer FLOPs")
    if results:
        budget = next(iter(results.values()))
        print(f"budget of every arm: {budget['epochs']} epochs; overrides: {' '.join(budget['overrides']) or 'none'}")
        for arm, result in results.items():
            if result["overrides"] != budget["overrides"]:
                print(f"  except {arm}: overrides {' '.join(result['overrides']) or 'none'}")
        rounding = {result.get("round_to", 1) for arm, result in results.items() if arm != "dense"}
        print(f"kept channels rounded to a multiple of: {', '.join(str(value) for value in sorted(rounding))}")
    header = (
        f"{'arm':<24} {'epochs':>6} {'top-1':>7} {'vs dense':>8} {'FLOPs red.':>10} {'params red.':>11} "
        f"{'FLOPs ratio':>11} {'speed-up':>8} {'speed/FLOPs':>11} {'wall':>7}"
    )
    print(header)
    for arm, result in results.items():
        flops_ratio = result["dense_macs"] / result["macs"]
        accuracy_gap = f"{100 * (result['test_acc'] - dense_accuracy):+.2f}" if dense_accuracy is not None else "n/a"
        speed_up = speed_cell = "n/a"
        if arm != "dense" and arm in speed and "dense" in speed:
            ratio = speed["dense"]["median_s"] / speed[arm]["median_s"]
            speed_up, speed_cell = f"{ratio:.2f}x", f"{ratio / flops_ratio:.2f}"
        print(
            f"{arm:<24} {result['epochs']:>6} {100 * result['test_acc']:>6.2f}% {accuracy_gap:>8} "
            f"{100 * (1 - result['macs'] / result['dense_macs']):>9.1f}% "
            f"{100 * (1 - result['params'] / result['dense_params']):>10.1f}% {flops_ratio:>10.2f}x "
            f"{speed_up:>8} {speed_cell:>11} {result['wall_s'] / 60:>5.1f}min"
        )
    if speed:
        print(f"inference, batch 256, channels-last, {threads} threads, median of timed runs:")
        for name, values in speed.items():
            print(f"  {name:<24} {values['median_s'] * 1e3:8.1f} ms/batch  {values['images_per_s']:8.0f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--arm",
        action="append",
        choices=[*ARMS, "speed", "report"],
        help="what to run; repeat for several (default: all, in order)",
    )
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of each arm (the baseline's: 15)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=20, help="timed inference runs per network")
    parser.add_argument(
        "--override", action="append", default=[], help="extra Hydra override for both arms (for quick checks)"
    )
    parser.add_argument(
        "--round-to", type=int, default=1, help="keep a multiple of this many channels per group (both pruned arms)"
    )
    parser.add_argument("--output", type=Path, default=Path("/tmp/benchmark_pruning"), help="results folder")
    parser.add_argument(
        "--dense-accuracy",
        type=float,
        default=None,
        help="dense top-1 in [0, 1] to compare with; default: the dense arm's result",
    )
    args = parser.parse_args()
    arms = args.arm or [*ARMS, "speed", "report"]
    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)

    for arm in arms:
        if arm in ARMS:
            result = run_arm(arm, args.epochs, args.output, args.override, args.round_to)
            (args.output / f"{arm}.json").write_text(json.dumps(result, indent=2))
            print(json.dumps(result, indent=2), flush=True)
        elif arm == "speed":
            speed: dict[str, Any] = measure_speed(load_results(args.output), args.rounds, batch_size=256)
            speed["threads"] = args.threads
            (args.output / "speed.json").write_text(json.dumps(speed, indent=2))
        elif arm == "report":
            print_report(args.output, args.dense_accuracy)


if __name__ == "__main__":
    main()
