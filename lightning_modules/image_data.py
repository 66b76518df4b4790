"""The image shape and normalisation that generative modules read from their data module.

The data modules of :mod:`lightning_modules.data` hand out images normalised with a
per-channel mean and std. Diffusion, flow and OMS networks work on images in [-1, 1], so
each generative module undoes the normalisation and records it in its checkpoints.
"""

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageData:
    """Image shape ``(C, H, W)`` and the per-channel ``mean`` and ``std`` (float32 ``(C,)``, or None)."""

    shape: tuple[int, int, int]
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    @classmethod
    def from_datamodule(cls, datamodule: Any, module_name: str) -> "ImageData":
        """Read ``image_size``, ``in_channels`` and, where it has them, ``mean`` and ``std``.

        Raises:
            ValueError: when there is no data module or it lacks ``image_size``.
        """
        if datamodule is None or not hasattr(datamodule, "image_size"):
            raise ValueError(
                f"{module_name} needs a data module with image_size and in_channels, "
                "such as those of lightning_modules.data"
            )
        height, width = datamodule.image_size
        shape = (int(datamodule.in_channels), int(height), int(width))
        if not (hasattr(datamodule, "mean") and hasattr(datamodule, "std")):
            log.info("%s has no mean and std; its images are taken to be in [-1, 1]", type(datamodule).__name__)
            return cls(shape)
        mean = torch.tensor(datamodule.mean, dtype=torch.float32)
        std = torch.tensor(datamodule.std, dtype=torch.float32)
        return cls(shape, mean, std)

    def to_model_range(self, images: torch.Tensor) -> torch.Tensor:
        """Map normalised images ``(B, C, H, W)`` back to [0, 1] and then to [-1, 1]."""
        if self.mean is None or self.std is None:
            return images
        mean = self.mean.to(images.device)[:, None, None]
        std = self.std.to(images.device)[:, None, None]
        return (images * std + mean) * 2.0 - 1.0

    def metadata(self) -> dict[str, Any]:
        """Return ``image_shape``, ``data_mean`` and ``data_std`` as plain lists for a checkpoint."""
        return {
            "image_shape": list(self.shape),
            "data_mean": self.mean.tolist() if self.mean is not None else None,
            "data_std": self.std.tolist() if self.std is not None else None,
        }


def image_metadata(image_data: ImageData | None) -> dict[str, Any]:
    """Return :meth:`ImageData.metadata`, or None for each key before ``setup()`` has read the data."""
    if image_data is None:
        return {"image_shape": None, "data_mean": None, "data_std": None}
    return image_data.metadata()


class ImageDataMixin:
    """Adds ``image_data`` (read in ``setup()``), ``image_shape`` and ``to_model_range`` to a LightningModule."""

    image_data: ImageData | None = None

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` of the data, or None before ``setup()``."""
        return None if self.image_data is None else self.image_data.shape

    def read_image_data(self) -> None:
        """Read the trainer's data module into ``image_data`` and set the example input for cost counts."""
        datamodule = getattr(self.trainer, "datamodule", None)
        self.image_data = ImageData.from_datamodule(datamodule, type(self).__name__)
        self.example_input_array = torch.zeros(1, *self.image_data.shape)

    def to_model_range(self, images: torch.Tensor) -> torch.Tensor:
        """Map the data module's normalised images to [-1, 1]; unchanged before ``setup()``."""
        return images if self.image_data is None else self.image_data.to_model_range(images)
