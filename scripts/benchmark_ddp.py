"""Training throughput of DDP with two CPU processes (gloo) against one process on the same cores.

    OMP_NUM_THREADS is set by the script: python scripts/benchmark_ddp.py [--data digits] [--epochs 4]

Both sides train ResNet-20 with the same global batch: one process with ``--global-batch``
images per step and two threads, or two DDP processes with half of it each and one
thread each. A third run, one process with one thread, shows how much the single
process gains from its second thread; on cores that other jobs keep busy, a second
OpenMP thread can make it slower. Each side is one ``train.py`` run. Throughput is the median over epochs of
images per second, summed over ranks (``ThroughputCallback``), so the first epoch's
start-up counts only as one of the epochs. The script prints both sides and their ratio.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_side(name: str, overrides: list[str], threads: int, log_dir: Path) -> float:
    """Run train.py with ``overrides`` and return its median training throughput in images per second."""
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *overrides,
        f"run_id={name}",
        f"paths.log_dir={log_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{name} run failed with exit status {result.returncode}:\n{result.stderr[-3000:]}")
    summary = json.loads((log_dir / "train" / "runs" / name / "summary.json").read_text())
    return float(summary["train_samples_per_sec_median"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits", choices=["digits", "cifar10"], help="data config group option")
    parser.add_argument("--global-batch", type=int, default=64, help="images per optimizer step, over all processes")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per side; the median is over these")
    parser.add_argument("--train-subset", type=int, default=1024, help="training images per epoch")
    args = parser.parse_args()
    if args.global_batch % 2:
        raise SystemExit(f"--global-batch must be even to split over 2 processes, got {args.global_batch}")

    common = [
        f"data={args.data}",
        "data.num_workers=0",
        f"data.train_subset={args.train_subset}",
        "module=classifier",
        "model=resnet20",
        "trainer.accelerator=cpu",
        f"trainer.max_epochs={args.epochs}",
        "trainer.limit_val_batches=0",
        "test=false",
        "logger=none",
        "callbacks=none",
        "+callbacks.throughput._target_=lightning_modules.callbacks.ThroughputCallback",
    ]
    single = [*common, "trainer=cpu", f"data.batch_size={args.global_batch}"]
    ddp = [*common, "trainer=ddp", "trainer.devices=2", f"data.batch_size={args.global_batch // 2}"]

    with tempfile.TemporaryDirectory() as folder:
        single_rate = run_side("single", single, threads=2, log_dir=Path(folder))
        single_one_thread_rate = run_side("single-1-thread", single, threads=1, log_dir=Path(folder))
        ddp_rate = run_side("ddp", ddp, threads=1, log_dir=Path(folder))

    print(
        f"ResNet-20 on {args.data}, {args.train_subset} images per epoch, {args.epochs} epochs, "
        f"global batch {args.global_batch}"
    )
    print(f"  1 process x 2 threads:         {single_rate:8.1f} images/s (median over epochs)")
    print(f"  1 process x 1 thread:          {single_one_thread_rate:8.1f} images/s (median over epochs)")
    print(f"  2 DDP processes x 1 thread:    {ddp_rate:8.1f} images/s (gloo, summed over ranks)")
    print(f"  ratio DDP / 1 process x 2 threads: {ddp_rate / single_rate:8.3f}")
    print(f"  ratio DDP / 1 process x 1 thread:  {ddp_rate / single_one_thread_rate:8.3f}")


if __name__ == "__main__":
    main()
