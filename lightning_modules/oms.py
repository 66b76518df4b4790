"""One More Step (OMS) training: a small network that maps pure noise to the data's conditional mean.

:class:`OMSModule` trains an :class:`diffusion.oms.OMSNetwork` on the images of any data
module of :mod:`lightning_modules.data`. Training needs only the data: the OMS step always
runs at alphabar 0, where the v target is ``-x0`` for every schedule, so the loss does not
use the base model's schedule, and the base model's weights are never loaded. The base
schedule is recorded in the checkpoint as a description of what the module was made for.
``sample.py oms.ckpt_path=<this run>`` puts the trained module in front of any base model
of the same image shape (see :mod:`diffusion.oms`).

Conditions (``condition``):

- ``"none"``: one prediction, the mean of the data.
- ``"class"``: the data set's class labels.
- ``"brightness"``: bins of the per-image mean brightness on the [0, 1] scale (all
  channels and pixels). With ``brightness_bins.edges: null`` there are ``num_bins`` bins
  with equal shares of the training images. Their quantile edges are computed in
  ``setup()`` from the training split, before augmentation. A list of ``num_bins - 1``
  increasing inner edges fixes the bins instead.

With a condition, ``condition_dropout`` replaces it by the null condition for that share of
the images, so the same network also learns the unconditional prediction that
classifier-free guidance needs.

The checkpoint stores, beside Lightning's usual content, the EMA weights (under
``ema.model.``) and an ``"oms"`` entry of plain Python values that
:func:`diffusion.oms.load_oms` rebuilds the network from.
"""

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from diffusion import make_schedule
from diffusion.oms import (
    OMS_CHECKPOINT_KEY,
    BrightnessBins,
    OMSNetwork,
    image_brightness,
    network_config_for_rebuild,
    oms_loss,
    oms_x0_from_v,
    validate_condition_kind,
)
from lightning_modules.classifier import OptimizerFactory, scheduled_optimizer
from lightning_modules.diffusion import EMA, save_grid, to_plain, to_uint8
from lightning_modules.image_data import ImageDataMixin, image_metadata
from models.unet import check_min_group_channels

log = logging.getLogger(__name__)

# Noise draws per condition in the grids of OMS predictions.
GRID_DRAWS = 4


class OMSModule(ImageDataMixin, LightningModule):
    """Train an OMS network with the mean squared error of its x0 estimate from pure noise; keep an EMA copy.

    Args:
        net: the OMS network (:func:`diffusion.oms.build_oms_network`). Its number of
            conditions must match ``condition``.
        optimizer: a factory taking parameter groups (Hydra's ``_partial_: true``).
        scheduler: keyword arguments of :func:`lightning_modules.schedules.build_scheduler`
            without the optimizer and step counts.
        num_classes: classes of the data set.
        condition: ``"none"``, ``"class"`` or ``"brightness"``.
        brightness_bins: ``{"num_bins": K, "edges": None or K - 1 inner edges}``, for the
            brightness condition only.
        condition_dropout: probability of training an image on the null condition, in [0, 1).
        noise_schedule: arguments of :func:`diffusion.make_schedule` of the base models this
            module is meant for; recorded, not used by the loss.
        ema_decay: decay of the EMA of the weights, in [0, 1).
        ema_warmup: ramp the EMA decay up over the first updates.
        grid_every_n_epochs: save a PNG grid of the EMA network's x0 estimates (one row per
            condition, the null condition last) every this many epochs and after the last; 0 for none.
    """

    def __init__(
        self,
        net: OMSNetwork,
        optimizer: OptimizerFactory,
        scheduler: dict[str, Any],
        num_classes: int,
        condition: str = "none",
        brightness_bins: dict[str, Any] | None = None,
        condition_dropout: float = 0.1,
        noise_schedule: dict[str, Any] | None = None,
        ema_decay: float = 0.99,
        ema_warmup: bool = True,
        grid_every_n_epochs: int = 0,
    ) -> None:
        super().__init__()
        validate_condition_kind(condition)
        if not isinstance(net, OMSNetwork):
            raise TypeError(
                f"OMSModule trains an OMSNetwork, got {type(net).__name__}; use model=oms "
                "(configs/model/oms.yaml), which builds it with diffusion.oms.build_oms_network"
            )
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {condition_dropout}")
        if grid_every_n_epochs < 0:
            raise ValueError(f"grid_every_n_epochs must be >= 0 (0 turns grids off), got {grid_every_n_epochs}")

        self.brightness_options = to_plain(brightness_bins or {"num_bins": 5, "edges": None})
        expected = {"none": 0, "class": num_classes, "brightness": int(self.brightness_options["num_bins"])}
        if net.num_conditions != expected[condition]:
            raise ValueError(
                f"condition {condition!r} needs an OMS network with {expected[condition]} conditions, but it has "
                f"{net.num_conditions}; build it with model.condition and model.num_brightness_bins matching the module"
            )
        edges = self.brightness_options.get("edges")
        if condition == "brightness" and edges is not None and len(edges) != net.num_conditions - 1:
            raise ValueError(
                f"brightness_bins.edges needs num_bins - 1 = {net.num_conditions - 1} inner edges, got {list(edges)}"
            )

        self.net = net
        self.ema = EMA(net, ema_decay, warmup=ema_warmup)
        self.optimizer_factory = optimizer
        self.scheduler_options = dict(scheduler)
        self.condition = condition
        self.condition_dropout = condition_dropout if condition != "none" else 0.0
        self.noise_schedule = to_plain(noise_schedule or {"name": "scaled_linear", "num_train_timesteps": 1000})
        self.terminal_alphabar = float(make_schedule(**self.noise_schedule)[-1])
        self.grid_every_n_epochs = grid_every_n_epochs

        self.brightness_bins: BrightnessBins | None = None
        self.grid_paths: list[Path] = []

    # -- data ----------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self.read_image_data()
        if self.condition == "brightness":
            self.brightness_bins = self._make_brightness_bins(self.trainer.datamodule)
            rank_zero_info(
                f"[oms] brightness bins: edges {[round(edge, 4) for edge in self.brightness_bins.edges]}, "
                f"mean brightness per bin {[round(mean, 4) for mean in self.brightness_bins.bin_means]}"
            )
        rank_zero_info(
            f"[oms] condition {self.condition}; base schedule {self.noise_schedule['name']} has terminal alphabar "
            f"{self.terminal_alphabar:.4g}, and OMS starts the base sampler from its first timestep"
        )

    def _make_brightness_bins(self, datamodule: Any) -> BrightnessBins:
        if not hasattr(datamodule, "splits"):
            raise ValueError(
                f"condition 'brightness' computes its bins from the training images of an in-memory data module "
                f"of lightning_modules.data; {type(datamodule).__name__} has none"
            )
        images = datamodule.splits().train.images
        # uint8 (N, H, W, C): the mean over channels and pixels on the [0, 1] scale, as image_brightness computes it.
        brightness = torch.from_numpy(images.reshape(len(images), -1).astype(np.float64).mean(axis=1) / 255.0)
        edges = self.brightness_options.get("edges")
        if edges is None:
            return BrightnessBins.from_quantiles(brightness, int(self.brightness_options["num_bins"]))
        return BrightnessBins.with_means(edges, brightness)

    def conditions_of(self, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Return the OMS condition of each image in [-1, 1], int64 ``(B,)``, or None for ``condition="none"``."""
        if self.condition == "class":
            return labels
        if self.condition == "brightness":
            if self.brightness_bins is None:
                raise RuntimeError("the brightness bins are computed in setup(); call it before training")
            return self.brightness_bins.assign(image_brightness(x0)).to(x0.device)
        return None

    # -- training and evaluation ---------------------------------------------------------

    def forward(self, noise: torch.Tensor, conditions: torch.Tensor | None = None) -> torch.Tensor:
        """Return the network's v prediction at alphabar 0 for pure ``noise``."""
        return self.net(noise, conditions)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        images, labels = batch
        x0 = self.to_model_range(images)
        loss = oms_loss(self.net, x0, self.conditions_of(x0, labels), self.condition_dropout)
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(labels))
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(labels))
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.net)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        self._evaluate(batch, batch_index, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        self._evaluate(batch, batch_index, "test")

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int, split: str) -> None:
        # The noise is seeded by the batch index, so the loss changes between epochs only with the weights.
        images, labels = batch
        x0 = self.to_model_range(images)
        generator = torch.Generator().manual_seed(batch_index)
        loss = oms_loss(self.ema.model, x0, self.conditions_of(x0, labels), 0.0, generator=generator)
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=len(labels), sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        # The optimizer gets only the trained network, because the EMA copy is updated by averaging.
        optimizer = self.optimizer_factory([{"params": [p for p in self.net.parameters() if p.requires_grad]}])
        return scheduled_optimizer(self.trainer, optimizer, self.scheduler_options)

    # -- grids of predictions ------------------------------------------------------------

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self.grid_every_n_epochs == 0 or not self.trainer.is_global_zero:
            return
        epoch = self.current_epoch + 1
        max_epochs = self.trainer.max_epochs
        last_epoch = max_epochs is not None and max_epochs > 0 and epoch >= max_epochs
        if epoch % self.grid_every_n_epochs == 0 or last_epoch:
            self.save_prediction_grid(Path(self.trainer.default_root_dir) / "samples" / f"oms_epoch_{epoch:04d}.png")

    @torch.no_grad()
    def save_prediction_grid(self, path: Path) -> Path:
        """Save the EMA network's x0 estimates as a PNG, one row per condition (null last); return the path.

        These are the images that the OMS step blends into the base sampler's first sample,
        before the base model adds any detail.
        """
        if self.image_shape is None:
            raise RuntimeError("the image shape is set in setup(); call save_prediction_grid during fit or test")
        network = self.ema.model.eval()
        num_conditions = network.num_conditions
        conditions = torch.arange(num_conditions + 1, device=self.device).repeat_interleave(GRID_DRAWS)
        noise = torch.randn((len(conditions), *self.image_shape), generator=torch.Generator().manual_seed(0))
        # An unconditional network has only the null condition, index 0.
        x0 = oms_x0_from_v(network(noise.to(self.device), conditions))
        save_grid(to_uint8(x0.cpu()), path, nrow=GRID_DRAWS)
        self.grid_paths.append(path)
        rank_zero_info(f"[oms] x0 estimates of {num_conditions + 1} conditions -> {path}")
        return path

    # -- cost and checkpoint -------------------------------------------------------------

    def cost_model(self) -> tuple[nn.Module, torch.Tensor]:
        """Return the OMS network and a one-image input: one OMS step costs one call, or two with guidance."""
        if self.image_shape is None:
            raise ValueError("OMSModule's cost is known after setup(), which sets the image shape")
        return self.net, torch.zeros((1, *self.image_shape), device=self.device)

    def checkpoint_metadata(self) -> dict[str, Any]:
        """Return what :func:`diffusion.oms.load_oms` needs to rebuild the module, as plain Python values."""
        bins = self.brightness_bins
        return {
            "network": to_plain(self.net.config),
            "condition": self.condition,
            "brightness_bins": {"edges": list(bins.edges), "bin_means": list(bins.bin_means)} if bins else None,
            "condition_dropout": self.condition_dropout,
            "noise_schedule": self.noise_schedule,
            **image_metadata(self.image_data),
            "ema_decay": self.ema.decay,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[OMS_CHECKPOINT_KEY] = self.checkpoint_metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        network = (checkpoint.get(OMS_CHECKPOINT_KEY) or {}).get("network")
        stored = int(network_config_for_rebuild(network)["min_group_channels"]) if network else None
        check_min_group_channels(stored, self.net, "the OMS checkpoint")
