"""CIFAR-10 from a torchvision root, an image folder, or a tar archive of an image folder."""

import logging
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from lightning_modules.data.base import InMemoryImageDataModule
from lightning_modules.data.cache import load_image_folder
from lightning_modules.data.decode import ImageClassificationData
from lightning_modules.data.errors import DataError
from lightning_modules.data.imagefolder import DEFAULT_CACHE_DIR
from lightning_modules.data.sources import find_image_folder_root

logger = logging.getLogger(__name__)

TORCHVISION_FOLDER = "cifar-10-batches-py"
# Archive names looked for inside a searched folder.
ARCHIVE_NAMES = ("cifar10-jpeg.tar.gz", "cifar10.tar.gz", "cifar10.tgz", "cifar10.tar")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)


@dataclass(frozen=True)
class CIFAR10Source:
    """A located copy of CIFAR-10: a torchvision root, or an image folder or archive."""

    kind: Literal["torchvision", "imagefolder"]
    path: Path


def inspect_candidate(path: Path) -> CIFAR10Source | str:
    """Return the CIFAR-10 source at ``path``, or the reason why it contains none."""
    if not path.exists():
        return "does not exist"
    if path.is_file():
        if tarfile.is_tarfile(path):
            return CIFAR10Source("imagefolder", path)
        return "is not a tar archive"
    if not path.is_dir():
        return "is neither a folder nor a file"

    if (path / TORCHVISION_FOLDER).is_dir():
        return CIFAR10Source("torchvision", path)
    if find_image_folder_root(path) is not None:
        return CIFAR10Source("imagefolder", path)
    for name in ARCHIVE_NAMES:
        if (path / name).is_file():
            return CIFAR10Source("imagefolder", path / name)
    return f"contains no {TORCHVISION_FOLDER}/, no train/<class>/ folders and none of {', '.join(ARCHIVE_NAMES)}"


def find_cifar10_source(candidates: Sequence[Path]) -> tuple[CIFAR10Source | None, list[str]]:
    """Return the first CIFAR-10 source among ``candidates`` and a note on each path looked at."""
    notes = []
    for candidate in candidates:
        result = inspect_candidate(candidate)
        if isinstance(result, CIFAR10Source):
            return result, notes
        notes.append(f"{candidate} ({result})")
    return None, notes


def missing_data_error(notes: list[str], download_root: Path) -> DataError:
    """Build the one DataError for CIFAR-10 not found, naming every path looked at."""
    looked_at = "\n".join(f"  - {note}" for note in notes)
    return DataError(
        "CIFAR-10 not found. Paths looked at:\n"
        f"{looked_at}\n"
        "Provide the data in one of these ways:\n"
        "  - set data.path to a .tar/.tar.gz archive or a folder with train/<class>/ and test/<class>/ images,\n"
        "    for example data.path=/path/to/cifar10-jpeg.tar.gz\n"
        f"  - set data.path to a torchvision root, a folder that contains {TORCHVISION_FOLDER}/\n"
        f"  - with internet access, set data.download=true to download the original release into {download_root}\n"
        f"  - place {ARCHIVE_NAMES[0]} in one of the folders looked at."
    )


def load_torchvision_cifar10(root: Path, download: bool) -> ImageClassificationData:
    """Read CIFAR-10 with ``torchvision.datasets.CIFAR10``, downloading it if ``download``.

    torchvision checks the MD5 sums of the pickled batches, so only the original release
    passes. The batches are already uint8 arrays, so this is not cached.

    NOTE: only the error for an invalid root is tested. Reading a real root and the
    download have not been run, because the test machines have no internet access.
    """
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=False)
    except RuntimeError as error:
        raise DataError(
            f"torchvision could not read CIFAR-10 in {root}: {error}. Delete {root / TORCHVISION_FOLDER} "
            f"and download it again with data.download=true, or set data.path to an image folder or archive."
        ) from error
    except OSError as error:
        raise DataError(
            f"Downloading CIFAR-10 into {root} failed: {error}. Without internet access, set "
            f"data.path to a copy such as cifar10-jpeg.tar.gz and data.download=false."
        ) from error

    return ImageClassificationData(
        train_images=np.asarray(train.data, dtype=np.uint8),
        train_labels=np.asarray(train.targets, dtype=np.int64),
        test_images=np.asarray(test.data, dtype=np.uint8),
        test_labels=np.asarray(test.targets, dtype=np.int64),
        class_names=list(train.classes),
    )


def validate_cifar10(data: ImageClassificationData, source: Path) -> None:
    """Raise DataError unless ``data`` has 10 classes, 32x32 RGB images and a test split."""
    problems = []
    if len(data.class_names) != NUM_CLASSES:
        problems.append(f"{len(data.class_names)} classes ({', '.join(data.class_names)}) instead of {NUM_CLASSES}")
    if data.train_images.shape[1:] != IMAGE_SHAPE:
        problems.append(
            f"images of shape {data.train_images.shape[1:]} (height, width, channels) instead of {IMAGE_SHAPE}"
        )
    if len(data.test_labels) == 0:
        problems.append("no test/<class>/ images")
    if problems:
        raise DataError(
            f"{source} is not CIFAR-10: it has {'; '.join(problems)}. "
            f"For other image folders use data=imagefolder data.path={source}."
        )


class CIFAR10DataModule(InMemoryImageDataModule):
    """CIFAR-10: 50,000 training and 10,000 test images, 32x32 RGB, 10 classes.

    The data may be a torchvision root (a folder containing ``cifar-10-batches-py``), a
    folder with ``train/<class>/`` and ``test/<class>/`` images, possibly under one top
    folder, or a .tar/.tar.gz/.tgz archive of such a folder, read without unpacking.
    Image folders and archives are decoded once and cached in ``cache_dir``.

    Args:
        path: where the data is. If None, ``search_paths`` and then ``data_dir`` are
            tried in order. A searched folder may also contain one of the archives
            ``cifar10-jpeg.tar.gz``, ``cifar10.tar.gz``, ``cifar10.tgz`` or ``cifar10.tar``.
        search_paths: paths tried in order when ``path`` is None.
        download: download the original release with torchvision when no data is
            found, into ``path`` or, if that is None, into ``data_dir``. Needs internet access.
        data_dir: torchvision root, looked at last and used for downloads.
        cache_dir: folder for the cache files of decoded arrays.
        downsample_factor: average each ``f x f`` block of pixels into one (area
            downsampling), so 2 gives 16x16 images. Small diffusion models on a CPU learn
            16x16 CIFAR-10 in far fewer steps than 32x32; 1 keeps the original images.

    The defaults hold out 5,000 validation images and augment with a random crop after
    padding by 4 pixels and a horizontal flip, the usual CIFAR-10 recipe. See
    `InMemoryImageDataModule` for the other arguments.
    """

    def __init__(
        self,
        path: str | None = None,
        search_paths: Sequence[str] = (),
        download: bool = False,
        data_dir: str = "data",
        *,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_size: float | int = 5000,
        split_seed: int = 0,
        train_subset: int | None = None,
        crop_padding: int = 4,
        horizontal_flip: bool = True,
        cache_dir: str = DEFAULT_CACHE_DIR,
        downsample_factor: int = 1,
    ) -> None:
        if isinstance(downsample_factor, bool) or not isinstance(downsample_factor, int) or downsample_factor < 1:
            raise DataError(f"downsample_factor must be a positive integer, got {downsample_factor!r}; use 1 for 32x32")
        if IMAGE_SHAPE[0] % downsample_factor:
            raise DataError(
                f"downsample_factor={downsample_factor} does not divide the image size {IMAGE_SHAPE[0]}; "
                "use 1, 2, 4, 8, 16 or 32"
            )
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
        if isinstance(search_paths, str):
            raise DataError(
                f"search_paths={search_paths!r} is invalid: give a list of paths, such as [{search_paths}]."
            )
        self.path = Path(path).expanduser() if path is not None else None
        self.search_paths = [Path(search_path).expanduser() for search_path in search_paths]
        self.download = download
        self.data_dir = Path(data_dir).expanduser()
        self.cache_dir = Path(cache_dir).expanduser()
        self.downsample_factor = downsample_factor

    def candidate_paths(self) -> list[Path]:
        """Return the paths to look at, in order: ``path`` alone, or the search paths and ``data_dir``."""
        if self.path is not None:
            return [self.path]
        # data_dir is usually one of the search paths too; each path is looked at once.
        return list(dict.fromkeys([*self.search_paths, self.data_dir]))

    def download_root(self) -> Path:
        """Return the folder that ``download=true`` fills: ``path``, its folder for an archive, or ``data_dir``."""
        if self.path is None:
            return self.data_dir
        if self.path.name.endswith(ARCHIVE_SUFFIXES):
            return self.path.parent
        return self.path

    def load_data(self) -> ImageClassificationData:
        source, notes = find_cifar10_source(self.candidate_paths())
        download_root = self.download_root()
        if source is None:
            if not self.download:
                raise missing_data_error(notes, download_root)
            logger.info("CIFAR-10 not found, so torchvision downloads it into %s", download_root)
            source = CIFAR10Source("torchvision", download_root)

        logger.info("Reading CIFAR-10 from %s (%s)", source.path, source.kind)
        if source.kind == "torchvision":
            data = load_torchvision_cifar10(source.path, self.download)
        else:
            data = load_image_folder(source.path, self.cache_dir, channels=IMAGE_SHAPE[2])
        validate_cifar10(data, source.path)
        if self.downsample_factor > 1:
            data = area_downsample(data, self.downsample_factor)
            logger.info("Downsampled CIFAR-10 by %d to %s", self.downsample_factor, data.train_images.shape[1:3])
        return data


def area_downsample(data: ImageClassificationData, factor: int) -> ImageClassificationData:
    """Return ``data`` with every ``factor x factor`` pixel block averaged, rounded to uint8."""

    def downsample(images: np.ndarray) -> np.ndarray:
        count, height, width, channels = images.shape
        blocks = images.reshape(count, height // factor, factor, width // factor, factor, channels)
        return np.rint(blocks.mean(axis=(2, 4), dtype=np.float64)).astype(np.uint8)

    return replace(data, train_images=downsample(data.train_images), test_images=downsample(data.test_images))
