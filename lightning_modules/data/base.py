"""The shared LightningDataModule for image classification data held in memory."""

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_modules.data.decode import ImageClassificationData
from lightning_modules.data.errors import DataError
from lightning_modules.data.resumable import ResumableDataLoader, ResumableRandomSampler
from lightning_modules.data.splits import resolve_split_count, split_off, stratified_sample, validate_split_size
from lightning_modules.data.transforms import BatchTransform, ImageBatch, channel_mean_std

logger = logging.getLogger(__name__)


class ImageArrayDataset(Dataset):
    """Images and labels held in memory.

    Args:
        images: uint8 ``(N, H, W, C)``, values 0..255.
        labels: int64 ``(N,)``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} != {len(labels)}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Return one uint8 image ``(C, H, W)`` and its label."""
        return torch.from_numpy(self.images[index]).permute(2, 0, 1), int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> ImageBatch:
        """Return a whole batch with one indexing operation.

        The DataLoader calls this in place of ``__getitem__`` for each index, and passes
        the result to the collate function, here a `BatchTransform`.
        """
        images = torch.from_numpy(self.images[indices]).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(self.labels[indices])
        return ImageBatch(images, labels)


@dataclass(frozen=True)
class PreparedSplits:
    """The train, validation and test datasets and the training set's channel statistics."""

    train: ImageArrayDataset
    val: ImageArrayDataset
    test: ImageArrayDataset
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def validate_positive_int(value: object, name: str, example: int) -> None:
    """Raise DataError unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(
            f"{name}={value!r} is invalid: it must be a positive integer, for example data.{name}={example}."
        )


def validate_non_negative_int(value: object, name: str) -> None:
    """Raise DataError unless ``value`` is an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{name}={value!r} is invalid: it must be an integer >= 0, for example data.{name}=0.")


class InMemoryImageDataModule(LightningDataModule, ABC):
    """Image classification data held in memory as uint8 arrays.

    Subclasses implement `load_data`. This class splits off a class-stratified
    validation set, optionally takes a class-stratified subset of the rest for
    training, computes the per-channel mean and std of the training images, and builds
    the DataLoaders. The data is loaded on first use: a property such as `num_classes`,
    `prepare_data` or `setup`.

    Batches are float32 images ``(B, C, H, W)``, normalised with the training set's mean
    and std, and int64 labels ``(B,)``. Only training batches are augmented.

    Args:
        batch_size: images per batch on each device.
        num_workers: DataLoader worker processes, 0 to load in the main process.
        pin_memory: return batches in pinned memory, for faster copies to a GPU.
        val_size: images held out from the training set for validation: a fraction in
            [0, 1) or a count. 0 means no validation set.
        split_seed: seed of the validation split and of the training subset.
        train_subset: train on a class-stratified subset of this many of the remaining
            training images, or None for all. The validation set does not change.
        crop_padding: random crop of the training images after zero padding by this
            many pixels on each side, 0 for no crop.
        horizontal_flip: mirror training images left to right with probability 0.5.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_size: float | int,
        split_seed: int = 0,
        train_subset: int | None = None,
        crop_padding: int,
        horizontal_flip: bool,
    ) -> None:
        super().__init__()
        validate_positive_int(batch_size, "batch_size", 64)
        validate_non_negative_int(num_workers, "num_workers")
        validate_non_negative_int(crop_padding, "crop_padding")
        validate_split_size(val_size, "val_size")
        if train_subset is not None:
            validate_positive_int(train_subset, "train_subset", 1000)

        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.val_size = val_size
        self.split_seed = split_seed
        self.train_subset = train_subset
        self.crop_padding = crop_padding
        self.horizontal_flip = horizontal_flip
        self._splits: PreparedSplits | None = None

    @abstractmethod
    def load_data(self) -> ImageClassificationData:
        """Load the training images (validation not yet split off) and the test images."""

    # Lightning runs prepare_data in one process per node before any process runs setup,
    # so under DDP only that process decodes and writes the cache, unless every process
    # read a property such as num_classes earlier.
    def prepare_data(self) -> None:
        self.splits()

    def setup(self, stage: str | None = None) -> None:
        self.splits()

    def splits(self) -> PreparedSplits:
        """Return the datasets, loading the data and splitting it on the first call."""
        if self._splits is None:
            self._splits = self.build_splits(self.load_data())
        return self._splits

    def build_splits(self, data: ImageClassificationData) -> PreparedSplits:
        """Split off the validation set, take the training subset and compute mean and std."""
        num_images = len(data.train_labels)
        if num_images == 0:
            raise DataError(f"{type(self).__name__} found no training images. Check data.path and its train/ folder.")

        val_count = resolve_split_count(self.val_size, num_images, "val_size")
        train_indices, val_indices = split_off(data.train_labels, val_count, self.split_seed)
        if self.train_subset is not None:
            train_indices = self.take_train_subset(train_indices, data.train_labels, val_count)

        # Sources list images class by class. Validation and test are not shuffled, so
        # they are put in a fixed mixed order once: otherwise limit_val_batches or
        # limit_test_batches would evaluate only the first classes.
        # The test order has a seed of its own, so the test set stays the same when split_seed changes.
        val_indices = np.random.default_rng(self.split_seed).permutation(val_indices)
        test_indices = np.random.default_rng(0).permutation(len(data.test_labels))

        train = ImageArrayDataset(data.train_images[train_indices], data.train_labels[train_indices])
        val = ImageArrayDataset(data.train_images[val_indices], data.train_labels[val_indices])
        test = ImageArrayDataset(data.test_images[test_indices], data.test_labels[test_indices])
        mean, std = channel_mean_std(train.images)
        logger.info(
            "%s: %d train, %d validation and %d test images of %d classes, shape %s, mean %s, std %s",
            type(self).__name__,
            len(train),
            len(val),
            len(test),
            len(data.class_names),
            train.images.shape[1:],
            np.round(mean, 4).tolist(),
            np.round(std, 4).tolist(),
        )
        return PreparedSplits(train, val, test, list(data.class_names), mean, std)

    def take_train_subset(self, train_indices: np.ndarray, labels: np.ndarray, val_count: int) -> np.ndarray:
        """Return ``train_subset`` of ``train_indices``, stratified by class."""
        available = len(train_indices)
        if self.train_subset > available:
            raise DataError(
                f"train_subset={self.train_subset} is larger than the {available} training images "
                f"left after holding out {val_count} for validation. "
                f"Set data.train_subset to at most {available}, or null to train on all of them."
            )
        chosen = stratified_sample(labels[train_indices], self.train_subset, self.split_seed)
        return train_indices[chosen]

    def dataloader(self, dataset: ImageArrayDataset, train: bool) -> DataLoader:
        """Build a DataLoader. Training loaders shuffle and augment, the others do neither."""
        splits = self.splits()
        transform = BatchTransform(
            splits.mean,
            splits.std,
            crop_padding=self.crop_padding if train else 0,
            horizontal_flip=self.horizontal_flip if train else False,
        )
        # The training loader saves its place in the epoch in checkpoints, for exact mid-epoch resume.
        loader_class = ResumableDataLoader if train else DataLoader
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            sampler=ResumableRandomSampler(dataset) if train else None,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=transform,
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader(self.splits().train, train=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader(self.splits().val, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.dataloader(self.splits().test, train=False)

    @property
    def class_names(self) -> list[str]:
        """Class names in label order."""
        return self.splits().class_names

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.splits().class_names)

    @property
    def in_channels(self) -> int:
        """Number of image channels: 1 grey, 2 grey and alpha, 3 RGB, 4 RGBA."""
        return self.splits().train.images.shape[3]

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of every image, in pixels."""
        _, height, width, _ = self.splits().train.images.shape
        return height, width

    @property
    def num_train_samples(self) -> int:
        """Number of training images per epoch, after the validation split and the subset."""
        return len(self.splits().train)

    @property
    def num_val_samples(self) -> int:
        """Number of validation images."""
        return len(self.splits().val)

    @property
    def num_test_samples(self) -> int:
        """Number of test images."""
        return len(self.splits().test)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the training images on the [0, 1] scale, used to normalise."""
        return self.splits().mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation of the training images on the [0, 1] scale."""
        return self.splits().std


def hold_out_test_split(
    data: ImageClassificationData, test_size: float | int, seed: int, source: str
) -> ImageClassificationData:
    """Move a class-stratified ``test_size`` of the training images into the test split.

    ``test_size`` is a fraction in [0, 1) or a count, and ``seed`` fixes the draw. Any
    test images already in ``data`` are replaced. ``source`` names the data in messages.
    """
    test_count = resolve_split_count(test_size, len(data.train_labels), "test_size")
    remaining, held_out = split_off(data.train_labels, test_count, seed)
    logger.info(
        "%s: held out %d of %d images as the test split (test_size=%s)",
        source,
        test_count,
        len(data.train_labels),
        test_size,
    )
    return ImageClassificationData(
        train_images=data.train_images[remaining],
        train_labels=data.train_labels[remaining],
        test_images=data.train_images[held_out],
        test_labels=data.train_labels[held_out],
        class_names=data.class_names,
    )
