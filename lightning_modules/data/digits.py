"""scikit-learn's handwritten digits: 1,797 grey 8x8 images of the digits 0 to 9."""

import numpy as np
from sklearn.datasets import load_digits

from lightning_modules.data.base import InMemoryImageDataModule, hold_out_test_split
from lightning_modules.data.decode import ImageClassificationData
from lightning_modules.data.splits import validate_split_size

# load_digits returns pixel values from 0 to 16: counts of set pixels in 4x4 blocks of
# the original 32x32 bitmaps (UCI "Optical Recognition of Handwritten Digits").
DIGITS_MAX_VALUE = 16


class DigitsDataModule(InMemoryImageDataModule):
    """The UCI handwritten digits that ship with scikit-learn, so no download is needed.

    Images are uint8 ``(8, 8, 1)`` with the 0..16 values scaled to 0..255. The data set
    has no test split, so a class-stratified ``test_size`` is held out, drawn with
    ``test_split_seed``. It does not change with ``split_seed``, so runs with different
    validation splits share one test set. Of 1,797 images, the defaults give 1,293
    train, 144 validation and 360 test images.

    Flipping changes what a digit means, so ``horizontal_flip`` is off by default.
    ``cache_dir`` is accepted for a config shared with the other data modules and
    unused, because ``load_digits`` reads a small CSV file bundled with scikit-learn.
    See `InMemoryImageDataModule` for the other arguments.
    """

    def __init__(
        self,
        *,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_size: float | int = 0.1,
        test_size: float | int = 0.2,
        split_seed: int = 0,
        test_split_seed: int = 0,
        train_subset: int | None = None,
        crop_padding: int = 0,
        horizontal_flip: bool = False,
        cache_dir: str | None = None,
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
        validate_split_size(test_size, "test_size")
        self.test_size = test_size
        self.test_split_seed = test_split_seed
        self.cache_dir = cache_dir

    def load_data(self) -> ImageClassificationData:
        digits = load_digits()
        images = np.rint(digits.images * (255 / DIGITS_MAX_VALUE)).astype(np.uint8)[:, :, :, None]
        labels = digits.target.astype(np.int64)
        data = ImageClassificationData(
            train_images=images,
            train_labels=labels,
            test_images=images[:0],
            test_labels=labels[:0],
            class_names=[str(name) for name in digits.target_names],
        )
        return hold_out_test_split(data, self.test_size, self.test_split_seed, "scikit-learn digits")
