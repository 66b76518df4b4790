"""Decoding an image folder or archive into uint8 arrays with Pillow."""

import io
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lightning_modules.data.errors import DataError
from lightning_modules.data.sources import EXPECTED_LAYOUT, iter_image_files

logger = logging.getLogger(__name__)

MODE_BY_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


@dataclass(frozen=True)
class ImageClassificationData:
    """Decoded images of a data set, before the validation split.

    Attributes:
        train_images: uint8 ``(N, H, W, C)``, values 0..255.
        train_labels: int64 ``(N,)``, indices into ``class_names``.
        test_images: uint8 ``(M, H, W, C)``. ``M`` is 0 when the source has no test split.
        test_labels: int64 ``(M,)``.
        class_names: class names in label order.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]


def decode_image(data: bytes, location: str) -> Image.Image:
    """Decode an encoded image (PNG, JPEG or any format Pillow reads) fully into memory.

    Raises:
        DataError: naming ``location`` and Pillow's message when decoding fails.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:  # noqa: BLE001 - Pillow's decoders raise many types on damaged files
        raise DataError(
            f"Decoding {location} failed: {type(error).__name__}: {error}. "
            f"Replace or delete the damaged file, then run again."
        ) from error
    return image


def target_mode(image: Image.Image) -> str:
    """Return the mode that keeps the image's channels: L, LA, RGB or RGBA, else RGB."""
    return image.mode if image.mode in MODE_BY_CHANNELS.values() else "RGB"


def image_to_array(image: Image.Image) -> np.ndarray:
    """Return the pixels as uint8 ``(H, W, C)``. Grey images get ``C = 1``."""
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


class ImageFolderDecoder:
    """Decoder of one image folder or archive into one mode and one size.

    Args:
        image_size: ``(height, width)`` to resize every image to with bilinear filtering,
            or None to require that all images have the first image's size.
        channels: 1, 2, 3 or 4 to convert every image to L, LA, RGB or RGBA, or None to
            use the first image's mode (L, LA, RGB or RGBA, other modes become RGB).
    """

    def __init__(self, image_size: tuple[int, int] | None = None, channels: int | None = None) -> None:
        self.image_size = image_size
        self.mode = MODE_BY_CHANNELS[channels] if channels is not None else None
        self.mode_forced = channels is not None
        self.first_location: str | None = None
        self.first_size: tuple[int, int] | None = None
        self.converted = 0

    def convert(self, image: Image.Image, location: str) -> np.ndarray:
        """Convert a decoded image to this decoder's mode and size and return uint8 ``(H, W, C)``.

        Raises:
            DataError: when no ``image_size`` is set and the image's size differs from
                the first image's size.
        """
        if self.mode is None:
            self.mode = target_mode(image)
        if self.first_location is None:
            self.first_location = location
            self.first_size = (image.height, image.width)

        if image.mode != self.mode:
            if not self.mode_forced and target_mode(image) != self.mode:
                self.converted += 1
            try:
                image = image.convert(self.mode)
            except ValueError as error:
                raise DataError(
                    f"Converting {location} from mode {image.mode} to {self.mode} failed: {error}. "
                    f"Save the image as 8-bit grey or RGB, or set data.channels to another value."
                ) from error

        size = (image.height, image.width)
        if self.image_size is not None:
            if size != self.image_size:
                height, width = self.image_size
                image = image.resize((width, height), Image.Resampling.BILINEAR)
        elif size != self.first_size:
            raise DataError(
                f"{location} has size {size[0]}x{size[1]} (height x width), but the first image, "
                f"{self.first_location}, has {self.first_size[0]}x{self.first_size[1]}. "
                f"Set data.image_size=[H,W] to resize every image to H x W pixels."
            )
        return image_to_array(image)


def decode_image_folder(
    path: Path, image_size: tuple[int, int] | None = None, channels: int | None = None
) -> ImageClassificationData:
    """Decode every image of an image folder or tar archive.

    Labels index the sorted names of the class folders in ``train/``. Images are sorted by
    class and file name, so the result does not depend on the order within an archive.

    Raises:
        DataError: for a missing path, a wrong layout, a damaged image or archive, images
            of different sizes without ``image_size``, or test classes missing from train.
    """
    start = time.perf_counter()
    decoder = ImageFolderDecoder(image_size, channels)
    records: dict[str, list[tuple[str, str, np.ndarray]]] = defaultdict(list)
    for file in iter_image_files(path):
        image = decode_image(file.read(), file.location)
        records[file.split].append((file.class_name, file.name, decoder.convert(image, file.location)))

    if decoder.converted:
        logger.warning(
            "Converted %d images of %s to mode %s, the mode of the first image (%s). "
            "Set data.channels to choose the number of channels instead.",
            decoder.converted,
            path,
            decoder.mode,
            decoder.first_location,
        )

    class_names = sorted({class_name for class_name, _, _ in records["train"]})
    if not class_names:
        raise DataError(
            f"{path} has no training images. Expected {EXPECTED_LAYOUT}. "
            f"Add images under train/<class>/ or pass the folder that contains them as data.path."
        )
    missing = sorted({class_name for class_name, _, _ in records["test"]} - set(class_names))
    if missing:
        raise DataError(
            f"{path} has test classes without training images: {', '.join(missing)}. "
            f"Add images under train/<class>/ for these classes or remove them from test/."
        )

    train_images, train_labels = stack_records(records["train"], class_names)
    test_images, test_labels = stack_records(records["test"], class_names, empty_shape=train_images.shape[1:])
    logger.info(
        "Decoded %d train and %d test images of %s in %.1f s",
        len(train_labels),
        len(test_labels),
        path,
        time.perf_counter() - start,
    )
    return ImageClassificationData(train_images, train_labels, test_images, test_labels, class_names)


def stack_records(
    records: list[tuple[str, str, np.ndarray]],
    class_names: list[str],
    empty_shape: tuple[int, ...] = (0, 0, 0),
) -> tuple[np.ndarray, np.ndarray]:
    """Stack ``(class_name, name, image)`` records sorted by class and name.

    Returns uint8 images ``(N, H, W, C)`` and int64 labels ``(N,)``. With no records the
    images have shape ``(0, *empty_shape)``.
    """
    if not records:
        return np.empty((0, *empty_shape), dtype=np.uint8), np.empty(0, dtype=np.int64)

    records = sorted(records, key=lambda record: (record[0], record[1]))
    label_by_class = {name: label for label, name in enumerate(class_names)}
    images = np.stack([image for _, _, image in records])
    labels = np.array([label_by_class[class_name] for class_name, _, _ in records], dtype=np.int64)
    return images, labels
