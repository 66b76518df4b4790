"""Brightness measurements that show a schedule's terminal-SNR flaw and what One More Step changes.

Every function takes per-image mean brightness on the [0, 1] scale, as
:func:`diffusion.oms.image_brightness` returns it, as float tensors or arrays of shape ``(N,)``.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import wasserstein_distance


def _as_array(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(array) == 0:
        raise ValueError("brightness values must not be empty")
    return array


@dataclass(frozen=True)
class BrightnessComparison:
    """Comparison of the brightness distribution of samples with the data's.

    Attributes:
        num_samples: samples measured.
        dark_fraction: fraction of samples darker than the data's 5% quantile (0.05 for the data).
        bright_fraction: fraction of samples brighter than the data's 95% quantile (0.05 for the data).
        wasserstein_1: Wasserstein-1 distance between the samples' and the data's brightness,
            in brightness units ([0, 1] scale).
        sample_mean: mean brightness of the samples.
        sample_std: standard deviation of the samples' brightness.
        data_mean: mean brightness of the data.
        data_std: standard deviation of the data's brightness.
    """

    num_samples: int
    dark_fraction: float
    bright_fraction: float
    wasserstein_1: float
    sample_mean: float
    sample_std: float
    data_mean: float
    data_std: float

    def to_dict(self) -> dict[str, float]:
        """Return the fields as a plain dictionary, for JSON."""
        return asdict(self)


def compare_brightness(
    sample_brightness: torch.Tensor | np.ndarray,
    data_brightness: torch.Tensor | np.ndarray,
    tail: float = 0.05,
) -> BrightnessComparison:
    """Compare the brightness of samples with the data's: tail fractions at ``tail`` and the Wasserstein-1 distance."""
    if not 0.0 < tail < 0.5:
        raise ValueError(f"tail must be in (0, 0.5), for example 0.05, got {tail}")
    samples = _as_array(sample_brightness)
    data = _as_array(data_brightness)
    dark_threshold, bright_threshold = np.quantile(data, [tail, 1.0 - tail])
    return BrightnessComparison(
        num_samples=len(samples),
        dark_fraction=float(np.mean(samples < dark_threshold)),
        bright_fraction=float(np.mean(samples > bright_threshold)),
        wasserstein_1=float(wasserstein_distance(samples, data)),
        sample_mean=float(samples.mean()),
        sample_std=float(samples.std()),
        data_mean=float(data.mean()),
        data_std=float(data.std()),
    )


def per_bin_brightness_error(
    sample_brightness: torch.Tensor | np.ndarray,
    requested_bins: torch.Tensor | np.ndarray,
    bin_means: Sequence[float],
) -> dict[str, list[float] | float]:
    """Compare the brightness generated for each requested bin with the data's mean brightness in that bin.

    Returns ``generated_mean`` and ``target_mean`` per bin, their ``signed_error``
    (generated - target) and the ``mean_absolute_error`` over the bins that were requested.
    """
    samples = _as_array(sample_brightness)
    requested = np.asarray(
        requested_bins.detach().cpu().numpy() if isinstance(requested_bins, torch.Tensor) else requested_bins
    ).reshape(-1)
    if len(requested) != len(samples):
        raise ValueError(f"got {len(samples)} brightness values but {len(requested)} requested bins")

    generated, targets, errors = [], [], []
    for index, target in enumerate(bin_means):
        members = samples[requested == index]
        if len(members) == 0:
            continue
        generated.append(float(members.mean()))
        targets.append(float(target))
        errors.append(float(members.mean() - target))
    if not errors:
        raise ValueError(f"no sample requested any of the {len(bin_means)} bins")
    return {
        "generated_mean": generated,
        "target_mean": targets,
        "signed_error": errors,
        "mean_absolute_error": float(np.mean(np.abs(errors))),
    }
