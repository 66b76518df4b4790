"""Any image-folder tree or tar archive with ``train/<class>/`` and optionally ``test/<class>/``."""

import logging
from collections.abc import Sequence
from pathlib import Path

from lightning_modules.data.base import InMemoryImageDataModule, hold_out_test_split
from lightning_modules.data.cache import load_image_folder
from lightning_modules.data.decode import MODE_BY_CHANNELS, ImageClassificationData
from lightning_modules.data.errors import DataError
from lightning_modules.data.splits import validate_split_size

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = ".cache"


def parse_image_size(image_size: Sequence[int] | None) -> tuple[int, int] | None:
    """Return ``image_size`` as ``(height, width)``, or raise DataError if it is not two positive ints."""
    if image_size is None:
        return None
    values = list(image_size) if not isinstance(image_size, str | int) else []
    if len(values) != 2 or not all(
        isinstance(value, int) and not isinstance(value, bool) and value > 0 for value in values
    ):
        raise DataError(
            f"image_size={image_size!r} is invalid: give [height, width] in pixels, "
            f"for example data.image_size=[32,32], or null to keep the images' size."
        )
    return values[0], values[1]


def validate_channels(channels: int | None) -> None:
    """Raise DataError unless ``channels`` is None or 1 to 4."""
    if channels is not None and channels not in MODE_BY_CHANNELS:
        raise DataError(
            f"channels={channels!r} is invalid: use 1 (grey), 2 (grey and alpha), 3 (RGB), "
            f"4 (RGBA), or null to take the first image's mode."
        )


class ImageFolderDataModule(InMemoryImageDataModule):
    """Images in ``train/<class>/`` and ``test/<class>/`` folders, or a tar archive of them.

    Class names are the sorted names of the folders in ``train/``. The images are decoded
    once and cached in ``cache_dir``. When the source has no ``test/`` folder, a
    class-stratified ``test_size`` of the training images is held out as the test split,
    drawn with ``test_split_seed``, and a warning is logged.

    Args:
        path: a folder or a .tar, .tar.gz or .tgz archive. ``train/`` may sit directly
            inside it or in one top folder, such as ``cifar10/train/airplane/0000.jpg``.
        image_size: ``(height, width)`` to resize every image to, or None to require
            that all images have the same size.
        channels: 1, 2, 3 or 4 to convert every image to L, LA, RGB or RGBA, or None to
            take the first image's mode (L, LA, RGB, RGBA; other modes become RGB).
        test_size: fraction in [0, 1) or count of training images held out for testing
            when the source has no ``test/``.
        test_split_seed: seed of that held-out test split.
        cache_dir: folder for the cache files of decoded arrays.

    See `InMemoryImageDataModule` for the other arguments.
    """

    def __init__(
        self,
        path: str,
        image_size: Sequence[int] | None = None,
        channels: int | None = None,
        test_size: float | int = 0.2,
        test_split_seed: int = 0,
        *,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_size: float | int = 0.1,
        split_seed: int = 0,
        train_subset: int | None = None,
        crop_padding: int = 0,
        horizontal_flip: bool = False,
        cache_dir: str = DEFAULT_CACHE_DIR,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            val_size=val_size,
            split_seed=split_seed,
            train_subset=train_subset,
            crop_padding=crop_padding,
            horizontal_flip=horizontal_flip,
        )
        validate_channels(channels)
        validate_split_size(test_size, "test_size")
        self.path = Path(path).expanduser()
        self.requested_image_size = parse_image_size(image_size)
        self.channels = channels
        self.test_size = test_size
        self.test_split_seed = test_split_seed
        self.cache_dir = Path(cache_dir).expanduser()

    def load_data(self) -> ImageClassificationData:
        if not self.path.exists():
            raise DataError(
                f"Image folder or archive {self.path} not found. "
                f"Set data.path to a folder or .tar/.tar.gz archive with train/<class>/ images."
            )
        data = load_image_folder(self.path, self.cache_dir, self.requested_image_size, self.channels)
        if len(data.test_labels) == 0:
            logger.warning(
                "%s has no test/<class>/ images, so %s of the training images are held out as the test split "
                "(data.test_size, seed %d)",
                self.path,
                self.test_size,
                self.test_split_seed,
            )
            data = hold_out_test_split(data, self.test_size, self.test_split_seed, str(self.path))
        return data
