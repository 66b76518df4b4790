"""Operation counts of one forward pass: parameters, MACs and FLOPs per sample.

Counting uses ``torch.utils.flop_counter.FlopCounterMode``, which counts the
multiply-accumulates (MACs) of convolutions and matrix products and reports
2 FLOPs per MAC. Element-wise work (BatchNorm, activations, residual additions,
pooling) is not counted, as in fvcore, ptflops and thop. Masked weights are
counted as dense: a pruned network must be extracted before it is counted.
"""

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ForwardCost:
    """Cost of one forward pass for a single sample."""

    macs: float
    flops: float
    parameters: int


def count_forward_cost(model: nn.Module, example_input: torch.Tensor) -> ForwardCost:
    """Count MACs and FLOPs of ``model(example_input)`` per sample, and the model's parameters.

    The model runs once in eval mode without gradients, then returns to its previous
    mode. ``example_input`` is a batch ``(B, ...)``; counts are divided by ``B``.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example_input)
    finally:
        model.train(was_training)

    batch_size = example_input.shape[0]
    flops = counter.get_total_flops() / batch_size
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return ForwardCost(macs=flops / 2, flops=flops, parameters=parameters)


def example_input_from_datamodule(datamodule: Any) -> torch.Tensor | None:
    """Return a zero batch of one input shaped like the data module's images, or ``None`` if it has no image size."""
    if datamodule is None or not hasattr(datamodule, "image_size"):
        return None
    height, width = datamodule.image_size
    return torch.zeros(1, datamodule.in_channels, height, width)


def example_input_of(pl_module: L.LightningModule) -> torch.Tensor:
    """Return the module's ``example_input_array`` on its device, or raise if it has none."""
    example = pl_module.example_input_array
    if not isinstance(example, torch.Tensor):
        raise ValueError(
            f"{type(pl_module).__name__} has no tensor example_input_array, so its cost cannot be "
            "counted; set it in the module's setup() to a batch of one input, e.g. torch.zeros(1, 3, 32, 32)"
        )
    return example.to(pl_module.device)


class FlopsCallback(L.Callback):
    """Count parameters, MACs and FLOPs per sample at the start of fit and after test.

    The count runs once per stage, not per step, so it does not slow training. The
    module is counted through its ``forward`` on ``example_input_array``; a module
    whose inference differs from its forward can define ``cost_model() -> (model, input)``.
    """

    def __init__(self) -> None:
        self.costs: dict[str, ForwardCost] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._count("fit_start", trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._count("test", trainer, pl_module)

    def _count(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model, example = _cost_model_of(pl_module)
        cost = count_forward_cost(model, example)
        self.costs[stage] = cost

        metrics = {
            "cost/params": float(cost.parameters),
            "cost/macs_per_sample": cost.macs,
            "cost/flops_per_sample": cost.flops,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        # A module whose cost model counts only part of its work names that part in cost_note.
        note = getattr(pl_module, "cost_note", None)
        rank_zero_info(
            f"[flops] {stage}: {cost.parameters:,} parameters, {cost.macs / 1e6:.2f} M MACs "
            f"= {cost.flops / 1e6:.2f} M FLOPs per sample" + (f" ({note})" if note else "")
        )

    def summary(self) -> dict[str, Any]:
        """Return the latest count, for the run summary."""
        if not self.costs:
            return {}
        cost = self.costs.get("test") or self.costs["fit_start"]
        return {"params": cost.parameters, "macs_per_sample": cost.macs, "flops_per_sample": cost.flops}


def _cost_model_of(pl_module: L.LightningModule) -> tuple[nn.Module, torch.Tensor]:
    if hasattr(pl_module, "cost_model"):
        return pl_module.cost_model()
    return pl_module, example_input_of(pl_module)
