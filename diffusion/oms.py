"""One More Step (OMS): one extra step from pure noise that fixes a schedule's non-zero terminal SNR.

Source: Hu et al., "One More Step: A Versatile Plug-and-Play Module for Rectifying Diffusion
Schedule Flaws and Enhancing Low-Frequency Controls" (CVPR 2024).

A schedule such as Stable Diffusion's scaled-linear one ends at ``alphabar[N - 1]`` of about
0.0047, so every training input at the last timestep still contains ``0.068 * x0``. Sampling
starts from pure noise, which contains none, and the model then falls back on an average
image: its samples are rarely very dark or very bright. OMS leaves that base model and its
sampler untouched and adds one step in front of them:

1. A compact network that has no time input (:class:`OMSNetwork`) reads pure noise
   ``x_T ~ N(0, I)`` and, optionally, a condition of its own (a class label or a brightness
   bin). It predicts v under a zero-terminal-SNR view of the schedule. At ``alphabar = 0``,
   ``v = sqrt(alphabar) * epsilon - sqrt(1 - alphabar) * x0 = -x0``, so ``x0_hat = -output``
   (:func:`oms_x0_from_v`). Trained with the mean squared error against the data
   (:func:`oms_loss`), its best prediction from pure noise is the conditional mean of the
   data: the overall brightness and colour that the base model cannot recover.
2. One step from ``x_T`` to the base sampler's first timestep ``t1`` (:func:`handover_sample`)::

       x_t1 = sqrt(alphabar[t1]) * x0_hat + sqrt(1 - alphabar[t1]) * z

3. The base sampler runs unchanged from ``t1``. ``t1`` is whatever the sampler's
   ``set_timesteps`` chose, so every sampler and timestep spacing works, and time shift
   never shifts the first step.

Training needs only the data and the base schedule's name. The base model's weights are
never read, so one OMS module serves every base model of the same data space.

Classifier-free guidance on the OMS condition: a condition dropout at training teaches the
null condition (the last embedding row), and sampling combines
``x0 = x0_uncond + w * (x0_cond - x0_uncond)`` (:func:`guided_x0`).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion.prediction import predict_x0, prediction_target
from models.unet import MIN_GROUP_CHANNELS, group_norm

# The OMS step treats its input as the last timestep of a zero-terminal-SNR schedule: pure noise.
OMS_ALPHABAR = 0.0

CONDITION_KINDS: tuple[str, ...] = ("none", "class", "brightness")

# Key of the OMS entry in a Lightning checkpoint written by lightning_modules/oms.py.
OMS_CHECKPOINT_KEY = "oms"
OMS_EMA_STATE_PREFIX = "ema.model."
OMS_NET_STATE_PREFIX = "net."


# ---------------------------------------------------------------------------------------
# Sign convention of the prediction at alphabar = 0


def oms_v_target(x0: torch.Tensor) -> torch.Tensor:
    """Return the v target of pure noise for data ``x0``: ``-x0``, because alphabar is 0."""
    # With alphabar 0, v = sqrt(alphabar) * noise - sqrt(1 - alphabar) * x0 = -x0 for any noise.
    return prediction_target(x0, torch.zeros_like(x0), OMS_ALPHABAR, "v")


def oms_x0_from_v(v: torch.Tensor) -> torch.Tensor:
    """Return the x0 estimate ``-v`` that a v prediction at alphabar 0 implies."""
    # predict_x0 computes sqrt(alphabar) * x_T - sqrt(1 - alphabar) * v, which is -v at alphabar 0,
    # whatever x_T is; zeros stand in for x_T.
    return predict_x0(v, torch.zeros_like(v), OMS_ALPHABAR, "v")


# ---------------------------------------------------------------------------------------
# The handover step


def handover_sample(x0_hat: torch.Tensor, noise: torch.Tensor, alphabar_first: float | torch.Tensor) -> torch.Tensor:
    """Return ``x_t1 = sqrt(alphabar_first) * x0_hat + sqrt(1 - alphabar_first) * noise``.

    ``alphabar_first`` is alphabar at the base sampler's first timestep ``t1``: a float, or
    one value per sample, shape ``(B,)``. ``noise`` is standard normal, the shape of ``x0_hat``.
    """
    alphabar = torch.as_tensor(alphabar_first, dtype=torch.float64)
    if bool(((alphabar < 0) | (alphabar >= 1)).any()):
        raise ValueError(f"alphabar_first must be in [0, 1), got {alphabar.tolist()}")
    if alphabar.ndim == 1:
        alphabar = alphabar.view(-1, *([1] * (x0_hat.ndim - 1)))
    signal_scale = alphabar.sqrt().to(x0_hat.device, x0_hat.dtype)
    # The noise is scaled by the standard deviation sqrt(1 - alphabar), not by the variance
    # 1 - alphabar: q(x_t1 | x0) = N(sqrt(alphabar) x0, (1 - alphabar) I), so this is the
    # marginal the base model was trained on at t1. The public OMS code (inference only) scales
    # by the variance, which gives x_t1 too little noise for every t1 with alphabar > 0.
    noise_scale = (1.0 - alphabar).sqrt().to(x0_hat.device, x0_hat.dtype)
    return signal_scale * x0_hat + noise_scale * noise


# ---------------------------------------------------------------------------------------
# Conditions


def image_brightness(images: torch.Tensor) -> torch.Tensor:
    """Return the mean brightness of each image on the [0, 1] scale, float32 ``(B,)``.

    ``images`` are ``(B, C, H, W)`` in [-1, 1], the range of the samplers. The mean is taken
    over all channels and pixels, so it is the overall grey level of an RGB image.
    """
    if images.ndim != 4:
        raise ValueError(f"image_brightness expects images (B, C, H, W), got shape {tuple(images.shape)}")
    return ((images.float() + 1.0) / 2.0).mean(dim=(1, 2, 3))


@dataclass(frozen=True)
class BrightnessBins:
    """Bins of per-image mean brightness (on the [0, 1] scale) that an OMS module can be conditioned on.

    Attributes:
        edges: the ``num_bins - 1`` inner edges, increasing. Bin ``k`` contains brightness in
            ``[edges[k - 1], edges[k])``. Bin 0 contains everything below ``edges[0]`` and the
            last bin everything from ``edges[-1]`` up.
        bin_means: mean brightness of the training images in each bin, or None where not
            measured. It is the brightness that a request for that bin aims at.
    """

    edges: tuple[float, ...]
    bin_means: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.edges) < 1:
            raise ValueError("BrightnessBins needs at least one inner edge (two bins), got none")
        if any(later <= earlier for earlier, later in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError(f"brightness bin edges must increase strictly, got {list(self.edges)}")
        if self.bin_means is not None and len(self.bin_means) != self.num_bins:
            raise ValueError(f"bin_means needs {self.num_bins} values, one per bin, got {len(self.bin_means)}")

    @property
    def num_bins(self) -> int:
        """Number of bins, one more than the inner edges."""
        return len(self.edges) + 1

    @classmethod
    def from_quantiles(cls, brightness: torch.Tensor, num_bins: int) -> "BrightnessBins":
        """Create bins holding equal shares of ``brightness`` (the training images' ``(N,)``), with their means."""
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")
        brightness = brightness.double().flatten()
        if len(brightness) < num_bins:
            raise ValueError(f"{num_bins} quantile bins need at least {num_bins} images, got {len(brightness)}")
        levels = torch.arange(1, num_bins, dtype=torch.float64) / num_bins
        edges = tuple(float(edge) for edge in torch.quantile(brightness, levels))
        return cls.with_means(edges, brightness)

    @classmethod
    def with_means(cls, edges: Sequence[float], brightness: torch.Tensor) -> "BrightnessBins":
        """Create bins with the given inner ``edges`` and the means of ``brightness`` ``(N,)`` in each."""
        bins = cls(tuple(float(edge) for edge in edges))
        brightness = brightness.double().flatten()
        indices = bins.assign(brightness)
        means = []
        for index in range(bins.num_bins):
            members = brightness[indices == index]
            if len(members) == 0:
                raise ValueError(
                    f"brightness bin {index} of edges {list(bins.edges)} contains no training image; "
                    "choose edges inside the data's brightness range or use quantile bins"
                )
            means.append(float(members.mean()))
        return cls(bins.edges, tuple(means))

    def assign(self, brightness: torch.Tensor) -> torch.Tensor:
        """Return the bin index of each brightness value, int64 of ``brightness``'s shape."""
        edges = torch.tensor(self.edges, dtype=torch.float64, device=brightness.device)
        return torch.bucketize(brightness.double(), edges, right=True)


# ---------------------------------------------------------------------------------------
# The network


class ConditionedBlock(nn.Module):
    """A residual block whose second GroupNorm is scaled and shifted by the condition embedding.

    Two 3x3 convolutions with GroupNorm and SiLU, and a 1x1 skip projection where the channels
    change. The condition enters as ``norm(h) * (1 + scale) + shift`` after the second
    GroupNorm (the scale-shift norm of Nichol & Dhariwal, 2021). Added before that GroupNorm,
    the embedding would be lost wherever a group has one channel (32 or fewer channels),
    because a per-channel constant is then exactly the mean that the normalisation removes.
    """

    def __init__(
        self, in_channels: int, out_channels: int, embedding_dim: int, min_group_channels: int = MIN_GROUP_CHANNELS
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, min_group_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, min_group_channels)
        self.modulation = nn.Linear(embedding_dim, 2 * out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A zero second convolution makes each fresh block the identity (or its skip projection).
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.modulation(F.silu(embedding))[:, :, None, None].chunk(2, dim=1)
        hidden = self.norm2(hidden) * (1.0 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(hidden))


class OMSNetwork(nn.Module):
    """A small UNet without a time input: ``net(x_T, conditions=None)`` returns v at alphabar 0.

    OMS always runs at one noise level, pure noise, so a time input would be a constant and
    the network has none. A learned embedding of the OMS condition, not of a timestep,
    modulates its residual blocks (:class:`ConditionedBlock`). Row ``num_conditions`` of
    that embedding is the null condition, which classifier-free guidance needs and which an
    unconditional module (``num_conditions = 0``) always uses.

    Two coordinate channels (x and y in [-1, 1]) join the input. The best output from pure
    noise is the conditional mean image, which depends on the position in the image but
    not on the noise. Without the coordinates, a fully convolutional network could learn
    position only from the zero padding at the borders.

    Args:
        in_channels: image channels; the output has as many.
        base_channels: channels of the first level.
        channel_multipliers: one entry per level, each halving the resolution after the first.
        num_res_blocks: residual blocks per level.
        num_conditions: classes or brightness bins of the condition, 0 for an unconditional module.
        embedding_dim: size of the condition embedding; None for ``4 * base_channels``.
        min_group_channels: channels per GroupNorm group at the least (see
            :func:`models.unet.group_norm`); checkpoints that do not record it are rebuilt with 1.

    Inputs must have a height and width divisible by ``2 ** (len(channel_multipliers) - 1)``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 32,
        channel_multipliers: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        num_conditions: int = 0,
        embedding_dim: int | None = None,
        min_group_channels: int = MIN_GROUP_CHANNELS,
    ) -> None:
        super().__init__()
        channel_multipliers = tuple(int(multiplier) for multiplier in channel_multipliers)
        if in_channels < 1 or base_channels < 1 or num_res_blocks < 1:
            raise ValueError(
                "OMSNetwork needs in_channels, base_channels and num_res_blocks >= 1, got "
                f"{in_channels}, {base_channels} and {num_res_blocks}"
            )
        if not channel_multipliers or min(channel_multipliers) < 1:
            raise ValueError(f"channel_multipliers must be positive integers, got {list(channel_multipliers)}")
        if isinstance(num_conditions, bool) or not isinstance(num_conditions, int) or num_conditions < 0:
            raise ValueError(f"num_conditions must be an integer >= 0 (0: unconditional), got {num_conditions!r}")

        embedding_dim = embedding_dim or 4 * base_channels
        # Arguments that rebuild this network, stored in OMS checkpoints.
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "base_channels": base_channels,
            "channel_multipliers": list(channel_multipliers),
            "num_res_blocks": num_res_blocks,
            "num_conditions": num_conditions,
            "embedding_dim": embedding_dim,
            "min_group_channels": min_group_channels,
        }
        self.in_channels = in_channels
        self.num_conditions = num_conditions
        self.num_levels = len(channel_multipliers)
        self.min_group_channels = min_group_channels
        self.condition_embedding = nn.Embedding(num_conditions + 1, embedding_dim)

        self.input_conv = nn.Conv2d(in_channels + 2, base_channels, 3, padding=1)
        self.down_blocks = nn.ModuleList()
        skip_channels = []
        channels = base_channels
        for multiplier in channel_multipliers:
            level_blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                level_blocks.append(
                    ConditionedBlock(channels, base_channels * multiplier, embedding_dim, min_group_channels)
                )
                channels = base_channels * multiplier
            self.down_blocks.append(level_blocks)
            skip_channels.append(channels)

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(self.num_levels)):
            level_channels = base_channels * channel_multipliers[level]
            block = ConditionedBlock(channels + skip_channels[level], level_channels, embedding_dim, min_group_channels)
            self.up_blocks.append(block)
            channels = level_channels

        self.output_norm = group_norm(channels, min_group_channels)
        self.output_conv = nn.Conv2d(channels, in_channels, 3, padding=1)
        # A zero output layer makes the untrained module predict x0_hat = 0, the middle of [-1, 1].
        nn.init.zeros_(self.output_conv.weight)
        nn.init.zeros_(self.output_conv.bias)

    @property
    def null_condition(self) -> int:
        """Index of the null condition: ``num_conditions``."""
        return self.num_conditions

    def forward(self, noise: torch.Tensor, conditions: torch.Tensor | None = None) -> torch.Tensor:
        """Return the v prediction at alphabar 0 for pure noise ``(B, C, H, W)``.

        ``conditions`` are int64 ``(B,)`` in ``0 .. num_conditions``, where ``num_conditions``
        is the null condition; None means the null condition for every sample.
        """
        self._check_input(noise)
        embedding = self.condition_embedding(self._condition_indices(conditions, noise))

        batch, _, height, width = noise.shape
        rows = torch.linspace(-1.0, 1.0, height, device=noise.device, dtype=noise.dtype)
        columns = torch.linspace(-1.0, 1.0, width, device=noise.device, dtype=noise.dtype)
        grid_y, grid_x = torch.meshgrid(rows, columns, indexing="ij")
        coordinates = torch.stack([grid_x, grid_y]).expand(batch, 2, height, width)
        hidden = self.input_conv(torch.cat([noise, coordinates], dim=1))

        skips = []
        for level, level_blocks in enumerate(self.down_blocks):
            if level > 0:
                hidden = F.avg_pool2d(hidden, 2)
            for block in level_blocks:
                hidden = block(hidden, embedding)
            skips.append(hidden)

        for index, block in enumerate(self.up_blocks):
            level = self.num_levels - 1 - index
            if index > 0:
                hidden = F.interpolate(hidden, scale_factor=2.0, mode="nearest")
            hidden = block(torch.cat([hidden, skips[level]], dim=1), embedding)

        return self.output_conv(F.silu(self.output_norm(hidden)))

    def _condition_indices(self, conditions: torch.Tensor | None, noise: torch.Tensor) -> torch.Tensor:
        if conditions is None:
            return torch.full((noise.shape[0],), self.null_condition, dtype=torch.int64, device=noise.device)
        conditions = torch.as_tensor(conditions, dtype=torch.int64, device=noise.device)
        if conditions.shape != (noise.shape[0],):
            raise ValueError(
                f"conditions must have shape ({noise.shape[0]},), one per sample, got {tuple(conditions.shape)}"
            )
        if bool(((conditions < 0) | (conditions > self.num_conditions)).any()):
            raise ValueError(
                f"conditions must be in 0..{self.num_conditions} ({self.num_conditions} is the null condition), "
                f"got values from {int(conditions.min())} to {int(conditions.max())}"
            )
        return conditions

    def _check_input(self, noise: torch.Tensor) -> None:
        if noise.ndim != 4 or noise.shape[1] != self.in_channels:
            raise ValueError(f"OMSNetwork expected noise (B, {self.in_channels}, H, W), got shape {tuple(noise.shape)}")
        factor = 2 ** (self.num_levels - 1)
        if noise.shape[2] % factor or noise.shape[3] % factor:
            raise ValueError(
                f"OMSNetwork with {self.num_levels} levels needs a height and width divisible by {factor}, "
                f"got {noise.shape[2]}x{noise.shape[3]}; use fewer channel_multipliers"
            )


def build_oms_network(
    in_channels: int,
    num_classes: int,
    condition: str = "none",
    num_brightness_bins: int = 5,
    base_channels: int = 32,
    channel_multipliers: Sequence[int] = (1, 2, 2),
    num_res_blocks: int = 1,
    embedding_dim: int | None = None,
    min_group_channels: int = MIN_GROUP_CHANNELS,
) -> OMSNetwork:
    """Create the :class:`OMSNetwork` for a data set and an OMS condition (``"none"``, ``"class"`` or ``"brightness"``).

    train.py calls it with the data module's ``in_channels`` and ``num_classes``; the number
    of conditions is ``num_classes`` for ``"class"``, ``num_brightness_bins`` for
    ``"brightness"`` and 0 for ``"none"``.
    """
    validate_condition_kind(condition)
    num_conditions = {"none": 0, "class": num_classes, "brightness": num_brightness_bins}[condition]
    return OMSNetwork(
        in_channels=in_channels,
        base_channels=base_channels,
        channel_multipliers=tuple(channel_multipliers),
        num_res_blocks=num_res_blocks,
        num_conditions=int(num_conditions),
        embedding_dim=embedding_dim,
        min_group_channels=min_group_channels,
    )


def validate_condition_kind(condition: str) -> None:
    """Raise ValueError unless ``condition`` is ``"none"``, ``"class"`` or ``"brightness"``."""
    if condition not in CONDITION_KINDS:
        raise ValueError(f"unknown OMS condition {condition!r}; valid conditions: {', '.join(CONDITION_KINDS)}")


# ---------------------------------------------------------------------------------------
# Training loss and guided prediction


def oms_loss(
    network: OMSNetwork,
    x0: torch.Tensor,
    conditions: torch.Tensor | None = None,
    condition_dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return the mean squared error between the network's x0 estimate from fresh pure noise and the data ``x0``.

    Each image gets its own noise ``x_T ~ N(0, I)``. With probability ``condition_dropout``
    an image's condition becomes the null condition, so the same network learns the
    unconditional prediction that classifier-free guidance needs. ``x0`` is ``(B, C, H, W)``
    in [-1, 1]. A ``generator`` must be a CPU generator, so seeded draws match on any device.
    """
    if not 0.0 <= condition_dropout < 1.0:
        raise ValueError(f"condition_dropout must be in [0, 1), got {condition_dropout}")
    draw_device = x0.device if generator is None else torch.device("cpu")
    noise = torch.randn(x0.shape, generator=generator, device=draw_device).to(x0.device, x0.dtype)

    if conditions is not None and condition_dropout > 0:
        dropped = torch.rand(x0.shape[0], generator=generator, device=draw_device) < condition_dropout
        conditions = torch.where(dropped.to(conditions.device), network.null_condition, conditions)

    v = network(noise, conditions)
    # Equal to the MSE of v against its target -x0, because x0_hat = -v.
    return F.mse_loss(oms_x0_from_v(v).float(), x0.float())


def guided_x0(
    network: OMSNetwork, noise: torch.Tensor, conditions: torch.Tensor | None, guidance: float = 1.0
) -> torch.Tensor:
    """Return the OMS estimate of x0 from pure ``noise``, with classifier-free guidance on ``conditions``.

    ``x0 = x0_uncond + guidance * (x0_cond - x0_uncond)``, with ``x0_uncond`` from the null
    condition. Both predictions are computed for any guidance, so guidance 1 returns the
    conditional estimate up to rounding. Without ``conditions``, or for an unconditional
    network, it returns the null-condition estimate and ignores ``guidance``.
    """
    unconditional = oms_x0_from_v(network(noise, None))
    if conditions is None or network.num_conditions == 0:
        return unconditional
    conditional = oms_x0_from_v(network(noise, conditions))
    return unconditional + guidance * (conditional - unconditional)


# ---------------------------------------------------------------------------------------
# Sampling with a trained module


@dataclass
class LoadedOMS:
    """An OMS network rebuilt from a checkpoint, with its condition and image shape."""

    network: OMSNetwork
    condition: str
    image_shape: tuple[int, int, int]
    brightness_bins: BrightnessBins | None
    metadata: dict[str, Any]


def network_config_for_rebuild(config: dict[str, Any]) -> dict[str, Any]:
    """Return an OMS checkpoint's network config, with ``min_group_channels=1`` where it is missing.

    Checkpoints from before the GroupNorm minimum do not record it and used ``gcd(32, C)`` groups.
    """
    return {"min_group_channels": 1, **config}


def load_oms(checkpoint_path: str | Path, use_ema: bool = True) -> LoadedOMS:
    """Rebuild the OMS network of a checkpoint written by ``lightning_modules/oms.py``, on the CPU, in eval mode.

    The file is read with ``torch.load(weights_only=True)``, so loading it runs no code stored in it.

    Raises:
        ValueError: for a checkpoint without an ``"oms"`` entry, or without weights under
            the chosen prefix.
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    metadata = checkpoint.get(OMS_CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if metadata is None:
        raise ValueError(
            f"{checkpoint_path} has no {OMS_CHECKPOINT_KEY!r} entry, so it is not an OMS checkpoint; pass a "
            "checkpoint of a run with module=oms, such as `python train.py experiment=oms_digits`"
        )
    prefix = OMS_EMA_STATE_PREFIX if use_ema else OMS_NET_STATE_PREFIX
    state = {key[len(prefix) :]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
    if not state:
        raise ValueError(f"{checkpoint_path} has no OMS weights under {prefix!r}")

    network = OMSNetwork(**network_config_for_rebuild(metadata["network"]))
    network.load_state_dict(state)
    network.eval()
    bins = metadata.get("brightness_bins")
    return LoadedOMS(
        network=network,
        condition=metadata["condition"],
        image_shape=tuple(metadata["image_shape"]),
        brightness_bins=BrightnessBins(tuple(bins["edges"]), tuple(bins["bin_means"])) if bins else None,
        metadata=metadata,
    )


class OMSHandover:
    """The OMS step in front of a base sampler, in the shape ``generate_samples`` calls it.

    ``handover(noise, alphabar_first, indices)`` returns the sample that the base sampler
    starts from at its first timestep ``t1``. The noise ``z`` of the step is ``x_T`` itself: at
    alphabar 0 the noisy sample is pure noise, so ``x_T`` is its exact noise estimate, as
    DDIM with eta 0 would use it. The step is then deterministic given ``x_T``, and the
    module's x0 estimate, which tends to the data mean, barely depends on ``x_T``.

    Args:
        network: the trained OMS network; it is put in eval mode.
        conditions: int64 ``(num_samples,)`` OMS conditions of all samples, or None for the
            null condition.
        guidance: classifier-free guidance scale on the condition (1: the conditional
            estimate, 0: the unconditional one).
    """

    def __init__(self, network: OMSNetwork, conditions: torch.Tensor | None = None, guidance: float = 1.0) -> None:
        if not math.isfinite(guidance):
            raise ValueError(f"OMS guidance must be a finite number, got {guidance}")
        if conditions is not None and network.num_conditions == 0:
            raise ValueError("OMS conditions were given, but the OMS module is unconditional; pass conditions=None")
        self.network = network.eval()
        self.conditions = conditions
        self.guidance = guidance

    @torch.no_grad()
    def __call__(self, noise: torch.Tensor, alphabar_first: float, indices: slice) -> torch.Tensor:
        """Return ``x_t1`` for a batch of pure ``noise``, samples ``indices`` of the whole run."""
        network = self.network.to(noise.device)
        conditions = None
        if self.conditions is not None:
            conditions = self.conditions[indices].to(noise.device)
        x0_hat = guided_x0(network, noise, conditions, self.guidance)
        return handover_sample(x0_hat, noise, alphabar_first)
