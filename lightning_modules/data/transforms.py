"""Batch-wise augmentation and normalisation of uint8 image tensors.

The functions work on whole batches ``(B, C, H, W)`` with tensor operations, so no image
goes through Pillow after it is decoded once.
"""

import logging
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class ImageBatch(NamedTuple):
    """A batch before augmentation: uint8 images ``(B, C, H, W)``, int64 labels ``(B,)``."""

    images: torch.Tensor
    labels: torch.Tensor


def channel_mean_std(images: np.ndarray, chunk_pixels: int = 1 << 20) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Compute the per-channel mean and standard deviation of uint8 images.

    The statistics come from exact per-channel histograms of the 256 pixel values, which
    is faster than summing floats and needs extra memory for only ``chunk_pixels`` pixels.

    Args:
        images: uint8 ``(N, H, W, C)``, N >= 1.
        chunk_pixels: pixels counted at a time.

    Returns:
        ``(mean, std)``, one value per channel, on the [0, 1] scale of ``images / 255``.
        A constant channel gets std 1.0, so that normalising it does not divide by zero.
    """
    channels = images.shape[-1]
    pixels = images.reshape(-1, channels)
    # Bin c * 256 + v counts the pixels of channel c with value v.
    bin_offsets = np.arange(channels, dtype=np.intp) * 256
    counts = np.zeros(channels * 256, dtype=np.int64)
    for start in range(0, len(pixels), chunk_pixels):
        chunk = pixels[start : start + chunk_pixels].astype(np.intp) + bin_offsets
        counts += np.bincount(chunk.ravel(), minlength=channels * 256)

    histograms = counts.reshape(channels, 256).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / 255
    mean = histograms @ values / len(pixels)
    variance = np.maximum(histograms @ np.square(values) / len(pixels) - np.square(mean), 0.0)
    std = np.sqrt(variance)

    # Rounding leaves a tiny variance for a constant channel, so test the histogram instead.
    constant = np.count_nonzero(histograms, axis=1) == 1
    if np.any(constant):
        logger.warning(
            "Training images are constant in channels %s, so their std is set to 1", np.flatnonzero(constant)
        )
        std[constant] = 1.0
    return tuple(float(value) for value in mean), tuple(float(value) for value in std)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop each image at a random offset from a copy zero-padded by ``padding`` pixels.

    Args:
        images: ``(B, C, H, W)`` of any dtype.
        padding: pixels added on each side, >= 0. 0 returns ``images`` unchanged.
        generator: random generator for the offsets, or None for torch's global one.

    Returns:
        ``(B, C, H, W)`` with the dtype of ``images``. Each image is shifted by up to
        ``padding`` pixels in each direction, independently of the others.
    """
    if padding == 0:
        return images

    batch_size, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (batch_size,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (batch_size,), generator=generator)
    rows = top[:, None] + torch.arange(height)
    columns = left[:, None] + torch.arange(width)

    # The channel slice separates the three index tensors, so PyTorch puts their
    # broadcast dimensions (B, H, W) first and the channels last.
    batch_index = torch.arange(batch_size)[:, None, None]
    cropped = padded[batch_index, :, rows[:, :, None], columns[:, None, :]]
    return cropped.permute(0, 3, 1, 2).contiguous()


def random_horizontal_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image ``(B, C, H, W)`` left to right with probability 0.5."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Return float32 ``(images / 255 - mean) / std`` for uint8 images ``(B, C, H, W)``.

    ``mean`` and ``std`` are float32 ``(C,)`` on the [0, 1] scale.
    """
    scaled = images.to(torch.float32).div_(255.0)
    return scaled.sub_(mean[:, None, None]).div_(std[:, None, None])


class BatchTransform:
    """Collate function that augments and normalises a batch.

    It accepts the `ImageBatch` that `ImageArrayDataset.__getitems__` returns, or a list
    of ``(image, label)`` samples, and returns float32 images ``(B, C, H, W)``, normalised
    per channel, and int64 labels ``(B,)``. Augmentation uses torch's global random
    generator, which Lightning's ``seed_everything`` and the DataLoader's worker seeding
    make reproducible.

    Args:
        mean: per-channel mean on the [0, 1] scale.
        std: per-channel standard deviation on the [0, 1] scale, all > 0.
        crop_padding: padding of the random crop in pixels, 0 for no crop.
        horizontal_flip: mirror images left to right with probability 0.5.
    """

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        crop_padding: int = 0,
        horizontal_flip: bool = False,
    ) -> None:
        if len(mean) != len(std) or not all(math.isfinite(value) and value > 0 for value in std):
            raise ValueError(f"mean and std need one value per channel and std > 0, got mean={mean}, std={std}")
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.crop_padding = crop_padding
        self.horizontal_flip = horizontal_flip

    def __call__(self, batch: ImageBatch | list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, ImageBatch):
            images, labels = batch
        else:
            images = torch.stack([image for image, _ in batch])
            labels = torch.tensor([label for _, label in batch], dtype=torch.int64)

        images = random_crop(images, self.crop_padding)
        if self.horizontal_flip:
            images = random_horizontal_flip(images)
        return normalize(images, self.mean, self.std), labels
