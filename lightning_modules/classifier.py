"""The plain image classifier: the dense baseline every technique is compared with."""

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning import LightningModule
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.callbacks.flops import example_input_from_datamodule
from lightning_modules.pipeline import load_stage_weights
from lightning_modules.schedules import build_scheduler
from lightning_modules.setup_run import resolve_checkpoint_path, summarize_load_error

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]


def optimizer_steps_per_epoch(trainer: L.Trainer) -> int:
    """Return the optimizer steps in one epoch, from the training batches and gradient accumulation.

    Call it after ``trainer.estimated_stepping_batches``, which sets the number of batches.
    Epoch-based schedule points (warm-up, milestones) are converted with it, so they stay
    where they are when ``max_steps`` ends the run early.
    """
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError(
            "epoch-based learning-rate schedules need a training loader with a length; "
            "set module.scheduler.name=none or use a map-style dataset"
        )
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


def load_classifier_weights(net: nn.Module, path: str | Path) -> None:
    """Load network weights into ``net`` from a checkpoint of :class:`ClassifierModule`, a run folder or a state dict.

    A run folder means its ``checkpoints/last.ckpt``. The file is read weights-only, so
    loading it runs no code from it.
    """
    if not Path(path).expanduser().exists():
        raise FileNotFoundError(
            f"weights file or run folder {path} not found; pass a run folder or .ckpt of a module=classifier run"
        )
    resolved = resolve_checkpoint_path(str(path))
    state = load_stage_weights(Path(resolved))

    # ClassifierModule keeps the network as its "net" attribute.
    prefixed = {key.removeprefix("net."): value for key, value in state.items() if key.startswith("net.")}
    try:
        net.load_state_dict(prefixed or state)
    except RuntimeError as error:
        raise ValueError(
            f"the weights in {resolved} do not fit the model of this run ({type(net).__name__}): "
            f"{summarize_load_error(error)}. "
            "Set model= to the architecture the checkpoint was trained with"
        ) from None


def scheduled_optimizer(
    trainer: L.Trainer, optimizer: torch.optim.Optimizer, scheduler_options: dict[str, Any]
) -> dict[str, Any]:
    """Return ``configure_optimizers``' dict: ``optimizer`` and the scheduler of ``scheduler_options``.

    The scheduler steps once per optimizer step (see :mod:`lightning_modules.schedules`).
    """
    total_steps = int(trainer.estimated_stepping_batches)
    steps_per_epoch = optimizer_steps_per_epoch(trainer)
    scheduler = build_scheduler(
        optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch, **scheduler_options
    )
    if scheduler is None:
        return {"optimizer": optimizer}
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ClassifierModule(LightningModule):
    """Train ``net`` with cross-entropy and report top-1/top-5 accuracy.

    Args:
        net: the backbone, mapping images ``(B, C, H, W)`` to logits ``(B, num_classes)``.
        optimizer: a factory taking parameter groups, such as ``functools.partial(torch.optim.SGD, lr=0.1)``
            (Hydra's ``_partial_: true``).
        scheduler: keyword arguments of :func:`lightning_modules.schedules.build_scheduler`
            without the optimizer and step counts, e.g. ``{"name": "cosine", "warmup_epochs": 1}``.
        num_classes: number of classes, for the accuracy metrics.
        label_smoothing: label smoothing of the cross-entropy loss, in [0, 1).
        channels_last: keep weights and inputs in channels-last memory format, which is
            faster for convolutions on CPUs and on GPUs with tensor cores.
        decay_norm_and_bias: apply the optimizer's weight decay to BatchNorm parameters
            and biases too (He et al. and most CIFAR recipes do); false exempts them.
        init_checkpoint: start training from the network weights of this checkpoint (see
            :func:`load_classifier_weights`), for example a dense network to prune or fine-tune.
            The optimizer, schedule and epoch count start fresh. A resumed run (``ckpt_path``, or
            a run folder that resumes itself) does not load them.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: dict[str, Any],
        num_classes: int,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        decay_norm_and_bias: bool = True,
        init_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")

        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_options = dict(scheduler)
        self.label_smoothing = label_smoothing
        self.channels_last = channels_last
        self.decay_norm_and_bias = decay_norm_and_bias
        self.init_checkpoint = init_checkpoint

        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")
        # With 5 classes or fewer, top-5 accuracy is always 1 and is not reported.
        self.val_accuracy_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if num_classes > 5 else None
        self.test_accuracy_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if num_classes > 5 else None

        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, num_classes)`` for images ``(B, C, H, W)``."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def setup(self, stage: str) -> None:
        # A single-sample input lets the cost callbacks and Lightning's model summary
        # run the network without knowing the data set.
        example = example_input_from_datamodule(getattr(self.trainer, "datamodule", None))
        if example is not None:
            self.example_input_array = example

        # train() clears init_checkpoint when it resumes a run; Lightning would restore the
        # resumed weights over these anyway, after setup.
        if stage == "fit" and self.init_checkpoint:
            load_classifier_weights(self.net, self.init_checkpoint)
            log.info("network weights loaded from module.init_checkpoint=%s", self.init_checkpoint)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

        # The per-step loss is this rank's; the epoch loss is averaged over ranks once
        # per epoch, so DDP adds no synchronisation to each step.
        self.train_accuracy(logits, labels)
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(labels))
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(labels))
        self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        self._evaluate(batch, "val", self.val_accuracy, self.val_accuracy_top5)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        self._evaluate(batch, "test", self.test_accuracy, self.test_accuracy_top5)

    def _evaluate(
        self,
        batch: tuple[torch.Tensor, torch.Tensor],
        split: str,
        accuracy: MulticlassAccuracy,
        accuracy_top5: MulticlassAccuracy | None,
    ) -> None:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)

        accuracy(logits, labels)
        self.log(f"{split}/loss", loss, prog_bar=False, batch_size=len(labels), sync_dist=True)
        self.log(f"{split}/acc", accuracy, prog_bar=True, batch_size=len(labels))
        if accuracy_top5 is not None:
            accuracy_top5(logits, labels)
            self.log(f"{split}/acc_top5", accuracy_top5, batch_size=len(labels))

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self._parameter_groups())
        return scheduled_optimizer(self.trainer, optimizer, self.scheduler_options)

    def _parameter_groups(self) -> list[dict[str, Any]]:
        if self.decay_norm_and_bias:
            return [{"params": [p for p in self.parameters() if p.requires_grad]}]

        # One-dimensional tensors are BatchNorm scales and shifts, and biases.
        decayed = [p for p in self.parameters() if p.requires_grad and p.ndim > 1]
        exempt = [p for p in self.parameters() if p.requires_grad and p.ndim <= 1]
        return [{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]
