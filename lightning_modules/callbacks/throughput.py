"""Images per second in training and test, measured over whole epochs."""

import statistics
import time
from typing import Any

import lightning as L
import torch


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(first, torch.Tensor):
        return first.shape[0]
    raise TypeError(
        f"cannot tell the batch size of a batch of type {type(first).__name__}; "
        "ThroughputCallback expects batches whose first element is a tensor of inputs"
    )


def _sum_over_ranks(trainer: L.Trainer, value: float) -> float:
    # NCCL reduces only tensors on the GPU, so the tensor goes to the strategy's device.
    local = torch.tensor(value, dtype=torch.float64, device=trainer.strategy.root_device)
    return float(trainer.strategy.reduce(local, reduce_op="sum"))


class ThroughputCallback(L.Callback):
    """Log training and test throughput in samples per second, summed over DDP ranks.

    Training time runs from the start of each epoch to the end of its last batch,
    so data loading is included and the validation that follows is not.
    """

    def __init__(self) -> None:
        self.train_rates: list[float] = []
        self.test_rate: float | None = None
        self._start: float | None = None
        self._samples = 0
        self._elapsed = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_timer()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_index: int
    ) -> None:
        # Lightning skips on_train_epoch_start when a run resumes in the middle of an epoch,
        # so the rest of that epoch is timed from its first batch.
        if self._start is None:
            self._start_timer()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_index: int
    ) -> None:
        self._samples += _batch_size(batch)
        self._elapsed = time.perf_counter() - self._start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = None
        # Every rank joins the reduction, even one that timed nothing, so it cannot hang.
        local_rate = self._samples / self._elapsed if self._samples and self._elapsed > 0 else 0.0
        rate = _sum_over_ranks(trainer, local_rate)
        if rate <= 0:
            return
        self.train_rates.append(rate)
        # Every rank logs the same global figure; sync_dist only keeps Lightning from warning.
        pl_module.log("throughput/train_samples_per_sec", rate, on_epoch=True, sync_dist=True)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_timer()

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_index: int,
        dataloader_index: int = 0,
    ) -> None:
        self._samples += _batch_size(batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = time.perf_counter() - self._start
        self._start = None
        local_rate = self._samples / elapsed if self._samples and elapsed > 0 else 0.0
        rate = _sum_over_ranks(trainer, local_rate)
        if rate > 0:
            self.test_rate = rate
            pl_module.log("throughput/test_samples_per_sec", rate, sync_dist=True)

    def _start_timer(self) -> None:
        self._samples = 0
        self._elapsed = 0.0
        self._start = time.perf_counter()

    def summary(self) -> dict[str, Any]:
        """Return the median training throughput over epochs and the test throughput."""
        result: dict[str, Any] = {}
        if self.train_rates:
            result["train_samples_per_sec_median"] = statistics.median(self.train_rates)
        if self.test_rate is not None:
            result["test_samples_per_sec"] = self.test_rate
        return result
