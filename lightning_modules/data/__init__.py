"""LightningDataModules for image classification with the data held in memory as uint8 arrays.

Every module yields batches of float32 images ``(B, C, H, W)``, normalised per channel
with the training split's mean and std, and int64 labels ``(B,)``. Image folders and
archives are decoded once and cached as ``.npz`` files.
"""

from lightning_modules.data.cifar10 import CIFAR10DataModule
from lightning_modules.data.digits import DigitsDataModule
from lightning_modules.data.errors import DataError
from lightning_modules.data.imagefolder import ImageFolderDataModule

__all__ = ["CIFAR10DataModule", "DataError", "DigitsDataModule", "ImageFolderDataModule"]
