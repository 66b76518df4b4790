"""Framework overhead: the same training steps in a plain PyTorch loop and through leanlight.

Both sides train the same backbone from the same initial weights on the same data
module's batches, with the same optimizer, schedule, loss and memory format, for the
same number of steps. leanlight's side is the full stack a user runs: the Hydra
config, the ClassifierModule (with its torchmetrics accuracy and logging), Lightning's
Trainer and the default callbacks, without a logger and without checkpoints. Timing
starts after warm-up steps and covers steps only (data loading included), so the
one-off Trainer setup is not counted. The two sides alternate for several rounds and
the medians are compared.

    python scripts/benchmark_overhead.py                      # CIFAR-10 ResNet-20, batch 128
    python scripts/benchmark_overhead.py --experiment= --steps 100   # the digits default
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["LEANLIGHT_ROOT"] = str(ROOT)

from lightning_modules.schedules import build_scheduler  # noqa: E402
from lightning_modules.setup_run import instantiate_callbacks  # noqa: E402


class StepTimer(L.Callback):
    """Record the time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_index) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_index) -> None:
        self.end = time.perf_counter()


def compose_config(experiment: str, output_dir: Path, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        experiment_override = [f"experiment={experiment}"] if experiment else []
        cfg = compose(
            config_name="train",
            return_hydra_config=True,
            overrides=experiment_override + ["logger=none", "trainer.accelerator=cpu", *overrides],
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def build(cfg: DictConfig, datamodule) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    return instantiate(cfg.model, in_channels=datamodule.in_channels, num_classes=datamodule.num_classes)


def run_plain(cfg: DictConfig, datamodule, steps: int, warmup: int, channels_last: bool = True) -> float:
    """Train with a hand-written loop; return samples per second over the timed steps."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = build(cfg, datamodule).to(memory_format=memory_format).train()
    optimizer = instantiate(cfg.module.optimizer)(net.parameters())
    steps_per_epoch = len(datamodule.train_dataloader())
    scheduler = build_scheduler(optimizer, total_steps=steps, steps_per_epoch=steps_per_epoch, **cfg.module.scheduler)

    step = 0
    samples = 0
    start = 0.0
    while step < steps:
        for images, labels in datamodule.train_dataloader():
            if step == warmup:
                start = time.perf_counter()
            images = images.contiguous(memory_format=memory_format)
            loss = F.cross_entropy(net(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if step >= warmup:
                samples += len(labels)
            step += 1
            if step == steps:
                break
    return samples / (time.perf_counter() - start)


def run_leanlight(cfg: DictConfig, datamodule, steps: int, warmup: int) -> float:
    """Train through ClassifierModule and the Trainer; return samples per second over the timed steps."""
    net = build(cfg, datamodule)
    module = instantiate(cfg.module, net=net, num_classes=datamodule.num_classes)
    timer = StepTimer(warmup)
    callbacks = instantiate_callbacks(cfg.callbacks, has_logger=False)
    callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ModelCheckpoint)]
    trainer = instantiate(
        cfg.trainer,
        callbacks=[*callbacks, timer],
        logger=False,
        precision="32-true",
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    batch_size = cfg.data.batch_size
    return (steps - warmup) * batch_size / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="cifar10_resnet20", help="experiment config; empty for the default")
    parser.add_argument("--steps", type=int, default=60, help="training steps per side and round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of each side")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs both sides")
    parser.add_argument(
        "--memory-format",
        action="store_true",
        help="also time the plain loop without channels-last, to show what the memory format buys",
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. data.batch_size=256")
    args = parser.parse_args()

    output_dir = ROOT / "logs" / "benchmark_overhead"
    cfg = compose_config(args.experiment, output_dir, args.overrides)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")

    plain_rates, leanlight_rates, contiguous_rates = [], [], []
    for round_index in range(args.rounds):
        if args.memory_format:
            contiguous_rates.append(run_plain(cfg, datamodule, args.steps, args.warmup, channels_last=False))
            print(f"round {round_index + 1}: plain, contiguous format {contiguous_rates[-1]:.1f} samples/s")
        plain_rates.append(run_plain(cfg, datamodule, args.steps, args.warmup))
        leanlight_rates.append(run_leanlight(cfg, datamodule, args.steps, args.warmup))
        print(
            f"round {round_index + 1}: plain {plain_rates[-1]:.1f} samples/s, "
            f"leanlight {leanlight_rates[-1]:.1f} samples/s",
            flush=True,
        )

    plain = statistics.median(plain_rates)
    leanlight = statistics.median(leanlight_rates)
    print(
        f"\n{cfg.model.name} on {type(datamodule).__name__}, batch {cfg.data.batch_size}, "
        f"{args.steps - args.warmup} timed steps x {args.rounds} rounds, {torch.get_num_threads()} threads"
    )
    print(f"plain PyTorch loop   {plain:8.1f} samples/s (median)")
    print(f"leanlight Trainer    {leanlight:8.1f} samples/s (median)")
    print(f"ratio leanlight/plain {leanlight / plain:.3f}")
    if contiguous_rates:
        contiguous = statistics.median(contiguous_rates)
        print(f"plain loop, contiguous format {contiguous:8.1f} samples/s (median)")
        print(f"ratio channels-last/contiguous {plain / contiguous:.3f}")


if __name__ == "__main__":
    main()
