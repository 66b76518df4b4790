"""A DDPM-style UNet that predicts noise, x0 or v from a noisy image and its timestep.

The layout follows Ho et al., "Denoising Diffusion Probabilistic Models" (2020), and the
DDPM++ variant of Song et al., "Score-Based Generative Modeling through Stochastic
Differential Equations" (2021):

- a sinusoidal embedding of the timestep, passed through two linear layers to ``4 * base_channels``
  (plus a learned class embedding when the model is class-conditional);
- a 3x3 input convolution, then one level per channel multiplier, each with
  ``num_res_blocks`` residual blocks (GroupNorm, SiLU, 3x3 convolutions, the embedding
  added to the normalised activations between the two convolutions) and self-attention on
  chosen levels;
- a middle of residual block, self-attention, residual block;
- a mirrored decoder with ``num_res_blocks + 1`` blocks per level, each taking one skip
  connection from the encoder, and a GroupNorm, SiLU and 3x3 output convolution.

Levels are joined by resampling layers. ``resample="resblock"`` makes them residual blocks
that average-pool or upsample inside (BigGAN style, as DDPM++ does), and ``"conv"`` makes
them a strided 3x3 convolution and nearest upsampling followed by a 3x3 convolution, as DDPM does.

SlimFlow's CIFAR-10 sizes (Zhu et al., ECCV 2024) are registered by name with DDPM++
resampling and attention at 16x16 (level 1 of a 32x32 input):

========================  =====  ======  ===========  ========  =====
name                      width  blocks  multipliers  SlimFlow  here
========================  =====  ======  ===========  ========  =====
``unet_slimflow_27m``     128    2       1, 2, 2      27.9M     28.4M
``unet_slimflow_15m``     96     2       1, 2, 2      15.7M     16.0M
``unet_slimflow_7m``      64     2       1, 2, 2      7.0M      7.1M
``unet_slimflow_3m``      64     1       1, 1, 2      3.4M      3.5M
========================  =====  ======  ===========  ========  =====

"SlimFlow" is the parameter count that SlimFlow reports, "here" that of this
implementation for 3-channel images, unconditional. ``tests/test_diffusion_training.py``
checks that they are within 5% of each other.

NOTE: attention at 16x16 and residual resampling are DDPM++'s CIFAR-10 choices. They were
not compared with SlimFlow's code, only the parameter counts were.
"""

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import register_model

log = logging.getLogger(__name__)

RESAMPLE_MODES: tuple[str, ...] = ("resblock", "conv")


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Return sinusoidal embeddings ``(B, dim)`` of timesteps ``(B,)``, integer or fractional.

    Half of the features are sines and half cosines, at frequencies from 1 down to
    ``1 / max_period``, as in the Transformer's position encoding. An odd ``dim`` gets one
    zero column at the end.
    """
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=timesteps.device) / max(half - 1, 1)
    frequencies = torch.exp(-math.log(max_period) * exponents)
    angles = timesteps.to(torch.float32)[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        embedding = F.pad(embedding, (0, 1))
    return embedding


# Channels per GroupNorm group at the least. With one channel a group is an instance norm,
# which removes each channel's spatial mean, so a norm before the output convolution leaves
# the prediction almost blind to an image's mean brightness and colour. NCSN++ uses
# min(channels // 4, 32) groups, so at least 4 channels in each.
MIN_GROUP_CHANNELS = 4


def group_norm(channels: int, min_group_channels: int = MIN_GROUP_CHANNELS) -> nn.GroupNorm:
    """Return a GroupNorm with up to 32 groups (DDPM's number) of at least ``min_group_channels`` channels.

    The number of groups is the largest power of two that divides both 32 and ``channels``
    and leaves ``min_group_channels`` channels in each group. ``min_group_channels=1``
    gives ``gcd(32, channels)`` groups, this model's rule before the minimum existed.
    Widths 16, 32, 64, 128 and above get NCSN++'s groups; 96 channels get 16 groups of 6, where
    NCSN++ has 24 groups of 4.
    """
    if min_group_channels < 1:
        raise ValueError(f"min_group_channels must be >= 1, got {min_group_channels}")
    groups = math.gcd(32, channels)
    while groups > 1 and channels // groups < min_group_channels:
        groups //= 2
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and SiLU, the embedding added after the second norm, and a skip path.

    With ``resample="down"`` or ``"up"`` the block also halves or doubles the resolution,
    on both paths, before its first convolution (BigGAN's up/down blocks). The second
    convolution starts at zero, so each block starts as the identity (or a 1x1 projection),
    which keeps the activations of a deep, freshly built UNet at a reasonable scale.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embedding_dim: int,
        dropout: float,
        resample: str | None = None,
        min_group_channels: int = MIN_GROUP_CHANNELS,
    ) -> None:
        super().__init__()
        if resample not in (None, "down", "up"):
            raise ValueError(f"resample must be None, 'down' or 'up', got {resample!r}")
        self.resample = resample
        self.norm1 = group_norm(in_channels, min_group_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding_projection = nn.Linear(embedding_dim, out_channels)
        self.norm2 = group_norm(out_channels, min_group_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        needs_projection = in_channels != out_channels or resample is not None
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if needs_projection else nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.norm1(x))
        hidden = self.conv1(self._resample(hidden))
        # The embedding shifts the normalised activations. Added before norm2, as in the original DDPM,
        # a per-channel shift would be subtracted again by the norm wherever a group has one channel
        # (min_group_channels=1 at 16 or 32 channels), so the output would not depend on the timestep.
        hidden = self.norm2(hidden) + self.embedding_projection(F.silu(embedding))[:, :, None, None]
        hidden = self.conv2(self.dropout(F.silu(hidden)))
        return self.skip(self._resample(x)) + hidden


class SelfAttention(nn.Module):
    """Single-head self-attention over all pixels, with GroupNorm and a residual connection.

    The output projection starts at zero, so the block starts as the identity.
    """

    def __init__(self, channels: int, min_group_channels: int = MIN_GROUP_CHANNELS) -> None:
        super().__init__()
        self.norm = group_norm(channels, min_group_channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.projection = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        query, key, value = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width).unbind(1)
        # (B, 1, HW, C) tensors: one head whose sequence is the pixels.
        attended = F.scaled_dot_product_attention(
            query.transpose(1, 2)[:, None], key.transpose(1, 2)[:, None], value.transpose(1, 2)[:, None]
        )
        attended = attended[:, 0].transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.projection(attended)


class Downsample(nn.Module):
    """Halve the resolution with a 3x3 convolution of stride 2 (DDPM's resampling)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution by nearest-neighbour upsampling and a 3x3 convolution (DDPM's resampling)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """DDPM-style UNet: ``model(x, timesteps, class_labels=None)`` returns a tensor of ``x``'s shape.

    Args:
        in_channels: image channels; the output has as many.
        base_channels: channels of the first level, the model's "width".
        channel_multipliers: one entry per level; level ``i`` has
            ``base_channels * channel_multipliers[i]`` channels and the resolution of the
            input divided by ``2**i``.
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
        attention_levels: levels (0 = full resolution) whose residual blocks are each
            followed by self-attention. For a 32x32 input, level 1 is 16x16, where DDPM puts it.
        dropout: dropout probability inside the residual blocks.
        num_classes: number of classes for class conditioning, or None for an
            unconditional model. A conditional model has ``num_classes + 1`` class
            embeddings, and the last one (index ``num_classes``) is the null class, used
            for unlabelled inputs and classifier-free guidance.
        resample: ``"resblock"`` (DDPM++, BigGAN-style residual blocks) or ``"conv"`` (DDPM).
        middle_attention: put self-attention between the two middle residual blocks.
        min_group_channels: channels per GroupNorm group at the least (see :func:`group_norm`).
            4 is the default; 1 rebuilds checkpoints written before the option existed.

    Inputs must have a height and width divisible by ``2 ** (len(channel_multipliers) - 1)``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_multipliers: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (1,),
        dropout: float = 0.1,
        num_classes: int | None = None,
        resample: str = "resblock",
        middle_attention: bool = True,
        min_group_channels: int = MIN_GROUP_CHANNELS,
    ) -> None:
        super().__init__()
        channel_multipliers = tuple(int(multiplier) for multiplier in channel_multipliers)
        attention_levels = tuple(int(level) for level in attention_levels)
        _validate_unet_arguments(
            in_channels, base_channels, channel_multipliers, num_res_blocks, attention_levels, dropout, num_classes
        )
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"unknown resample mode {resample!r}; valid modes: {', '.join(RESAMPLE_MODES)}")

        self.in_channels = in_channels
        self.base_channels = base_channels
        self.channel_multipliers = channel_multipliers
        self.num_levels = len(channel_multipliers)
        self.num_classes = num_classes
        self.min_group_channels = min_group_channels

        embedding_dim = 4 * base_channels
        self.time_embedding = nn.Sequential(
            nn.Linear(base_channels, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim)
        )
        self.class_embedding = nn.Embedding(num_classes + 1, embedding_dim) if num_classes is not None else None

        def make_block(block_in: int, block_out: int, direction: str | None = None) -> ResidualBlock:
            return ResidualBlock(block_in, block_out, embedding_dim, dropout, direction, min_group_channels)

        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # The input convolution and every encoder layer (a block or a resampling step) leave one skip tensor.
        self.down_layers = nn.ModuleList()
        skip_channels = [base_channels]
        channels = base_channels
        for level, multiplier in enumerate(channel_multipliers):
            level_channels = base_channels * multiplier
            for _ in range(num_res_blocks):
                layer = [make_block(channels, level_channels)]
                if level in attention_levels:
                    layer.append(SelfAttention(level_channels, min_group_channels))
                self.down_layers.append(nn.ModuleList(layer))
                channels = level_channels
                skip_channels.append(channels)
            if level != self.num_levels - 1:
                resampler = make_block(channels, channels, "down") if resample == "resblock" else Downsample(channels)
                self.down_layers.append(nn.ModuleList([resampler]))
                skip_channels.append(channels)

        middle = [make_block(channels, channels)]
        if middle_attention:
            middle.append(SelfAttention(channels, min_group_channels))
        middle.append(make_block(channels, channels))
        self.middle_layers = nn.ModuleList(middle)

        # Each decoder block concatenates one skip tensor, taken in reverse order. Resampling layers take none.
        self.up_layers = nn.ModuleList()
        for level in reversed(range(self.num_levels)):
            level_channels = base_channels * channel_multipliers[level]
            for _ in range(num_res_blocks + 1):
                layer = [make_block(channels + skip_channels.pop(), level_channels)]
                if level in attention_levels:
                    layer.append(SelfAttention(level_channels, min_group_channels))
                self.up_layers.append(nn.ModuleList(layer))
                channels = level_channels
            if level != 0:
                resampler = make_block(channels, channels, "up") if resample == "resblock" else Upsample(channels)
                self.up_layers.append(nn.ModuleList([resampler]))

        self.output_norm = group_norm(channels, min_group_channels)
        self.output_conv = nn.Conv2d(channels, in_channels, 3, padding=1)
        # A zero output layer makes the untrained model predict 0, the mean of every target.
        nn.init.zeros_(self.output_conv.weight)
        nn.init.zeros_(self.output_conv.bias)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the prediction for noisy images ``x`` ``(B, C, H, W)`` at ``timesteps`` ``(B,)`` or scalar.

        ``class_labels`` are int64 ``(B,)`` in ``0 .. num_classes``, where ``num_classes`` is
        the null class. A conditional model given no labels uses the null class.
        """
        self._check_input(x)
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        embedding = self.time_embedding(timestep_embedding(timesteps, self.base_channels))
        embedding = embedding + self._class_embedding(class_labels, x.shape[0], x.device)

        hidden = self.input_conv(x)
        skips = [hidden]
        for layer in self.down_layers:
            for module in layer:
                hidden = module(hidden, embedding)
            skips.append(hidden)

        for module in self.middle_layers:
            hidden = module(hidden, embedding)

        for layer in self.up_layers:
            if isinstance(layer[0], ResidualBlock) and layer[0].resample is None:
                hidden = torch.cat([hidden, skips.pop()], dim=1)
            for module in layer:
                hidden = module(hidden, embedding)

        return self.output_conv(F.silu(self.output_norm(hidden)))

    def _class_embedding(
        self, class_labels: torch.Tensor | None, batch_size: int, device: torch.device
    ) -> torch.Tensor | float:
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError(
                    "class_labels were given to an unconditional UNet; build it with num_classes "
                    "(model.class_conditional=true) or pass class_labels=None"
                )
            return 0.0
        if class_labels is None:
            class_labels = torch.full((batch_size,), self.num_classes, dtype=torch.int64, device=device)
        return self.class_embedding(class_labels)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expected images (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        factor = 2 ** (self.num_levels - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"UNet with {self.num_levels} levels needs a height and width divisible by {factor}, "
                f"got {x.shape[2]}x{x.shape[3]}; use fewer channel_multipliers or resize the images"
            )


def _validate_unet_arguments(
    in_channels: int,
    base_channels: int,
    channel_multipliers: tuple[int, ...],
    num_res_blocks: int,
    attention_levels: tuple[int, ...],
    dropout: float,
    num_classes: int | None,
) -> None:
    if in_channels < 1 or base_channels < 1:
        raise ValueError(f"in_channels and base_channels must be >= 1, got {in_channels} and {base_channels}")
    if not channel_multipliers or min(channel_multipliers) < 1:
        raise ValueError(f"channel_multipliers must be a non-empty list of integers >= 1, got {channel_multipliers}")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    invalid_levels = [level for level in attention_levels if not 0 <= level < len(channel_multipliers)]
    if invalid_levels:
        raise ValueError(
            f"attention_levels {invalid_levels} are outside the {len(channel_multipliers)} levels "
            f"(0 to {len(channel_multipliers) - 1})"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")


# SlimFlow's CIFAR-10 sizes: (base_channels, num_res_blocks, channel_multipliers).
SLIMFLOW_SIZES: dict[str, tuple[int, int, tuple[int, ...]]] = {
    "unet_slimflow_27m": (128, 2, (1, 2, 2)),
    "unet_slimflow_15m": (96, 2, (1, 2, 2)),
    "unet_slimflow_7m": (64, 2, (1, 2, 2)),
    "unet_slimflow_3m": (64, 1, (1, 1, 2)),
}


# Registered names whose factory builds a UNet, for the checkpoint spec helpers below.
UNET_MODEL_NAMES: set[str] = {"unet", *SLIMFLOW_SIZES}


def spec_with_norm_rule(spec: dict[str, Any] | None, net: nn.Module) -> dict[str, Any] | None:
    """Return ``spec`` with ``net``'s ``min_group_channels`` when ``net`` is a UNet, for its checkpoint.

    A checkpoint that records the rule is rebuilt with it, whatever the default is then.
    """
    if spec is None or not isinstance(net, UNet):
        return spec
    return {**spec, "min_group_channels": net.min_group_channels}


def spec_for_rebuild(spec: dict[str, Any]) -> dict[str, Any]:
    """Return a checkpoint's model spec, with ``min_group_channels=1`` for a UNet that does not record it.

    Such a checkpoint was written before the minimum existed, when every GroupNorm had
    ``gcd(32, channels)`` groups. GroupNorm's weights do not depend on the number of
    groups, so its weights would load into the new default and compute something else.
    """
    stored = stored_min_group_channels(spec)
    if stored is None or "min_group_channels" in spec:
        return spec
    log.info("the checkpoint's UNet does not record min_group_channels, so it is rebuilt with the old rule (1)")
    return {**spec, "min_group_channels": stored}


def stored_min_group_channels(spec: dict[str, Any] | None) -> int | None:
    """Return the GroupNorm minimum that a checkpoint's model spec records, 1 if a UNet spec lacks it.

    None means the spec is missing or names no UNet, so there is no rule to compare.
    """
    if spec is None or spec.get("name") not in UNET_MODEL_NAMES:
        return None
    return int(spec.get("min_group_channels", 1))


def check_min_group_channels(stored: int | None, net: nn.Module, source: str) -> None:
    """Raise if ``net`` was built with another GroupNorm minimum than the checkpoint ``source`` records.

    GroupNorm's weights fit any number of groups, so loading them into a network built with
    another rule succeeds and silently computes something else.
    """
    built = getattr(net, "min_group_channels", None)
    if stored is None or built is None or stored == built:
        return
    raise ValueError(
        f"{source} was trained with min_group_channels={stored}, but the network built for it has {built}; "
        f"set model.min_group_channels={stored} to resume or test it"
    )


@register_model("unet")
def unet(in_channels: int = 3, num_classes: int = 10, class_conditional: bool = False, **kwargs) -> UNet:
    """Create a :class:`UNet`; ``num_classes`` is used only with ``class_conditional=True``.

    The training task passes every model the data set's number of classes, and most
    diffusion models ignore the labels, so conditioning is switched on separately.
    """
    return UNet(in_channels=in_channels, num_classes=num_classes if class_conditional else None, **kwargs)


def _register_slimflow_size(name: str, base_channels: int, num_res_blocks: int, multipliers: tuple[int, ...]) -> None:
    @register_model(name)
    def factory(in_channels: int = 3, num_classes: int = 10, class_conditional: bool = False, **kwargs) -> UNet:
        settings = {
            "base_channels": base_channels,
            "num_res_blocks": num_res_blocks,
            "channel_multipliers": multipliers,
            "attention_levels": (1,),
            "resample": "resblock",
        }
        settings.update(kwargs)
        return unet(in_channels=in_channels, num_classes=num_classes, class_conditional=class_conditional, **settings)


for _name, (_width, _blocks, _multipliers) in SLIMFLOW_SIZES.items():
    _register_slimflow_size(_name, _width, _blocks, _multipliers)
