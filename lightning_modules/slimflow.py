"""Rectified-flow training for SlimFlow: a 1-rectified-flow teacher, (Annealing) Reflow and one-step distillation.

- :class:`RectifiedFlowModule` trains ``v(x_t, t)`` on ``x1 - z0``. On an image data module
  (the teacher) the noise is drawn fresh. On a :class:`ReflowPairDataModule` (reflow) the
  pairs come from the teacher, and with ``anneal_steps > 0`` the paired noise is loosened
  to ``sqrt(1 - beta^2) z0 + beta eps`` with beta annealed from 1 to 0 (Annealing Reflow).
- :class:`FlowDistillationModule` trains the one-step prediction ``z0 + v(z0, eps)``: term 1
  on the pairs, and with ``flow_guidance`` term 2 against a frozen guide flow (Flow-Guided
  Distillation). Without it, it is plain one-step distillation.

Both keep an EMA of the network. Their checkpoints, and the stage weights that
:func:`save_flow_checkpoint` writes, carry a ``"rectified_flow"`` entry from which
:func:`load_flow_model` (and ``sample.py sampler=flow``) rebuilds the network.
"""

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from lightning import LightningModule
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader, Subset

from diffusion.rectified_flow import T_EPSILON, network_velocity, rectified_flow_loss, sample_flow, sample_time
from diffusion.reflow_pairs import ReflowPairDataset
from diffusion.slimflow import (
    anneal_noise,
    annealing_beta,
    describe_distance,
    flow_guidance_loss,
    joint_horizontal_flip,
    make_distance,
    paired_distillation_loss,
    sample_t_prime,
)
from lightning_modules.callbacks.energy import OperationCounts
from lightning_modules.callbacks.flops import count_forward_cost
from lightning_modules.classifier import OptimizerFactory
from lightning_modules.diffusion import EMA, NetworkEvaluation, check_denoiser, save_grid, to_plain, to_uint8
from lightning_modules.image_data import ImageDataMixin, image_metadata
from models.registry import MODEL_SPEC_ATTRIBUTE, create_model
from models.unet import (
    check_min_group_channels,
    spec_for_rebuild,
    spec_with_norm_rule,
    stored_min_group_channels,
)

log = logging.getLogger(__name__)

# Key of the flow's metadata in its checkpoints.
CHECKPOINT_KEY = "rectified_flow"
EMA_STATE_PREFIX = "ema.model."
NET_STATE_PREFIX = "net."
FLOW_WEIGHTS_FILE = "flow.pt"
COST_DESCRIPTION = "one network evaluation (the velocity network on one image), torch.utils.flop_counter"


# ---------------------------------------------------------------------------------------
# Reflow pairs as a data module


class ReflowPairDataModule(L.LightningDataModule):
    """Reflow pairs ``(z0, x1)`` from shards: the last ``holdout`` pairs validate and test, the rest train."""

    def __init__(self, folder: str | Path, batch_size: int = 128, holdout: int = 256, num_workers: int = 0) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.batch_size = batch_size
        self.holdout = holdout
        self.num_workers = num_workers
        self.dataset: ReflowPairDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        self.dataset = ReflowPairDataset(self.folder)
        if not 0 <= self.holdout < len(self.dataset):
            raise ValueError(
                f"holdout={self.holdout} must be >= 0 and smaller than the {len(self.dataset)} pairs in {self.folder}"
            )

    @property
    def in_channels(self) -> int:
        self.setup()
        return int(self.dataset.z0.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        self.setup()
        return int(self.dataset.z0.shape[2]), int(self.dataset.z0.shape[3])

    def _split(self, train: bool) -> Subset:
        self.setup()
        count = len(self.dataset)
        indices = range(count - self.holdout) if train else range(count - self.holdout, count)
        return Subset(self.dataset, list(indices))

    def train_dataloader(self) -> DataLoader:
        split = self._split(True)
        # Dropping the last partial batch keeps batch sizes equal, unless it would drop every batch.
        drop_last = len(split) > self.batch_size
        return DataLoader(
            split, batch_size=self.batch_size, shuffle=True, drop_last=drop_last, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._split(False), batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ---------------------------------------------------------------------------------------
# Shared parts of the two modules


class FlowModuleBase(ImageDataMixin, LightningModule):
    """A velocity network with its EMA, Adam-style optimizer with linear warm-up, and one sample grid after fit.

    Args:
        net: the velocity network, called as ``net(x, t * 999)``.
        optimizer: a factory taking parameter groups (Hydra's ``_partial_: true``).
        warmup_steps: linear learning-rate warm-up over this many optimizer steps.
        ema_decay: decay of the EMA of the weights, in [0, 1).
        role: what the network is in the pipeline (teacher, student), stored in checkpoints.
        sampling: the grid after fit: ``num_steps`` (Euler), ``num_samples``, ``seed``.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        warmup_steps: int = 0,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        role: str = "flow",
        sampling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_denoiser(net, "slimflow")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.net = net
        self.ema = EMA(net, ema_decay, warmup=ema_warmup)
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.role = role
        sampling = to_plain(sampling or {})
        self.grid_steps = int(sampling.get("num_steps", 1))
        self.grid_samples = int(sampling.get("num_samples", 64))
        self.grid_seed = int(sampling.get("seed", 0))
        self.grid_path: Path | None = None

    def setup(self, stage: str) -> None:
        self.read_image_data()

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Return the velocity at ``x`` and times ``t`` in [eps, 1] (eps when omitted, as for a cost count)."""
        if t is None:
            t = torch.full((x.shape[0],), T_EPSILON, device=x.device)
        return network_velocity(self.net)(x, t)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.net)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory([{"params": [p for p in self.net.parameters() if p.requires_grad]}])
        warmup = max(1, self.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero and self.grid_samples > 0:
            self.save_sample_grid(Path(self.trainer.default_root_dir) / "samples" / f"{self.role}.png")

    @torch.no_grad()
    def save_sample_grid(self, path: Path) -> Path:
        """Sample a grid from the EMA weights with ``grid_steps`` Euler steps and save it as PNG at ``path``."""
        count = min(self.grid_samples, 8) if self.trainer.fast_dev_run else self.grid_samples
        noise = torch.randn((count, *self.image_shape), generator=torch.Generator().manual_seed(self.grid_seed))
        self.ema.model.eval()
        samples, _ = sample_flow(network_velocity(self.ema.model), noise.to(self.device), "euler", self.grid_steps)
        self.grid_path = save_grid(to_uint8(samples.clamp(-1, 1).cpu()), path)
        rank_zero_info(f"[samples] {self.role}: {count} samples, Euler {self.grid_steps} step(s) -> {path}")
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"samples/{self.role}", images=[str(path)], step=self.global_step)
        return self.grid_path

    def cost_model(self) -> tuple[nn.Module, torch.Tensor]:
        """Return one network evaluation and a one-image input, for the FLOPs and energy callbacks."""
        if self.image_shape is None:
            raise ValueError(f"{type(self).__name__}'s cost is known after setup(), which sets the image shape")
        example = torch.zeros((1, *self.image_shape), device=self.device)
        return NetworkEvaluation(self.net, timestep=500), example

    def operation_counts(self) -> OperationCounts:
        """Return the MACs of one network evaluation, labelled as such for the energy estimate."""
        model, example = self.cost_model()
        return OperationCounts(macs=count_forward_cost(model, example).macs, source=COST_DESCRIPTION)

    def checkpoint_metadata(self) -> dict[str, Any]:
        """Return what :func:`load_flow_model` needs to rebuild the network, as plain Python values."""
        return {
            "model_spec": to_plain(spec_with_norm_rule(getattr(self.net, MODEL_SPEC_ATTRIBUTE, None), self.net)),
            **image_metadata(self.image_data),
            "role": self.role,
            "t_epsilon": T_EPSILON,
            "default_euler_steps": self.grid_steps,
            **self.extra_metadata(),
        }

    def extra_metadata(self) -> dict[str, Any]:
        """Return module-specific entries of the checkpoint metadata."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.checkpoint_metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        spec = (checkpoint.get(CHECKPOINT_KEY) or {}).get("model_spec")
        check_min_group_channels(stored_min_group_channels(spec), self.net, "the checkpoint")


# ---------------------------------------------------------------------------------------
# Teacher and reflow


class RectifiedFlowModule(FlowModuleBase):
    """Train a rectified flow on images (fresh noise) or on reflow pairs, optionally with Annealing Reflow.

    Args:
        anneal_steps: steps over which beta goes from 1 to 0 on pair batches; 0 uses the
            exact pairs throughout (plain reflow). Ignored on image batches.
        beta_schedule: linear, cosine or exponential (see :func:`diffusion.slimflow.annealing_beta`).
        flip_probability: probability per pair batch of flipping image and noise together.
        Others: see :class:`FlowModuleBase`.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        warmup_steps: int = 0,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        role: str = "teacher",
        sampling: dict[str, Any] | None = None,
        anneal_steps: int = 0,
        beta_schedule: str = "linear",
        flip_probability: float = 0.0,
    ) -> None:
        super().__init__(net, optimizer, warmup_steps, ema_decay, ema_warmup, role, sampling)
        annealing_beta(0, anneal_steps, beta_schedule)  # raises for an invalid schedule or step count
        if not 0.0 <= flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")
        self.anneal_steps = anneal_steps
        self.beta_schedule = beta_schedule
        self.flip_probability = flip_probability
        # Draws the per-batch flip on the CPU, so it does not depend on the device.
        self.flip_generator = torch.Generator().manual_seed(int(torch.initial_seed()) % (2**31))

    def pair_batch(
        self, batch: Any, generator: torch.Generator | None, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(z0, x1)``: the (annealed, flipped) pair of a pair batch, or fresh noise for an image batch."""
        first, second = batch
        if first.shape == second.shape and first.is_floating_point() and second.is_floating_point():
            z0, x1 = first, second
            if training:
                x1, z0 = joint_horizontal_flip(x1, z0, self.flip_probability, self.flip_generator)
                beta = annealing_beta(self.global_step, self.anneal_steps, self.beta_schedule)
                if beta > 0:
                    z0 = anneal_noise(z0, beta, torch.randn_like(z0))
                self.log("train/beta", beta, on_step=True, on_epoch=False, batch_size=len(z0))
            return z0, x1
        x1 = self.to_model_range(first)
        draw_device = x1.device if generator is None else torch.device("cpu")
        z0 = torch.randn(x1.shape, generator=generator, device=draw_device).to(x1.device, x1.dtype)
        return z0, x1

    def flow_loss(self, net: nn.Module, batch: Any, generator: torch.Generator | None, training: bool) -> torch.Tensor:
        z0, x1 = self.pair_batch(batch, generator, training)
        t = sample_time(len(x1), generator=generator, device=x1.device)
        return rectified_flow_loss(network_velocity(net), z0, x1, t)

    def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
        loss = self.flow_loss(self.net, batch, None, training=True)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch: Any, batch_index: int) -> None:
        self._evaluate(batch, batch_index, "val")

    def test_step(self, batch: Any, batch_index: int) -> None:
        self._evaluate(batch, batch_index, "test")

    def _evaluate(self, batch: Any, batch_index: int, split: str) -> None:
        # Noise and times are fixed per batch index, so the loss changes only with the weights.
        generator = torch.Generator().manual_seed(batch_index)
        loss = self.flow_loss(self.ema.model, batch, generator, training=False)
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=len(batch[0]), sync_dist=True)

    def extra_metadata(self) -> dict[str, Any]:
        return {"anneal_steps": self.anneal_steps, "beta_schedule": self.beta_schedule}


# ---------------------------------------------------------------------------------------
# Distillation


class FlowDistillationModule(FlowModuleBase):
    """Distil a flow into one step: term 1 on the pairs, plus term 2 (flow guidance) when ``flow_guidance``.

    The student starts from ``net`` (the reflow result) and ``guide`` is a frozen copy of the
    reflow model's EMA. Both terms have weight 1, as in SlimFlow. ``distance`` is
    ``{"name": pseudo_huber | l2 | lpips, "vgg_weights": path or None}``.
    Validation and test report ``one_step_distance``, the distance of the EMA student's
    one-step images to the teacher's end points on held-out pairs, also logged as ``loss``.
    """

    def __init__(
        self,
        net: nn.Module,
        guide: nn.Module,
        optimizer: OptimizerFactory,
        warmup_steps: int = 0,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        role: str = "student",
        sampling: dict[str, Any] | None = None,
        distance: dict[str, Any] | None = None,
        flow_guidance: bool = True,
        t_prime_range: tuple[float, float] = (0.2, 0.8),
    ) -> None:
        super().__init__(net, optimizer, warmup_steps, ema_decay, ema_warmup, role, sampling)
        distance = to_plain(distance or {"name": "pseudo_huber"})
        self.distance_name = distance.get("name", "pseudo_huber")
        self.distance = make_distance(self.distance_name, distance.get("vgg_weights"))
        self.guide = guide.eval().requires_grad_(False)
        self.flow_guidance = flow_guidance
        low, high = (float(value) for value in t_prime_range)
        sample_t_prime(1, low, high)  # raises for an invalid range
        self.t_prime_range = (low, high)

    def train(self, mode: bool = True) -> "FlowDistillationModule":
        super().train(mode)
        self.guide.eval()
        return self

    def distillation_losses(self, z0: torch.Tensor, x1: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return term 1 (paired) and, with flow guidance, term 2 (guided) on one batch of pairs."""
        student = network_velocity(self.net)
        losses = {"paired": paired_distillation_loss(student, z0, x1, self.distance)}
        if self.flow_guidance:
            noise = torch.randn_like(z0)
            t_prime = sample_t_prime(len(z0), *self.t_prime_range).to(z0.device)
            losses["guided"] = flow_guidance_loss(student, network_velocity(self.guide), noise, t_prime, self.distance)
        return losses

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        z0, x1 = batch
        losses = self.distillation_losses(z0, x1)
        loss = sum(losses.values())
        for name, value in losses.items():
            self.log(f"train/{name}_loss", value, on_step=True, on_epoch=True, batch_size=len(z0))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(z0))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> None:
        z0, x1 = batch
        distance = paired_distillation_loss(network_velocity(self.ema.model), z0, x1, self.distance)
        self.log(f"{split}/one_step_distance", distance, batch_size=len(z0), sync_dist=True)
        self.log(f"{split}/loss", distance, prog_bar=True, batch_size=len(z0), sync_dist=True)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # The LPIPS network is fixed and comes from its own files, so checkpoints leave it out.
        state = super().state_dict(*args, **kwargs)
        return {key: value for key, value in state.items() if not key.startswith("distance.")}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, **kwargs: Any) -> Any:
        own = super().state_dict()
        merged = {**{key: value for key, value in own.items() if key.startswith("distance.")}, **state_dict}
        return super().load_state_dict(merged, strict=strict, **kwargs)

    def extra_metadata(self) -> dict[str, Any]:
        return {
            "distance": self.distance_name,
            "distance_description": describe_distance(self.distance_name),
            "flow_guidance": self.flow_guidance,
            "t_prime_range": list(self.t_prime_range),
        }


# ---------------------------------------------------------------------------------------
# Checkpoints


def save_flow_checkpoint(module: FlowModuleBase, folder: Path) -> Path:
    """Save the module's weights and metadata atomically as ``flow.pt`` in ``folder``; return the path.

    The file has Lightning's layout (``state_dict`` and the ``"rectified_flow"`` entry), so
    :func:`load_flow_model`, ``sample.py`` and the pipeline's ``load_stage_weights`` read it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FLOW_WEIGHTS_FILE
    if rank_zero_only.rank == 0:
        temporary = path.with_name(f".{path.name}.tmp")
        torch.save({"state_dict": module.state_dict(), CHECKPOINT_KEY: module.checkpoint_metadata()}, temporary)
        os.replace(temporary, path)
    return path


@dataclass
class LoadedFlow:
    """A velocity network rebuilt from a rectified-flow checkpoint, with its metadata."""

    net: nn.Module
    image_shape: tuple[int, int, int]
    metadata: dict[str, Any]


def is_flow_checkpoint(checkpoint: dict[str, Any]) -> bool:
    """Return whether a loaded checkpoint dict was written by a rectified-flow module of this file."""
    return isinstance(checkpoint, dict) and CHECKPOINT_KEY in checkpoint


def load_flow_model(path: str | Path, use_ema: bool = True) -> LoadedFlow:
    """Rebuild the velocity network of a flow checkpoint (``flow.pt`` or a Lightning ``.ckpt``) on the CPU.

    Reads with ``torch.load(weights_only=True)``. Raises ValueError when the file is not a
    rectified-flow checkpoint or has no weights under the chosen prefix.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not is_flow_checkpoint(checkpoint):
        raise ValueError(
            f"{path} has no {CHECKPOINT_KEY!r} entry, so it is not a rectified-flow checkpoint; pass the flow.pt "
            "of a SlimFlow stage (stages/<stage>/flow.pt) or a .ckpt of experiment=slimflow_*"
        )
    metadata = checkpoint[CHECKPOINT_KEY]
    if metadata.get("model_spec") is None or metadata.get("image_shape") is None:
        raise ValueError(f"{path} does not record its network or image shape, so the network cannot be rebuilt")
    prefix = EMA_STATE_PREFIX if use_ema else NET_STATE_PREFIX
    state = {key[len(prefix) :]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
    if not state:
        raise ValueError(f"{path} has no weights under {prefix!r}")
    spec = spec_for_rebuild(dict(metadata["model_spec"]))
    net = create_model(spec.pop("name"), spec.pop("in_channels"), spec.pop("num_classes"), **spec)
    net.load_state_dict(state)
    return LoadedFlow(net=net.eval(), image_shape=tuple(metadata["image_shape"]), metadata=metadata)


@torch.no_grad()
def generate_flow_samples(
    net: nn.Module,
    image_shape: tuple[int, int, int],
    num_samples: int,
    batch_size: int,
    seed: int,
    device: torch.device | str,
    solver: str = "euler",
    num_steps: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> tuple[torch.Tensor, float]:
    """Return ``num_samples`` images in [-1, 1] on the CPU and the mean network evaluations per image.

    The noise of all images comes from one CPU generator seeded with ``seed``, so Euler
    samples do not depend on ``batch_size``. RK45 shares its step size within a batch, so
    its evaluations (and, within the tolerance, its samples) depend on the batch.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    noise = torch.randn((num_samples, *image_shape), generator=torch.Generator().manual_seed(seed))
    velocity = network_velocity(net.eval())
    batches, evaluations = [], []
    for start in range(0, num_samples, batch_size):
        batch = noise[start : start + batch_size].to(device)
        samples, count = sample_flow(velocity, batch, solver, num_steps, rtol=rtol, atol=atol)
        batches.append(samples.clamp(-1.0, 1.0).float().cpu())
        evaluations.append(count)
    return torch.cat(batches), float(np.mean(evaluations))


def copy_for_guide(net: nn.Module) -> nn.Module:
    """Return a frozen copy of ``net`` in eval mode, the guide of Flow-Guided Distillation."""
    return copy.deepcopy(net).eval().requires_grad_(False)
