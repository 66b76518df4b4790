"""The on-disk cache of decoded image folders, as uncompressed uint8 ``.npz`` files.

A cache file's name contains a hash of the resolved source path, the source's size and
modification time, and the decoding options, so a changed source gets a new file. Files
are written to a temporary name and renamed with `os.replace`, so concurrent processes
(such as DDP ranks) and killed runs never leave a partly written cache file behind.
"""

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from lightning_modules.data.decode import ImageClassificationData, decode_image_folder

logger = logging.getLogger(__name__)

# Increase when the decoded arrays change for the same source and options, so that old
# cache files are no longer used.
CACHE_FORMAT_VERSION = 1

ARRAY_NAMES = ("train_images", "train_labels", "test_images", "test_labels", "class_names", "cache_key")


class InvalidCacheError(Exception):
    """A cache file that cannot be loaded or does not match its key."""


def source_fingerprint(path: Path) -> dict[str, int]:
    """Return the size and modification time (ns) of a file.

    For a folder, return the number of files below it, their total size and the latest
    modification time, so that adding, removing or changing an image changes the result.
    This walks the whole folder. For the 60,000 files of CIFAR-10 on a local disk that
    took 0.23 s (one measurement on a 2-core Linux VM).
    """
    if path.is_file():
        stat = path.stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    files = 0
    total_size = 0
    latest_mtime_ns = path.stat().st_mtime_ns
    for directory, _, file_names in os.walk(path):
        latest_mtime_ns = max(latest_mtime_ns, os.stat(directory).st_mtime_ns)
        for file_name in file_names:
            stat = os.stat(os.path.join(directory, file_name))
            files += 1
            total_size += stat.st_size
            latest_mtime_ns = max(latest_mtime_ns, stat.st_mtime_ns)
    return {"files": files, "size": total_size, "mtime_ns": latest_mtime_ns}


def cache_key(source: Path, options: dict[str, Any]) -> str:
    """Return the JSON text that identifies a source, its current state and the options."""
    resolved = source.resolve()
    return json.dumps(
        {
            "version": CACHE_FORMAT_VERSION,
            "source": str(resolved),
            "fingerprint": source_fingerprint(resolved),
            "options": options,
        },
        sort_keys=True,
    )


def cache_file_path(cache_dir: Path, source: Path, key: str) -> Path:
    """Return ``<cache_dir>/<source name>-<16 hex digits of the key's SHA-256>.npz``."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe_name = re.sub(r"[^A-Za-z0-9._-]", "_", source.resolve().name) or "data"
    return cache_dir / f"{safe_name}-{digest}.npz"


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to an uncompressed ``.npz`` file atomically.

    The data goes to a temporary file in the same folder, which is synced and then
    renamed over ``path``. Readers see the old file or the complete new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    file_descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(file_descriptor, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp creates the file readable by its owner only.
        os.chmod(temporary_name, 0o644)
        os.replace(temporary_name, path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` file into memory.

    Raises:
        InvalidCacheError: when the file cannot be read or parsed.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise InvalidCacheError(f"{type(error).__name__}: {error}") from error


def data_to_arrays(data: ImageClassificationData, key: str) -> dict[str, np.ndarray]:
    """Return the arrays that a cache file stores for ``data``."""
    return {
        "train_images": data.train_images,
        "train_labels": data.train_labels,
        "test_images": data.test_images,
        "test_labels": data.test_labels,
        "class_names": np.array(data.class_names, dtype=np.str_),
        "cache_key": np.array(key, dtype=np.str_),
    }


def arrays_to_data(arrays: dict[str, np.ndarray], key: str) -> ImageClassificationData:
    """Check the arrays of a cache file against ``key`` and return them as data.

    Raises:
        InvalidCacheError: when arrays are missing, have the wrong dtype or shape, or
            were written for another key.
    """
    missing = [name for name in ARRAY_NAMES if name not in arrays]
    if missing:
        raise InvalidCacheError(f"missing arrays {missing}")
    if str(arrays["cache_key"]) != key:
        raise InvalidCacheError("written for another source or other options")

    data = ImageClassificationData(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"],
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"],
        class_names=[str(name) for name in arrays["class_names"]],
    )
    for images, labels in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
        if images.dtype != np.uint8 or images.ndim != 4 or labels.dtype != np.int64 or len(images) != len(labels):
            raise InvalidCacheError("arrays have the wrong dtype or shape")
        if len(labels) and not 0 <= labels.min() <= labels.max() < len(data.class_names):
            raise InvalidCacheError("labels out of range")
    return data


def read_cache(cache_path: Path, key: str, source: Path, warn: bool) -> ImageClassificationData | None:
    """Return the data in ``cache_path``, or None when the file is missing or invalid.

    With ``warn``, an invalid file is reported with a warning.
    """
    if not cache_path.exists():
        return None
    try:
        data = arrays_to_data(load_arrays(cache_path), key)
    except InvalidCacheError as error:
        if warn:
            logger.warning("Cache file %s is invalid (%s), so %s is decoded again", cache_path, error, source)
        return None

    logger.info(
        "Loaded %d train and %d test images of %s from cache %s",
        len(data.train_labels),
        len(data.test_labels),
        source,
        cache_path,
    )
    return data


@contextlib.contextmanager
def cache_lock(cache_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<cache_path>.lock`` while the cache file is built.

    Other processes that build the same cache file wait here, so only one decodes. When
    the lock file cannot be created, for example in a read-only folder, this logs a
    warning and continues without the lock.
    """
    lock_path = cache_path.with_name(cache_path.name + ".lock")
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_path)
        lock.acquire()
    except OSError as error:
        logger.warning("Locking %s failed (%s), so other processes may decode the same data", lock_path, error)
        yield
        return

    try:
        yield
    finally:
        lock.release()


def load_image_folder(
    path: Path,
    cache_dir: Path,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
) -> ImageClassificationData:
    """Return the decoded image folder or archive at ``path``, from the cache if possible.

    The first call decodes the images with `decode_image_folder` and writes the cache
    file. Later calls with the same unchanged source and options read the cache file.
    Processes that start at the same time, such as DDP ranks, wait for the one that
    decodes and then read its cache file. A cache file that fails to load is decoded
    again and replaced, with a warning. When the cache file cannot be written, the
    images are used anyway and a warning is logged.
    """
    key = cache_key(path, {"image_size": image_size, "channels": channels})
    cache_path = cache_file_path(cache_dir, path, key)
    data = read_cache(cache_path, key, path, warn=False)
    if data is not None:
        return data

    with cache_lock(cache_path):
        # Another process may have written the file while this one waited for the lock.
        data = read_cache(cache_path, key, path, warn=True)
        if data is not None:
            return data

        logger.info("Decoding the images of %s and caching the arrays in %s", path, cache_path)
        data = decode_image_folder(path, image_size, channels)
        try:
            save_arrays(cache_path, data_to_arrays(data, key))
        except OSError as error:
            logger.warning(
                "Writing cache file %s failed (%s), so %s will be decoded again next time", cache_path, error, path
            )
    return data
