"""DDPM training: a denoising network, its EMA copy, and sample grids from the EMA weights.

:class:`DDPMModule` trains ``net(x_t, timesteps[, class_labels])`` to predict the noise,
x0 or v (Ho et al., "Denoising Diffusion Probabilistic Models", 2020) on any data module
of :mod:`lightning_modules.data`. Those yield images normalised with the training set's
per-channel mean and std, and the module maps them back to [-1, 1], the range the
samplers' ``clip_x0=1`` assumes.

The checkpoint stores, beside Lightning's usual content, the EMA weights (under
``ema.model.``) and a ``"diffusion"`` entry of plain Python values: the network's
:func:`models.create_model` arguments, the noise schedule, the prediction type and the
image shape. ``sample.py`` rebuilds the network from it with ``torch.load(weights_only=True)``.
"""

import copy
import inspect
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from torchvision.utils import make_grid

from diffusion import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPlusPlus2MSampler,
    Sampler,
    TimeShift,
    add_noise,
    make_schedule,
    prediction_target,
)
from diffusion.prediction import validate_prediction_type
from lightning_modules.callbacks.energy import OperationCounts
from lightning_modules.callbacks.flops import count_forward_cost
from lightning_modules.classifier import OptimizerFactory, scheduled_optimizer
from lightning_modules.image_data import ImageDataMixin, image_metadata
from lightning_modules.seeds import STEP_NOISE_STREAM, derive_seed
from models.registry import MODEL_SPEC_ATTRIBUTE, create_model
from models.unet import (
    check_min_group_channels,
    spec_for_rebuild,
    spec_with_norm_rule,
    stored_min_group_channels,
)

log = logging.getLogger(__name__)

SAMPLER_CLASSES: dict[str, type[Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "dpm_solver": DPMSolverPlusPlus2MSampler,
}

# Key of the module's own entry in a Lightning checkpoint.
CHECKPOINT_KEY = "diffusion"
EMA_STATE_PREFIX = "ema.model."
NET_STATE_PREFIX = "net."

# Images in a sample grid under the trainer's fast_dev_run.
FAST_DEV_RUN_GRID_SAMPLES = 8

# initial_sample(noise, alphabar_first, indices) -> the sample a sampler starts from (see generate_samples).
InitialSampleFunction = Callable[[torch.Tensor, float, slice], torch.Tensor]

COST_DESCRIPTION = "one network evaluation (the denoiser on one image and a timestep), torch.utils.flop_counter"


# ---------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample: which sampler, how many steps, and its options.

    Args:
        name: ``"ddpm"``, ``"ddim"`` or ``"dpm_solver"`` (DPM-Solver++ 2M).
        num_steps: sampling steps, one network evaluation each.
        spacing: timestep spacing, ``"trailing"``, ``"leading"`` or ``"linspace"``.
        eta: DDIM's noise scale (0 deterministic, 1 like DDPM); the other samplers ignore it.
        clip_x0: clamp x0 predictions to ``[-clip_x0, clip_x0]``, or None for no clamp.
        time_shift: ``{"window": w, "cutoff": c, "placement": p}`` for time-shift
            sampling (see :mod:`diffusion.time_shift`); a window of 0 turns it off.
    """

    name: str = "ddim"
    num_steps: int = 50
    spacing: str = "trailing"
    eta: float = 0.0
    clip_x0: float | None = 1.0
    time_shift: dict[str, Any] = field(default_factory=lambda: {"window": 0, "cutoff": 0})

    def __post_init__(self) -> None:
        if self.name not in SAMPLER_CLASSES:
            raise ValueError(
                f"unknown sampler {self.name!r}; valid samplers: {', '.join(SAMPLER_CLASSES)} "
                "(and, in sample.py, flow for the checkpoints of SlimFlow)"
            )
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {self.num_steps!r}")

    def make_time_shift(self) -> TimeShift | None:
        """Return the :class:`TimeShift` these settings describe, or None where the window is 0."""
        settings = dict(self.time_shift or {})
        unknown = set(settings) - {"window", "cutoff", "placement"}
        if unknown:
            raise ValueError(
                f"unknown time_shift settings {sorted(unknown)}; valid settings: window, cutoff, placement"
            )
        # Built even for window 0, so that a misspelt setting fails although time shift is off.
        time_shift = TimeShift(
            window=settings.get("window", 0),
            cutoff=settings.get("cutoff", 0),
            placement=settings.get("placement", "sample"),
        )
        return time_shift if time_shift.window > 0 else None

    def describe(self) -> str:
        """Return a short description such as ``"ddim, 50 steps, trailing"``, for logs and summaries."""
        text = f"{self.name}, {self.num_steps} steps, {self.spacing}"
        if self.name == "ddim":
            text += f", eta {self.eta}"
        time_shift = self.make_time_shift()
        if time_shift is not None:
            text += (
                f", time shift window {time_shift.window} cutoff {time_shift.cutoff} placement {time_shift.placement}"
            )
        return text


def build_sampler(settings: SamplerSettings, alphabar: torch.Tensor, prediction_type: str) -> Sampler:
    """Create the sampler that ``settings`` names for a model trained on ``alphabar`` with ``prediction_type``."""
    options: dict[str, Any] = {
        "prediction_type": prediction_type,
        "clip_x0": settings.clip_x0,
        "time_shift": settings.make_time_shift(),
    }
    if settings.name == "ddim":
        options["eta"] = settings.eta
    return SAMPLER_CLASSES[settings.name](alphabar, **options)


def to_plain(value: Any) -> Any:
    """Convert OmegaConf containers, mappings and tuples to dicts and lists of plain Python values.

    Checkpoints are loaded with ``weights_only=True``, which rejects OmegaConf objects.
    """
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    return value


# ---------------------------------------------------------------------------------------
# EMA


class EMA(nn.Module):
    """Exponential moving average of a model's weights: ``ema = decay * ema + (1 - decay) * weights``.

    With ``warmup``, update ``n`` (counting from 0) uses ``min(decay, (1 + n) / (10 + n))``, as
    TensorFlow's ``ExponentialMovingAverage`` does when given ``num_updates``. Early updates
    then follow the fast-changing weights closely instead of averaging in the random
    initialisation for thousands of steps. Buffers (such as BatchNorm statistics) are
    copied, not averaged. The copy never receives gradients. Lightning switches it to train
    mode with the rest of the module, so put it in eval mode before evaluating it.

    Args:
        model: the model to average; it is deep-copied once, here.
        decay: weight of the old average per update, in [0, 1).
        warmup: ramp the decay up over the first updates as described above.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), for example 0.999, got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        # A buffer, so the count travels in the checkpoint and a resumed run continues the warm-up.
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    def current_decay(self) -> float:
        """Return the decay that the next :meth:`update` uses."""
        if not self.warmup:
            return self.decay
        updates = int(self.num_updates)
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights."""
        decay = self.current_decay()
        for averaged, current in zip(self.model.parameters(), model.parameters(), strict=True):
            averaged.lerp_(current.detach().to(averaged.dtype), 1.0 - decay)
        for averaged, current in zip(self.model.buffers(), model.buffers(), strict=True):
            averaged.copy_(current)
        self.num_updates += 1


# ---------------------------------------------------------------------------------------
# Sampling helpers shared by the module and sample.py


class NetworkEvaluation(nn.Module):
    """One call of a denoiser at a fixed timestep, as a one-input module that cost counters can run.

    ``forward(x)`` returns ``net(x, timesteps)`` with ``timestep`` for every image, and with
    the null class for a class-conditional network (the cost is the same for any class).
    """

    def __init__(self, net: nn.Module, timestep: int) -> None:
        super().__init__()
        self.net = net
        self.timestep = timestep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        timesteps = torch.full((x.shape[0],), self.timestep, dtype=torch.int64, device=x.device)
        return self.net(x, timesteps)


def check_denoiser(net: nn.Module, module_option: str) -> None:
    """Raise a ``ValueError`` unless ``net.forward`` takes the timesteps after the images.

    A classifier such as ``resnet20`` (the default model) takes images only, and would fail
    later inside a cost callback with a bare ``TypeError``.
    """
    parameters = list(inspect.signature(net.forward).parameters.values())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return
    raise ValueError(
        f"module={module_option} needs a network that takes (images, timesteps), but {type(net).__name__} takes "
        "images only. Choose a denoiser, such as model=unet or model=unet_slimflow_15m"
    )


def is_class_conditional(net: nn.Module) -> bool:
    """Return whether ``net`` takes class labels: it has a ``num_classes`` attribute that is not None."""
    return getattr(net, "num_classes", None) is not None


def cycle_class_labels(num_samples: int, num_classes: int, class_label: int | None = None) -> torch.Tensor:
    """Return int64 labels ``(num_samples,)``: all ``class_label``, or 0, 1, ..., num_classes - 1 repeated."""
    if class_label is not None:
        if not 0 <= class_label <= num_classes:
            raise ValueError(
                f"class_label must be in 0..{num_classes} ({num_classes} is the null class), got {class_label}"
            )
        return torch.full((num_samples,), class_label, dtype=torch.int64)
    return torch.arange(num_samples, dtype=torch.int64) % num_classes


@torch.no_grad()
def generate_samples(
    net: nn.Module,
    sampler: Sampler,
    settings: SamplerSettings,
    image_shape: Sequence[int],
    num_samples: int,
    batch_size: int,
    seed: int,
    device: torch.device | str,
    class_labels: torch.Tensor | None = None,
    initial_sample: InitialSampleFunction | None = None,
) -> tuple[torch.Tensor, int]:
    """Sample ``num_samples`` images in batches; return them on the CPU in [-1, 1] and the NFE per image.

    The initial noise of all images is drawn at once from a CPU generator seeded with
    ``seed``, so a deterministic sampler (DDIM with eta 0, DPM-Solver++) gives the same
    images for any ``batch_size``, up to floating-point rounding. The noise that DDPM and
    DDIM with eta > 0 add on the way comes from a generator per batch, so those samples
    depend on ``batch_size`` too.

    Args:
        net: the denoiser, put in eval mode while sampling, called as ``net(x, timesteps)`` or with
            ``class_labels=`` for a class-conditional network.
        image_shape: ``(C, H, W)``.
        class_labels: int64 ``(num_samples,)`` for a class-conditional network, else None.
        initial_sample: called as ``initial_sample(noise, alphabar_first, indices)`` on each
            batch of pure noise. ``alphabar_first`` is alphabar at the sampler's first timestep
            and ``indices`` the batch's slice of the ``num_samples`` images. It returns the
            sample the sampler starts from (One More Step, :class:`diffusion.oms.OMSHandover`).
            None starts from the noise. Its network evaluations are not counted in the returned NFE.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    was_training = net.training
    net.eval()
    try:
        return _sample_in_batches(
            net, sampler, settings, image_shape, num_samples, batch_size, seed, device, class_labels, initial_sample
        )
    finally:
        net.train(was_training)


def _sample_in_batches(
    net: nn.Module,
    sampler: Sampler,
    settings: SamplerSettings,
    image_shape: Sequence[int],
    num_samples: int,
    batch_size: int,
    seed: int,
    device: torch.device | str,
    class_labels: torch.Tensor | None,
    initial_sample: InitialSampleFunction | None = None,
) -> tuple[torch.Tensor, int]:
    device = torch.device(device)
    noise = torch.randn((num_samples, *image_shape), generator=torch.Generator().manual_seed(seed))

    batches = []
    evaluations = 0
    for start in range(0, num_samples, batch_size):
        batch_noise = noise[start : start + batch_size].to(device)
        if initial_sample is not None:
            # set_timesteps fixes the first timestep for this sampler, step count and spacing;
            # sampler.sample below calls it again and gets the same timesteps.
            sampler.set_timesteps(settings.num_steps, settings.spacing)
            alphabar_first = float(sampler.alphabar[sampler.timesteps[0]])
            batch_noise = initial_sample(batch_noise, alphabar_first, slice(start, start + len(batch_noise)))
        # A hashed seed keeps this batch's step noise apart from every seed's initial noise.
        step_generator = torch.Generator(device=device).manual_seed(derive_seed(STEP_NOISE_STREAM, seed, start))
        model_kwargs = {}
        if class_labels is not None:
            model_kwargs["class_labels"] = class_labels[start : start + batch_size].to(device)
        output = sampler.sample(
            net,
            tuple(batch_noise.shape),
            num_steps=settings.num_steps,
            spacing=settings.spacing,
            generator=step_generator,
            noise=batch_noise,
            model_kwargs=model_kwargs,
        )
        batches.append(output.samples.float().cpu())
        evaluations = output.num_model_evaluations
    return torch.cat(batches), evaluations


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] to uint8 0..255, rounding and clamping values outside the range."""
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, min_cell_size: int = 32) -> Path:
    """Save uint8 images ``(B, C, H, W)`` as one PNG grid; return the path.

    Images smaller than ``min_cell_size`` pixels are enlarged by an integer factor with
    nearest-neighbour sampling, so 8x8 digits stay legible. Grey images are saved as RGB.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"save_grid expects uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    scale = max(1, min_cell_size // min(images.shape[2], images.shape[3]))
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    nrow = nrow or max(1, int(np.ceil(np.sqrt(len(images)))))
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def save_samples(
    images: torch.Tensor, settings: dict[str, Any], output_dir: Path, labels: torch.Tensor | None = None
) -> tuple[Path, Path, np.ndarray]:
    """Write uint8 images ``(N, C, H, W)`` as ``samples.png`` and ``samples.npz`` in ``output_dir``.

    The npz file contains ``images`` (uint8 ``(N, H, W, C)``), ``settings`` (a JSON string) and,
    when given, ``labels``. Returns the grid path, the npz path and the ``(N, H, W, C)`` array.
    """
    grid_path = save_grid(images, output_dir / "samples.png")
    arrays = {"images": images.permute(0, 2, 3, 1).numpy(), "settings": np.array(json.dumps(settings))}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    npz_path = output_dir / "samples.npz"
    np.savez(npz_path, **arrays)
    return grid_path, npz_path, arrays["images"]


def per_evaluation_flops(net: nn.Module, image_shape: Sequence[int], device: torch.device | str) -> float:
    """Return the FLOPs of one network evaluation on one image of ``image_shape`` ``(C, H, W)``."""
    example = torch.zeros((1, *image_shape), device=device)
    return count_forward_cost(NetworkEvaluation(net, timestep=0), example).flops


# ---------------------------------------------------------------------------------------
# The LightningModule


class DDPMModule(ImageDataMixin, LightningModule):
    """Train a denoising diffusion model; keep an EMA of its weights and sample from it.

    Each training step draws a timestep ``t`` uniformly from the ``N`` training timesteps and
    noise ``epsilon`` for every image, forms ``x_t = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) epsilon``
    and regresses the network output on the target of ``prediction_type`` with the mean
    squared error. Validation and test report the same loss for the EMA weights, with
    noise and timesteps fixed per batch, so the numbers are comparable between epochs.

    Args:
        net: the denoiser, called as ``net(x_t, timesteps)``, or with ``class_labels=`` where
            it has a ``num_classes`` attribute that is not None (see :class:`models.unet.UNet`).
        optimizer: a factory taking parameter groups (Hydra's ``_partial_: true``).
        scheduler: keyword arguments of :func:`lightning_modules.schedules.build_scheduler`
            without the optimizer and step counts.
        num_classes: classes of the data set. A class-conditional network must have as many.
        noise_schedule: arguments of :func:`diffusion.make_schedule`: ``name``,
            ``num_train_timesteps``, ``zero_terminal_snr`` and the schedule's own options.
        prediction_type: what the network predicts, ``"epsilon"``, ``"x0"`` or ``"v"``.
        ema_decay: decay of the EMA of the weights, in [0, 1).
        ema_warmup: ramp the EMA decay up over the first updates (see :class:`EMA`).
        class_dropout: probability of replacing a label by the null class in training, so a
            class-conditional network also learns the unconditional model that
            classifier-free guidance needs. Ignored for unconditional networks.
        sampling: settings of the sample grids: ``sampler`` (keyword arguments of
            :class:`SamplerSettings`), ``num_samples``, ``batch_size``, ``every_n_epochs``
            (0 for no grids) and ``seed``. A grid is made after the validation of every
            ``every_n_epochs``-th epoch and of the last epoch.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: dict[str, Any],
        num_classes: int,
        noise_schedule: dict[str, Any] | None = None,
        prediction_type: str = "epsilon",
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        class_dropout: float = 0.1,
        sampling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_denoiser(net, "ddpm")
        validate_prediction_type(prediction_type)
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {class_dropout}")

        self.net = net
        self.ema = EMA(net, ema_decay, warmup=ema_warmup)
        self.optimizer_factory = optimizer
        self.scheduler_options = dict(scheduler)
        self.num_classes = num_classes
        self.prediction_type = prediction_type
        self.class_dropout = class_dropout
        self.class_conditional = is_class_conditional(net)
        if self.class_conditional and net.num_classes != num_classes:
            raise ValueError(
                f"the network is conditioned on {net.num_classes} classes but the data set has {num_classes}; "
                "build it with the data set's number of classes"
            )

        self.noise_schedule = to_plain(noise_schedule or {"name": "linear", "num_train_timesteps": 1000})
        # alphabar is a float64 CPU tensor, not a buffer, because MPS devices have no float64.
        # The checkpoint stores the schedule's settings, from which it is rebuilt.
        self.alphabar = make_schedule(**self.noise_schedule)
        if prediction_type == "epsilon" and float(self.alphabar[-1]) == 0.0:
            raise ValueError(
                "prediction_type 'epsilon' cannot be trained on a zero-terminal-SNR schedule, because the noise "
                "equals the input at the last timestep; use module.prediction_type=v or x0"
            )

        sampling = to_plain(sampling or {})
        self.sampler_settings = SamplerSettings(**sampling.get("sampler", {}))
        self.num_grid_samples = int(sampling.get("num_samples", 64))
        self.grid_batch_size = int(sampling.get("batch_size", self.num_grid_samples))
        self.sample_every_n_epochs = int(sampling.get("every_n_epochs", 1))
        self.sampling_seed = int(sampling.get("seed", 0))
        if self.sample_every_n_epochs < 0:
            raise ValueError(
                f"sampling.every_n_epochs must be >= 0 (0 turns grids off), got {self.sample_every_n_epochs}"
            )

        self.grid_paths: list[Path] = []

    # -- data ----------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self.read_image_data()

    # -- training and evaluation ---------------------------------------------------------

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """Return the network's prediction for ``x`` at ``timesteps`` (all 0 when omitted, as for a cost count)."""
        if timesteps is None:
            timesteps = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        return self.net(x, timesteps)

    def denoising_loss(
        self,
        net: nn.Module,
        batch: tuple[torch.Tensor, torch.Tensor],
        generator: torch.Generator | None = None,
        drop_labels: bool = False,
    ) -> torch.Tensor:
        """Return the mean squared error of ``net``'s prediction on a batch at random timesteps.

        Without ``generator``, timesteps and noise are drawn on the batch's device. A
        ``generator`` must be a CPU generator: the draws are then made on the CPU and moved,
        so a seeded generator gives the same draws on any device.
        """
        images, labels = batch
        x0 = self.to_model_range(images)
        batch_size = x0.shape[0]
        draw_device = x0.device if generator is None else torch.device("cpu")
        timesteps = torch.randint(0, len(self.alphabar), (batch_size,), generator=generator, device=draw_device)
        noise = torch.randn(x0.shape, generator=generator, device=draw_device).to(x0.device, x0.dtype)
        alphabar_t = self.alphabar[timesteps.cpu()]
        x_t = add_noise(x0, noise, alphabar_t)
        target = prediction_target(x0, noise, alphabar_t, self.prediction_type)

        model_kwargs = {}
        if self.class_conditional:
            labels = labels.clone()
            if drop_labels and self.class_dropout > 0:
                dropped = torch.rand(batch_size, generator=generator, device=draw_device) < self.class_dropout
                labels[dropped.to(labels.device)] = self.net.num_classes
            model_kwargs["class_labels"] = labels
        prediction = net(x_t, timesteps.to(x0.device), **model_kwargs)
        return F.mse_loss(prediction.float(), target.float())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        loss = self.denoising_loss(self.net, batch, drop_labels=True)
        batch_size = len(batch[1])
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self.log("train/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Updating here, not in on_train_batch_end, gives one EMA update per optimizer step
        # under gradient accumulation too.
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.net)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        self._evaluate(batch, batch_index, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        self._evaluate(batch, batch_index, "test")

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int, split: str) -> None:
        # A generator seeded by the batch index fixes the timesteps and noise of each batch,
        # so the loss changes between epochs only because the weights do.
        generator = torch.Generator().manual_seed(batch_index)
        loss = self.denoising_loss(self.ema.model, batch, generator=generator)
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=len(batch[1]), sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        # Only the trained network: the EMA copy is updated by averaging, not by gradients.
        optimizer = self.optimizer_factory([{"params": [p for p in self.net.parameters() if p.requires_grad]}])
        return scheduled_optimizer(self.trainer, optimizer, self.scheduler_options)

    # -- sample grids --------------------------------------------------------------------

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self.sample_every_n_epochs == 0 or not self.trainer.is_global_zero:
            return
        epoch = self.current_epoch + 1
        # max_epochs is -1 for a run limited by max_steps only, which has no known last epoch.
        max_epochs = self.trainer.max_epochs
        last_epoch = max_epochs is not None and max_epochs > 0 and epoch >= max_epochs
        if epoch % self.sample_every_n_epochs != 0 and not last_epoch:
            return
        self.save_sample_grid(Path(self.trainer.default_root_dir) / "samples" / f"epoch_{epoch:04d}.png")

    def save_sample_grid(self, path: Path) -> Path:
        """Sample a grid from the EMA weights, save it as a PNG at ``path`` and log it; return the path.

        The noise is the same at every call (seeded by ``sampling.seed``), so grids of
        different epochs show how the same samples change. Under the trainer's
        ``fast_dev_run`` the grid has at most 8 images.
        """
        if self.image_shape is None:
            raise RuntimeError("the image shape is set in setup(); call save_sample_grid during fit or test")
        num_samples = self.num_grid_samples
        if self.trainer.fast_dev_run:
            # A smoke test checks that sampling runs, with every step; a full grid would only slow it.
            num_samples = min(num_samples, FAST_DEV_RUN_GRID_SAMPLES)
        labels = cycle_class_labels(num_samples, self.net.num_classes) if self.class_conditional else None
        sampler = build_sampler(self.sampler_settings, self.alphabar, self.prediction_type)
        start = time.perf_counter()
        samples, evaluations = generate_samples(
            self.ema.model,
            sampler,
            self.sampler_settings,
            self.image_shape,
            num_samples,
            self.grid_batch_size,
            self.sampling_seed,
            self.device,
            class_labels=labels,
        )
        seconds = time.perf_counter() - start
        images = to_uint8(samples)
        save_grid(images, path, nrow=self.net.num_classes if self.class_conditional else None)
        self.grid_paths.append(path)
        rank_zero_info(
            f"[samples] epoch {self.current_epoch + 1}: {len(images)} samples ({self.sampler_settings.describe()}, "
            f"{evaluations} network evaluations per image) in {seconds:.1f} s -> {path}"
        )
        self._log_grid(path, images)
        return path

    def _log_grid(self, path: Path, images: torch.Tensor) -> None:
        caption = f"EMA, {self.sampler_settings.describe()}, epoch {self.current_epoch + 1}"
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], caption=[caption], step=self.global_step)
            elif isinstance(logger, TensorBoardLogger):
                grid = make_grid(images, nrow=max(1, int(np.ceil(np.sqrt(len(images))))), padding=2)
                logger.experiment.add_image("samples", grid, global_step=self.global_step)

    # -- cost hooks and checkpoint -------------------------------------------------------

    def cost_model(self) -> tuple[nn.Module, torch.Tensor]:
        """Return one network evaluation and a one-image input, for the FLOPs and energy callbacks.

        A sampler with ``n`` steps costs ``n`` of these per image.
        """
        if self.image_shape is None:
            raise ValueError("DDPMModule's cost is known after setup(), which sets the image shape")
        example = torch.zeros((1, *self.image_shape), device=self.device)
        return NetworkEvaluation(self.net, timestep=len(self.alphabar) // 2), example

    def operation_counts(self) -> OperationCounts:
        """Return the MACs of one network evaluation, labelled as such for the energy estimate."""
        model, example = self.cost_model()
        return OperationCounts(macs=count_forward_cost(model, example).macs, source=COST_DESCRIPTION)

    def configure_callbacks(self) -> list[L.Callback]:
        return [DiffusionSummaryCallback()]

    def checkpoint_metadata(self) -> dict[str, Any]:
        """Return what sample.py needs to rebuild the network and its sampler, as plain Python values."""
        spec = getattr(self.net, MODEL_SPEC_ATTRIBUTE, None)
        if spec is None:
            log.warning("the network was not built by models.create_model; sample.py cannot rebuild it")
        return {
            "model_spec": to_plain(spec_with_norm_rule(spec, self.net)),
            "noise_schedule": self.noise_schedule,
            "prediction_type": self.prediction_type,
            "class_conditional": self.class_conditional,
            **image_metadata(self.image_data),
            "ema_decay": self.ema.decay,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.checkpoint_metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        spec = (checkpoint.get(CHECKPOINT_KEY) or {}).get("model_spec")
        check_min_group_channels(stored_min_group_channels(spec), self.net, "the checkpoint")


class DiffusionSummaryCallback(L.Callback):
    """Add rows to the run summary stating that the cost figures are per network evaluation.

    The FLOPs and energy callbacks count one forward pass of the module's ``cost_model()``,
    here one call of the denoiser, while an image costs one call per sampling step.
    """

    def __init__(self) -> None:
        self.module: DDPMModule | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(pl_module, DDPMModule):
            self.module = pl_module

    def summary_rows(self) -> list[tuple[str, str]]:
        """Return ``(label, text)`` rows for the terminal summary."""
        module = self.module
        if module is None or module.image_shape is None:
            return []
        settings = module.sampler_settings
        flops = per_evaluation_flops(module.net, module.image_shape, module.device)
        rows = [
            ("cost counted", "per network evaluation (one denoiser call on one image); MACs and FLOPs above too"),
            (
                "sampling cost",
                f"{settings.num_steps} network evaluations per image ({settings.describe()}) = "
                f"{flops * settings.num_steps / 1e9:.4g} GFLOPs per image",
            ),
        ]
        if module.grid_paths:
            rows.append(("sample grid", str(module.grid_paths[-1])))
        return rows


# ---------------------------------------------------------------------------------------
# Loading a checkpoint


@dataclass
class LoadedDenoiser:
    """A denoiser rebuilt from a :class:`DDPMModule` checkpoint, with what sampling needs."""

    net: nn.Module
    alphabar: torch.Tensor
    prediction_type: str
    image_shape: tuple[int, int, int]
    metadata: dict[str, Any]

    @property
    def class_conditional(self) -> bool:
        """Whether the network takes class labels."""
        return is_class_conditional(self.net)


def load_denoiser(checkpoint_path: str | Path, use_ema: bool = True) -> LoadedDenoiser:
    """Rebuild the denoiser of a :class:`DDPMModule` checkpoint on the CPU, with its EMA weights by default.

    The file is read with ``torch.load(weights_only=True)``, which unpickles only tensors
    and plain Python containers, so loading a checkpoint from elsewhere does not run code stored in it.

    Raises:
        ValueError: if the checkpoint has no ``"diffusion"`` entry (not written by DDPMModule)
            or no weights under the chosen prefix.
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    metadata = checkpoint.get(CHECKPOINT_KEY)
    if metadata is None:
        raise ValueError(
            f"{checkpoint_path} has no {CHECKPOINT_KEY!r} entry, so it was not written by DDPMModule; "
            "pass a checkpoint of a run with module=ddpm, or add sampler=flow for a SlimFlow flow.pt"
        )
    if metadata.get("model_spec") is None:
        raise ValueError(
            f"{checkpoint_path} does not record how its network was built, because the network was not made by "
            "models.create_model; train with a model config whose _target_ is models.create_model"
        )

    prefix = EMA_STATE_PREFIX if use_ema else NET_STATE_PREFIX
    state = {key[len(prefix) :]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
    if not state:
        raise ValueError(f"{checkpoint_path} has no weights under {prefix!r}")

    spec = spec_for_rebuild(dict(metadata["model_spec"]))
    net = create_model(spec.pop("name"), spec.pop("in_channels"), spec.pop("num_classes"), **spec)
    net.load_state_dict(state)
    net.eval()
    return LoadedDenoiser(
        net=net,
        alphabar=make_schedule(**metadata["noise_schedule"]),
        prediction_type=metadata["prediction_type"],
        image_shape=tuple(metadata["image_shape"]),
        metadata=metadata,
    )
