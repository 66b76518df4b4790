"""Frechet distances between generated images and a data set, with Inception-v3 or with a classifier leanlight trains.

The Frechet distance between the Gaussians ``N(mu1, S1)`` and ``N(mu2, S2)`` fitted to two
sets of features is ``|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))``, the formula of
FID and of torchmetrics' ``FrechetInceptionDistance``.

- :func:`inception_fid` is the standard FID: torchmetrics' ``FrechetInceptionDistance`` on
  Inception-v3 pool features. It needs torch-fidelity and the Inception weights file on disk,
  and it never downloads them.
- Offline, :class:`FeatureNetwork` takes the features of a classifier, such as the ResNet-20
  of ``python train.py experiment=cifar10_resnet20``: the globally pooled activations that
  enter its final linear layer. Such a distance is a relative measure and is named after its
  feature network and sample count, e.g. "FD-ResNet20 (10k samples)", never "FID".

Reference statistics of a data set are cached as ``.npz`` files keyed by the images' content
and the feature network's weights (:func:`reference_statistics`).
"""

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lightning_modules.data.cache import InvalidCacheError, load_arrays, save_arrays
from lightning_modules.data.transforms import normalize
from models.registry import create_model

logger = logging.getLogger(__name__)

INCEPTION_WEIGHTS_ENV = "LEANLIGHT_INCEPTION_WEIGHTS"
# The file that torch-fidelity would otherwise download from its GitHub release v0.2.0.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"

# Increase when the cached statistics change for the same images and network.
REFERENCE_CACHE_VERSION = 1

# Float images with values outside this range are rejected instead of clamped, because they
# are not in [-1, 1]. CIFAR-10 images normalised with its mean and std, for example, reach -2 and 2.1.
FLOAT_RANGE_LIMIT = 1.5

SQRTM_METHODS = ("sqrtm", "eigh")

OFFLINE_ALTERNATIVE = (
    "Offline, use the Frechet distance in the feature space of a CIFAR-10 ResNet-20 that leanlight trains: "
    "train it with `python train.py experiment=cifar10_resnet20`, then pass "
    "`metrics.frechet=resnet20 metrics.feature_checkpoint=<its run folder or .ckpt>` to sample.py "
    "(in code: diffusion.frechet.load_feature_network)."
)


# ---------------------------------------------------------------------------------------
# The distance


@dataclass(frozen=True)
class GaussianStatistics:
    """Mean ``(D,)`` and covariance ``(D, D)`` of ``count`` feature vectors, in float64."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int


def feature_statistics(features: np.ndarray | torch.Tensor) -> GaussianStatistics:
    """Compute the mean and the unbiased covariance (divided by N - 1) of features ``(N, D)`` in float64."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape (N, D) with N >= 2, got {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError("features contain NaN or infinite values; check the images and the feature network")
    mean = features.mean(axis=0)
    centered = features - mean
    covariance = centered.T @ centered / (features.shape[0] - 1)
    return GaussianStatistics(mean=mean, covariance=covariance, count=features.shape[0])


def default_sqrtm_method() -> str:
    """Return ``"sqrtm"`` when SciPy is installed, else ``"eigh"``."""
    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        return "eigh"
    return "sqrtm"


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str | None = None) -> float:
    """Compute ``Tr((sigma1 sigma2)^(1/2))`` for symmetric positive semi-definite float64 matrices.

    ``"sqrtm"`` takes SciPy's Schur-based square root of the product and retries with ``1e-6``
    added to both diagonals when the result is not finite, as pytorch-fid's
    ``calculate_frechet_distance`` does.
    ``"eigh"`` needs only NumPy: ``sigma1 sigma2`` is similar to the symmetric matrix
    ``sigma1^(1/2) sigma2 sigma1^(1/2)``, so the trace is the sum of the square roots of that
    matrix's eigenvalues. Rounding errors make tiny negative eigenvalues, which are set to 0.
    """
    method = method or default_sqrtm_method()
    if method == "sqrtm":
        import scipy.linalg

        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.all(np.isfinite(root)):
            offset = np.eye(sigma1.shape[0]) * 1e-6
            logger.warning("The square root of the covariance product is not finite, so 1e-6 is added to the diagonals")
            root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        # A product of two PSD matrices has real eigenvalues, so a small imaginary part is rounding
        # error. pytorch-fid raises above the same tolerance of 1e-3.
        if np.iscomplexobj(root) and not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ValueError(
                f"the square root of the covariance product has an imaginary part of up to "
                f"{np.max(np.abs(root.imag)):.3g}; check that both covariances are positive semi-definite, "
                "or pass method='eigh'"
            )
        return float(np.real(np.trace(root)))
    if method == "eigh":
        values, vectors = np.linalg.eigh(sigma1)
        sqrt_sigma1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
        product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
        eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
        return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    raise ValueError(f"unknown matrix square root method {method!r}; use one of {SQRTM_METHODS}")


def frechet_distance(first: GaussianStatistics, second: GaussianStatistics, method: str | None = None) -> float:
    """Compute the Frechet distance between two Gaussians in float64 (see the module docstring)."""
    if first.mean.shape != second.mean.shape:
        raise ValueError(f"feature sizes differ: {first.mean.shape[0]} and {second.mean.shape[0]}")
    mean_term = float(np.sum(np.square(first.mean - second.mean)))
    trace_term = float(np.trace(first.covariance) + np.trace(second.covariance))
    distance = mean_term + trace_term - 2.0 * trace_sqrt_product(first.covariance, second.covariance, method)
    # The exact value is >= 0. Rounding can make identical sets come out slightly negative.
    return max(distance, 0.0)


def format_sample_count(count: int) -> str:
    """Return a sample count for names: 10000 as "10k", 1500 as "1,500"."""
    if count >= 1000 and count % 1000 == 0:
        return f"{count // 1000}k"
    return f"{count:,}"


def frechet_metric_name(feature_network: str, num_samples: int) -> str:
    """Return the name of a Frechet distance, e.g. "FD-ResNet20 (10k samples)" or "FID (Inception-v3, 50k samples)"."""
    if feature_network == "Inception-v3":
        return f"FID (Inception-v3, {format_sample_count(num_samples)} samples)"
    return f"FD-{feature_network} ({format_sample_count(num_samples)} samples)"


@dataclass(frozen=True)
class FrechetResult:
    """A Frechet distance with the feature network, sample count and reference data that define it."""

    value: float
    feature_network: str
    num_samples: int
    reference: str
    reference_count: int

    @property
    def name(self) -> str:
        """The metric's full name, e.g. "FD-ResNet20 (10k samples)"."""
        return frechet_metric_name(self.feature_network, self.num_samples)

    def describe(self) -> str:
        """Return e.g. "FD-ResNet20 (10k samples) = 12.34 against CIFAR10DataModule train (50k images)"."""
        reference_count = format_sample_count(self.reference_count)
        return f"{self.name} = {self.value:.4g} against {self.reference} ({reference_count} images)"


# ---------------------------------------------------------------------------------------
# Images


def to_uint8_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Convert images to uint8 ``(N, C, H, W)``.

    Accepts uint8 ``(N, H, W, C)``, as in sample.py's ``samples.npz``, or floats in [-1, 1]
    ``(N, C, H, W)``, as samplers return them. Floats are rounded to 8 bits the way sample.py
    saves them, so a batch of samples and its ``.npz`` file give the same features.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.ndim != 4:
        raise ValueError(f"images must have 4 dimensions, got shape {tuple(images.shape)}")

    if images.dtype == torch.uint8:
        return images.permute(0, 3, 1, 2).contiguous()
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1], got {images.dtype}")

    low, high = float(images.min()), float(images.max())
    if low < -FLOAT_RANGE_LIMIT or high > FLOAT_RANGE_LIMIT:
        raise ValueError(
            f"float images must be in [-1, 1], got values from {low:.3g} to {high:.3g}; "
            "pass the sampler's output or uint8 images, not images normalised with a mean and std"
        )
    # contiguous() matters: a channels-last input would select other convolution kernels,
    # which round differently, and the features of the same images would differ slightly.
    return ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).contiguous()


# ---------------------------------------------------------------------------------------
# The classifier's features


class PenultimateFeatures(nn.Module):
    """The input of a classifier's final ``nn.Linear`` layer, flattened to ``(N, D)``.

    For the CIFAR ResNets and VGGs of :mod:`models` this is the globally pooled activation
    vector. The wrapped network runs whole, classifier included, and a forward pre-hook keeps
    the classifier's input.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        linear_layers = [module for module in net.modules() if isinstance(module, nn.Linear)]
        if not linear_layers:
            raise ValueError(f"{type(net).__name__} has no nn.Linear layer, so it has no penultimate features")
        self.net = net
        # The CIFAR ResNets name their classifier fc. Other networks are taken to end in their last nn.Linear.
        classifier = net.fc if isinstance(getattr(net, "fc", None), nn.Linear) else linear_layers[-1]
        self.num_features = classifier.in_features
        self._captured: torch.Tensor | None = None
        classifier.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._captured = inputs[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._captured = None
        self.net(images)
        features, self._captured = self._captured, None
        if features is None:
            raise RuntimeError(f"{type(self.net).__name__}'s forward pass did not call its final nn.Linear layer")
        return torch.flatten(features, 1)


def weights_digest(net: nn.Module) -> str:
    """Return the SHA-256 of a network's state dict: names, dtypes, shapes and values of all tensors."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class FeatureNetwork:
    """A classifier used as a feature extractor, with the normalisation of its training data.

    Args:
        name: the name that metric names carry, e.g. "ResNet20".
        extractor: returns the penultimate features ``(N, D)`` of normalised float images.
        mean: per-channel mean on the [0, 1] scale that the classifier's data module used.
        std: per-channel standard deviation on the [0, 1] scale.
    """

    name: str
    extractor: PenultimateFeatures
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        self.extractor.eval()
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean and std need one value per channel, got mean={self.mean}, std={self.std}")

    @property
    def identity(self) -> str:
        """SHA-256 of the name, the current weights, mean and std, which keys the reference statistics cache."""
        description = {"name": self.name, "weights": weights_digest(self.extractor.net), "mean": self.mean}
        description["std"] = self.std
        return hashlib.sha256(json.dumps(description).encode()).hexdigest()

    @property
    def in_channels(self) -> int:
        """Channels of the images the network takes."""
        return len(self.mean)

    @torch.no_grad()
    def extract_features(
        self, images: np.ndarray | torch.Tensor, batch_size: int = 256, device: torch.device | str = "cpu"
    ) -> np.ndarray:
        """Return the float64 penultimate features ``(N, D)`` of images (see :func:`to_uint8_nchw`)."""
        images = to_uint8_nchw(images)
        if images.shape[1] != self.in_channels:
            raise ValueError(
                f"the feature network {self.name} takes {self.in_channels}-channel images, "
                f"got {images.shape[1]} channels; use a feature network trained on the same data as the samples"
            )
        extractor = self.extractor.to(device)
        mean = torch.tensor(self.mean, dtype=torch.float32)
        std = torch.tensor(self.std, dtype=torch.float32)
        batches = []
        for start in range(0, len(images), batch_size):
            # The same float32 arithmetic as the data module's BatchTransform.
            batch = normalize(images[start : start + batch_size], mean, std).to(device)
            batches.append(extractor(batch).double().cpu())
        return torch.cat(batches).numpy()


def feature_network_from_model(
    net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], name: str | None = None
) -> FeatureNetwork:
    """Wrap any classifier, such as one from :func:`models.create_model`, as a :class:`FeatureNetwork`."""
    return FeatureNetwork(name or type(net).__name__, PenultimateFeatures(net), tuple(mean), tuple(std))


def resolve_checkpoint_file(path: str | Path) -> Path:
    """Accept a ``.ckpt`` file or a train.py run folder, whose ``checkpoints/last.ckpt`` is used."""
    path = Path(path).expanduser()
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(
                f"checkpoints/last.ckpt not found in the feature checkpoint folder {path}; "
                "pass a run folder of `python train.py experiment=cifar10_resnet20` or a .ckpt file"
            )
        return last
    if not path.is_file():
        raise FileNotFoundError(
            f"feature checkpoint {path} not found; pass a run folder of "
            "`python train.py experiment=cifar10_resnet20` or a .ckpt file"
        )
    return path


def cifar_resnet_arguments(state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Infer the :func:`models.create_model` arguments of a CIFAR ResNet from its state dict.

    A Lightning checkpoint of the classifier stores weights only, so depth, widths,
    shortcut option, input channels and classes are read off the tensors' shapes.
    """
    required = ("conv1.weight", "layer2.0.conv1.weight", "layer3.0.conv1.weight", "fc.weight")
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(
            f"{source} is not a checkpoint of a CIFAR ResNet (models/cifar_resnet.py): it has no {missing}. "
            "For other networks, build the model with models.create_model, load its weights and pass it to "
            "diffusion.frechet.feature_network_from_model"
        )
    blocks = {int(match.group(1)) for key in state if (match := re.match(r"layer1\.(\d+)\.", key))}
    widths = (
        state["conv1.weight"].shape[0],
        state["layer2.0.conv1.weight"].shape[0],
        state["layer3.0.conv1.weight"].shape[0],
    )
    return {
        "name": f"resnet{6 * len(blocks) + 2}",
        "in_channels": state["conv1.weight"].shape[1],
        "num_classes": state["fc.weight"].shape[0],
        "widths": tuple(int(width) for width in widths),
        "shortcut": "B" if any(".shortcut.0.weight" in key for key in state) else "A",
    }


def load_feature_network(
    checkpoint: str | Path, mean: tuple[float, ...], std: tuple[float, ...], prefix: str = "net."
) -> FeatureNetwork:
    """Load the CIFAR ResNet of a classifier checkpoint written by train.py as a :class:`FeatureNetwork`.

    The file is read with ``torch.load(weights_only=True)``, which unpickles only tensors and
    plain containers. ``mean`` and ``std`` must be those of the data module the classifier
    was trained with, because the checkpoint does not store them.
    """
    path = resolve_checkpoint_file(checkpoint)
    stored = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = stored.get("state_dict", stored) if isinstance(stored, dict) else None
    if state_dict is None:
        raise ValueError(f"{path} contains no state dict")
    if isinstance(stored, dict) and stored.get("polarization", {}).get("extracted"):
        raise ValueError(
            f"{path} is a checkpoint of a polarization pruning run, whose network is pruned. Pass a "
            "module=classifier run, or load its pruning/pruned_model.pt with pruning.load_pruned and pass the "
            "network to diffusion.frechet.feature_network_from_model"
        )
    state = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not state:
        raise ValueError(
            f"{path} has no weights under {prefix!r}; pass a checkpoint of a train.py classifier run "
            "such as `python train.py experiment=cifar10_resnet20`"
        )

    arguments = cifar_resnet_arguments(state, str(path))
    name = arguments.pop("name")
    net = create_model(name, arguments.pop("in_channels"), arguments.pop("num_classes"), **arguments)
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"the weights in {path} do not fit a standard {name} ({error}). Pass a checkpoint of a "
            "module=classifier run with a CIFAR ResNet"
        ) from None
    logger.info("Loaded the feature network %s from %s", name, path)
    return feature_network_from_model(net, mean, std, name=name.replace("resnet", "ResNet"))


# ---------------------------------------------------------------------------------------
# Reference statistics and their cache


def default_cache_dir() -> Path:
    """Return ``$LEANLIGHT_CACHE``, else ``.cache`` in the project root, as configs/paths/default.yaml does."""
    if os.environ.get("LEANLIGHT_CACHE"):
        return Path(os.environ["LEANLIGHT_CACHE"])
    return Path(os.environ.get("LEANLIGHT_ROOT", ".")) / ".cache"


def images_digest(images: np.ndarray) -> str:
    """Return the SHA-256 of uint8 images and their shape, the identity of a reference data set."""
    digest = hashlib.sha256(f"{images.dtype}:{images.shape};".encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()


def reference_cache_path(cache_dir: Path, data_label: str, key: str) -> Path:
    """Return ``<cache_dir>/frechet-<data label>-<16 hex digits of the key's SHA-256>.npz``."""
    safe_label = re.sub(r"[^A-Za-z0-9._-]", "_", data_label) or "data"
    return cache_dir / f"frechet-{safe_label}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def reference_statistics(
    images: np.ndarray,
    feature_network: FeatureNetwork,
    data_label: str,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> GaussianStatistics:
    """Return the feature statistics of reference images, from the cache when it matches.

    The cache file's key contains the SHA-256 of the uint8 images ``(N, H, W, C)`` and the
    feature network's identity (name, SHA-256 of its weights, mean and std), so other data or
    other weights get a new file and are computed again. The file is written atomically.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = json.dumps(
        {
            "version": REFERENCE_CACHE_VERSION,
            "data": data_label,
            "images": images_digest(images),
            "feature_network": feature_network.name,
            "feature_network_identity": feature_network.identity,
        },
        sort_keys=True,
    )
    path = reference_cache_path(cache_dir, data_label, key)
    cached = read_reference_cache(path, key)
    if cached is not None:
        logger.info("Loaded reference statistics of %s (%d images) from %s", data_label, cached.count, path)
        return cached

    logger.info("Computing %s features of %d reference images of %s", feature_network.name, len(images), data_label)
    statistics = feature_statistics(feature_network.extract_features(images, batch_size, device))
    arrays = {
        "mean": statistics.mean,
        "covariance": statistics.covariance,
        "count": np.array(statistics.count),
        "key": np.array(key),
    }
    try:
        save_arrays(path, arrays)
        logger.info("Cached the reference statistics in %s", path)
    except OSError as error:
        logger.warning("Writing %s failed (%s), so the reference statistics will be computed again", path, error)
    return statistics


def read_reference_cache(path: Path, key: str) -> GaussianStatistics | None:
    """Return the statistics stored in ``path``, or None when it is missing, invalid or written for another key."""
    if not path.exists():
        return None
    try:
        arrays = load_arrays(path)
    except InvalidCacheError as error:
        logger.warning("Reference statistics file %s is invalid (%s), so they are computed again", path, error)
        return None
    if any(name not in arrays for name in ("mean", "covariance", "count", "key")) or str(arrays["key"]) != key:
        return None
    return GaussianStatistics(arrays["mean"], arrays["covariance"], int(arrays["count"]))


def frechet_distance_to_reference(
    images: np.ndarray | torch.Tensor,
    feature_network: FeatureNetwork,
    reference: GaussianStatistics,
    reference_label: str,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> FrechetResult:
    """Compute the Frechet distance of images to reference statistics in ``feature_network``'s feature space."""
    statistics = feature_statistics(feature_network.extract_features(images, batch_size, device))
    return FrechetResult(
        value=frechet_distance(statistics, reference),
        feature_network=feature_network.name,
        num_samples=statistics.count,
        reference=reference_label,
        reference_count=reference.count,
    )


# ---------------------------------------------------------------------------------------
# Inception FID


def resolve_inception_weights(path: str | Path | None = None) -> Path:
    """Return the Inception-v3 weights file from ``path`` or ``$LEANLIGHT_INCEPTION_WEIGHTS``.

    Raises:
        FileNotFoundError: when neither is set or the file does not exist. This function never
            downloads the weights, although torch-fidelity would fetch them from GitHub without a path.
    """
    given = path if path is not None else os.environ.get(INCEPTION_WEIGHTS_ENV)
    if not given:
        raise FileNotFoundError(
            f"Inception FID needs the Inception-v3 weights file {INCEPTION_WEIGHTS_FILE} (torch-fidelity's format), "
            f"and none was given: set metrics.inception_weights=<path> or the environment variable "
            f"{INCEPTION_WEIGHTS_ENV}. leanlight does not download it. {OFFLINE_ALTERNATIVE}"
        )
    weights = Path(given).expanduser()
    if not weights.is_file():
        raise FileNotFoundError(
            f"Inception-v3 weights file {weights} not found (expected torch-fidelity's {INCEPTION_WEIGHTS_FILE}); "
            f"check metrics.inception_weights or {INCEPTION_WEIGHTS_ENV}. {OFFLINE_ALTERNATIVE}"
        )
    return weights


def require_torch_fidelity() -> None:
    """Raise ModuleNotFoundError unless torch-fidelity, which provides torchmetrics' Inception-v3, is installed."""
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError(
            "Inception FID needs torch-fidelity, which provides torchmetrics' Inception-v3: "
            f"pip install torch-fidelity. {OFFLINE_ALTERNATIVE}"
        )


def inception_fid(
    images: np.ndarray | torch.Tensor,
    reference_images: np.ndarray | torch.Tensor,
    reference_label: str,
    weights_path: str | Path | None = None,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
) -> FrechetResult:
    """Compute the FID of images against reference images with torchmetrics' ``FrechetInceptionDistance``.

    Both sets are uint8 ``(N, H, W, C)`` or floats in [-1, 1] ``(N, C, H, W)`` with 3 channels,
    resized by torchmetrics to 299x299. The weights file is checked before torchmetrics is
    called, so a missing file raises instead of starting a download.

    NOTE: torch-fidelity is not installed in leanlight's test environment, so only the errors
    of this function are tested, not an FID computation.
    """
    weights = resolve_inception_weights(weights_path)
    require_torch_fidelity()
    from torchmetrics.image.fid import FrechetInceptionDistance

    # torchmetrics 1.9 accumulates the feature sums and computes the distance in float64, then
    # returns it as float32. set_dtype(float64) is not called, so Inception itself runs in
    # float32, torch-fidelity's default, which is faster on most GPUs.
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights)).to(device)
    generated = to_uint8_nchw(images)
    reference = to_uint8_nchw(reference_images)
    for batch_images, real in ((reference, True), (generated, False)):
        for start in range(0, len(batch_images), batch_size):
            metric.update(batch_images[start : start + batch_size].to(device), real=real)
    return FrechetResult(
        value=float(metric.compute()),
        feature_network="Inception-v3",
        num_samples=len(generated),
        reference=reference_label,
        reference_count=len(reference),
    )


# ---------------------------------------------------------------------------------------
# Reference data from a data module


@dataclass(frozen=True)
class ReferenceData:
    """Uint8 reference images ``(N, H, W, C)``, the data module's normalisation, and a label for names."""

    images: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label: str


def reference_data_from_datamodule(datamodule: Any, split: str = "train") -> ReferenceData:
    """Take the reference images and the training normalisation from a :mod:`lightning_modules.data` module.

    ``split`` is ``"train"`` (all training images, the validation images included) or ``"test"``.
    The mean and std are those the data module normalises its batches with, computed on its
    training split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"reference split must be 'train' or 'test', got {split!r}")
    data = datamodule.load_data()
    images = data.train_images if split == "train" else data.test_images
    return ReferenceData(
        images=images,
        mean=tuple(datamodule.mean),
        std=tuple(datamodule.std),
        label=f"{type(datamodule).__name__} {split}",
    )
