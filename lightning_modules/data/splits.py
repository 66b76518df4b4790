"""Deterministic, class-stratified splits and subsets of a labelled data set."""

import math

import numpy as np

from lightning_modules.data.errors import DataError


def validate_split_size(value: float | int, name: str) -> None:
    """Raise DataError unless ``value`` is a fraction in [0, 1) or a count >= 0.

    A float with an integer value of 1 or more, such as 5000.0 from a config file, counts
    as a count. Whether a count fits the data set is checked later by `resolve_split_count`.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(
            f"{name}={value!r} is invalid: use a fraction in [0, 1) such as 0.1, or a number of images such as 5000."
        )
    if isinstance(value, float) and not value.is_integer() and not 0.0 <= value < 1.0:
        raise DataError(
            f"{name}={value} is invalid: a fraction must be in [0, 1), for example "
            f"data.{name}=0.1, and a number of images must be a whole number."
        )
    if value < 0:
        raise DataError(f"{name}={value} is invalid: it must not be negative, for example data.{name}=0.1.")


def resolve_split_count(value: float | int, total: int, name: str) -> int:
    """Return the number of the ``total`` images that ``value`` selects.

    A fraction in [0, 1) selects ``ceil(value * total)`` images, as scikit-learn's
    ``train_test_split`` does. A count must be smaller than ``total``, because the rest
    of the images must not be empty.
    """
    validate_split_size(value, name)
    if isinstance(value, float) and value < 1.0:
        count = math.ceil(value * total)
    else:
        count = int(value)

    if count >= total:
        raise DataError(
            f"{name}={value} selects {count} of the {total} images, which leaves none for "
            f"training. Use a fraction such as data.{name}=0.1 or a count below {total}."
        )
    return count


def stratified_sample(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Draw ``count`` indices into ``labels`` with the class proportions of ``labels``.

    Each class gets ``floor(count * class_size / total)`` indices. The remaining indices
    go to the classes with the largest fractional parts, ties to the lower class label.
    The draw depends only on ``labels``, ``count`` and ``seed``.

    Args:
        labels: int64 class labels ``(N,)``.
        count: number of indices to draw, in [0, N].
        seed: seed of the NumPy random generator.

    Returns:
        Sorted int64 indices ``(count,)``, without repeats.
    """
    total = len(labels)
    if not 0 <= count <= total:
        raise ValueError(f"count must be in [0, {total}], got {count}")
    if count == 0:
        return np.empty(0, dtype=np.int64)

    classes, class_sizes = np.unique(labels, return_counts=True)
    quotas = class_sizes * (count / total)
    per_class = np.floor(quotas).astype(np.int64)
    remainder = count - int(per_class.sum())
    largest_fractions = np.argsort(-(quotas - per_class), kind="stable")[:remainder]
    per_class[largest_fractions] += 1

    generator = np.random.default_rng(seed)
    chosen = [
        generator.choice(np.flatnonzero(labels == label), size=size, replace=False)
        for label, size in zip(classes, per_class, strict=True)
    ]
    return np.sort(np.concatenate(chosen).astype(np.int64))


def split_off(labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the indices of ``labels`` into ``(remaining, held_out)``, stratified by class.

    ``held_out`` contains ``count`` indices drawn by `stratified_sample` and ``remaining``
    the rest. Both are sorted int64 arrays.
    """
    held_out = stratified_sample(labels, count, seed)
    remaining = np.setdiff1d(np.arange(len(labels), dtype=np.int64), held_out, assume_unique=True)
    return remaining, held_out
