"""Frechet distances: the float64 formula, classifier features, the reference cache and Inception errors."""

import socket
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance

from diffusion import frechet
from diffusion.frechet import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILE,
    GaussianStatistics,
    feature_network_from_model,
    feature_statistics,
    frechet_distance,
    frechet_distance_to_reference,
    frechet_metric_name,
    inception_fid,
    load_feature_network,
    reference_statistics,
)
from lightning_modules.data.errors import DataError
from lightning_modules.training import train
from models import create_model
from tests.conftest import compose_sample_config, compose_train_config

METHODS = ("sqrtm", "eigh")
CIFAR_MEAN = (0.49, 0.48, 0.45)
CIFAR_STD = (0.25, 0.24, 0.26)


def random_images(count: int, seed: int, channels: int = 3, size: int = 32) -> np.ndarray:
    """Return uint8 images ``(count, size, size, channels)``, as sample.py writes them."""
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, channels), dtype=np.uint8)


def normalize_cifar(images: np.ndarray) -> torch.Tensor:
    """Return float32 ``(N, C, H, W)`` images normalised as a data module does with CIFAR_MEAN and CIFAR_STD."""
    scaled = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (scaled - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[:, None, None]


def resnet20_features(seed: int = 0) -> frechet.FeatureNetwork:
    torch.manual_seed(seed)
    return feature_network_from_model(create_model("resnet20", 3, 10), CIFAR_MEAN, CIFAR_STD, name="ResNet20")


def random_covariance(dimension: int, seed: int) -> np.ndarray:
    matrix = np.random.default_rng(seed).normal(size=(dimension, dimension))
    return matrix @ matrix.T / dimension + 0.1 * np.eye(dimension)


# ---------------------------------------------------------------------------------------
# The distance


@pytest.mark.parametrize("method", METHODS)
def test_diagonal_gaussians_match_closed_form(method: str) -> None:
    rng = np.random.default_rng(0)
    mean1, mean2 = rng.normal(size=16), rng.normal(size=16)
    variances1, variances2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    first = GaussianStatistics(mean1, np.diag(variances1), 100)
    second = GaussianStatistics(mean2, np.diag(variances2), 100)

    # With commuting (diagonal) covariances the trace term is sum((sqrt(a) - sqrt(b))^2).
    expected = np.sum((mean1 - mean2) ** 2) + np.sum((np.sqrt(variances1) - np.sqrt(variances2)) ** 2)

    assert frechet_distance(first, second, method) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(second, first, method) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_scaled_covariance_closed_form(method: str) -> None:
    # S2 = c^2 S1 gives Tr((S1 S2)^(1/2)) = c Tr(S1), so the distance is |dmu|^2 + (1 - c)^2 Tr(S1).
    sigma = random_covariance(32, seed=1)
    mean1, mean2 = np.zeros(32), np.full(32, 0.5)
    scale = 1.7
    first = GaussianStatistics(mean1, sigma, 100)
    second = GaussianStatistics(mean2, scale**2 * sigma, 100)

    expected = 32 * 0.25 + (1 - scale) ** 2 * np.trace(sigma)

    assert frechet_distance(first, second, method) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_identical_features_give_zero(method: str) -> None:
    features = np.random.default_rng(2).normal(size=(500, 64)) * 3.0 + 1.0
    statistics = feature_statistics(features)

    assert frechet_distance(statistics, statistics, method) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_shifted_features_give_squared_shift(method: str) -> None:
    features = np.random.default_rng(3).normal(size=(500, 64))
    shift = np.linspace(-1.0, 1.0, 64)

    distance = frechet_distance(feature_statistics(features), feature_statistics(features + shift), method)

    # A shift leaves the covariance unchanged, so only |shift|^2 remains.
    assert distance == pytest.approx(np.sum(shift**2), rel=1e-8)


def test_default_method_without_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    assert frechet.default_sqrtm_method() == "sqrtm"

    # None in sys.modules makes the import raise ImportError, as if SciPy were not installed.
    monkeypatch.setitem(sys.modules, "scipy.linalg", None)

    assert frechet.default_sqrtm_method() == "eigh"


def test_statistics_float64_unbiased_covariance() -> None:
    features = torch.randn(200, 8, dtype=torch.float32)
    statistics = feature_statistics(features)

    assert statistics.mean.dtype == np.float64
    assert statistics.covariance.dtype == np.float64
    assert statistics.count == 200
    np.testing.assert_allclose(statistics.covariance, np.cov(features.double().numpy(), rowvar=False), rtol=1e-12)


def test_feature_statistics_reject_single_sample() -> None:
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 4)))


def test_distance_agrees_with_torchmetrics() -> None:
    network = resnet20_features()
    first, second = random_images(96, seed=4), random_images(96, seed=5) // 2

    # torchmetrics with the same penultimate layer as a custom feature extractor: an independent implementation.
    metric = FrechetInceptionDistance(feature=network.extractor, normalize=True)
    for images, real in ((first, True), (second, False)):
        metric.update(normalize_cifar(images), real=real)
    expected = float(metric.compute())

    ours = frechet_distance(
        feature_statistics(network.extract_features(first)), feature_statistics(network.extract_features(second))
    )

    assert ours == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------------------------
# Features


def test_resnet20_features_are_penultimate_layer() -> None:
    network = resnet20_features()
    net = network.extractor.net
    images = random_images(10, seed=6)

    features = network.extract_features(images)

    with torch.no_grad():
        x = F.relu(net.bn1(net.conv1(normalize_cifar(images))))
        pooled = net.pool(net.layer3(net.layer2(net.layer1(x)))).flatten(1)
    assert features.shape == (10, 64)
    assert features.dtype == np.float64
    np.testing.assert_allclose(features, pooled.double().numpy(), rtol=1e-5, atol=1e-6)


def test_float_and_uint8_images_give_same_features() -> None:
    network = resnet20_features()
    images = random_images(8, seed=7)
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    np.testing.assert_array_equal(network.extract_features(images), network.extract_features(as_float))


def test_features_reject_normalised_floats() -> None:
    network = resnet20_features()
    images = torch.full((4, 3, 32, 32), 2.5)

    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        network.extract_features(images)


def test_features_reject_channel_mismatch() -> None:
    network = resnet20_features()

    with pytest.raises(ValueError, match="3-channel"):
        network.extract_features(random_images(4, seed=8, channels=1))


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train a digits ResNet-20 with train.py for two batches; return its run folder."""
    run_dir = tmp_path_factory.mktemp("classifier")
    overrides = [
        "module=classifier",
        "model=resnet20",
        "logger=none",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "test=false",
    ]
    train(compose_train_config(run_dir / "run", run_dir / "cache", *overrides))
    return run_dir / "run"


def test_load_feature_network_from_run_folder(classifier_run: Path) -> None:
    network = load_feature_network(classifier_run, mean=(0.3,), std=(0.4,))
    stored = torch.load(classifier_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]

    assert network.name == "ResNet20"
    assert network.in_channels == 1
    torch.testing.assert_close(network.extractor.net.conv1.weight, stored["net.conv1.weight"])
    assert network.extract_features(random_images(5, seed=9, channels=1, size=8)).shape == (5, 64)


def test_load_feature_network_infers_architecture(tmp_path: Path) -> None:
    net = create_model("resnet32", 3, 7, shortcut="B", widths=(8, 16, 24))
    checkpoint = tmp_path / "resnet32.ckpt"
    torch.save({"state_dict": {f"net.{key}": value for key, value in net.state_dict().items()}}, checkpoint)

    network = load_feature_network(checkpoint, CIFAR_MEAN, CIFAR_STD)

    assert network.name == "ResNet32"
    assert network.extractor.num_features == 24
    assert network.extractor.net.fc.out_features == 7


def test_load_feature_network_rejects_other_checkpoint(tmp_path: Path) -> None:
    checkpoint = tmp_path / "unet.ckpt"
    torch.save({"state_dict": {"net.down.0.weight": torch.zeros(3)}}, checkpoint)

    with pytest.raises(ValueError, match="not a checkpoint of a CIFAR ResNet"):
        load_feature_network(checkpoint, CIFAR_MEAN, CIFAR_STD)
    with pytest.raises(FileNotFoundError, match="cifar10_resnet20"):
        load_feature_network(tmp_path / "missing.ckpt", CIFAR_MEAN, CIFAR_STD)


def test_feature_network_rejects_pruned(tmp_path: Path) -> None:
    # A pruned ResNet-20: the inner width of the first block is 8, not 16.
    state = create_model("resnet20", 3, 10).state_dict()
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"][:8]
    for name in ("weight", "bias", "running_mean", "running_var"):
        state[f"layer1.0.bn1.{name}"] = state[f"layer1.0.bn1.{name}"][:8]
    state["layer1.0.conv2.weight"] = state["layer1.0.conv2.weight"][:, :8]
    weights = {f"net.{key}": value for key, value in state.items()}
    plain, pruned = tmp_path / "plain.ckpt", tmp_path / "pruned.ckpt"
    torch.save({"state_dict": weights}, plain)
    torch.save({"state_dict": weights, "polarization": {"extracted": True}}, pruned)

    with pytest.raises(ValueError, match="polarization pruning run, whose network is pruned"):
        load_feature_network(pruned, CIFAR_MEAN, CIFAR_STD)
    with pytest.raises(ValueError, match="do not fit a standard resnet20"):
        load_feature_network(plain, CIFAR_MEAN, CIFAR_STD)


# ---------------------------------------------------------------------------------------
# Reference cache


class CountingFeatures:
    """Wrap a feature network's extract_features and count its calls."""

    def __init__(self, network: frechet.FeatureNetwork, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = network.extract_features

        def counted(*args, **kwargs) -> np.ndarray:
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(network, "extract_features", counted)


def test_reference_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    network = resnet20_features()
    counter = CountingFeatures(network, monkeypatch)
    images = random_images(64, seed=10)

    first = reference_statistics(images, network, "random", cache_dir=tmp_path)
    cache_files = list(tmp_path.glob("frechet-random-*.npz"))
    modified = cache_files[0].stat().st_mtime_ns
    second = reference_statistics(images, network, "random", cache_dir=tmp_path)

    assert counter.calls == 1
    assert len(cache_files) == 1
    assert cache_files[0].stat().st_mtime_ns == modified
    assert second.count == 64
    np.testing.assert_array_equal(first.mean, second.mean)
    np.testing.assert_array_equal(first.covariance, second.covariance)


def test_reference_cache_invalidated_by_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    network = resnet20_features()
    counter = CountingFeatures(network, monkeypatch)
    images = random_images(64, seed=11)

    before = reference_statistics(images, network, "random", cache_dir=tmp_path)
    with torch.no_grad():
        network.extractor.net.layer3[2].bn2.weight.mul_(2.0)
    after = reference_statistics(images, network, "random", cache_dir=tmp_path)

    assert counter.calls == 2
    assert len(list(tmp_path.glob("frechet-random-*.npz"))) == 2
    assert not np.allclose(before.mean, after.mean)


def test_reference_cache_invalidated_by_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    network = resnet20_features()
    counter = CountingFeatures(network, monkeypatch)
    images = random_images(64, seed=12)

    reference_statistics(images, network, "random", cache_dir=tmp_path)
    images[0, 0, 0, 0] ^= 1
    reference_statistics(images, network, "random", cache_dir=tmp_path)

    assert counter.calls == 2


def test_reference_cache_uses_leanlight_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEANLIGHT_CACHE", str(tmp_path / "cache"))

    reference_statistics(random_images(16, seed=13), resnet20_features(), "random")

    assert len(list((tmp_path / "cache").glob("frechet-random-*.npz"))) == 1


# ---------------------------------------------------------------------------------------
# Names


def test_result_name_has_network_and_count(tmp_path: Path) -> None:
    network = resnet20_features()
    reference = reference_statistics(random_images(64, seed=14), network, "random", cache_dir=tmp_path)

    result = frechet_distance_to_reference(random_images(40, seed=15), network, reference, "random train")

    assert result.name == "FD-ResNet20 (40 samples)"
    assert result.describe().startswith("FD-ResNet20 (40 samples) = ")
    assert "against random train (64 images)" in result.describe()
    assert result.value > 0


def test_metric_names() -> None:
    assert frechet_metric_name("ResNet20", 10_000) == "FD-ResNet20 (10k samples)"
    assert frechet_metric_name("ResNet20", 1_500) == "FD-ResNet20 (1,500 samples)"
    assert frechet_metric_name("Inception-v3", 50_000) == "FID (Inception-v3, 50k samples)"
    assert "FID" not in frechet_metric_name("ResNet56", 64)


# ---------------------------------------------------------------------------------------
# Inception FID without its weights


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything downloads or opens a socket connection."""

    def fail(*args, **kwargs) -> None:
        raise AssertionError("the network was accessed")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    monkeypatch.setattr(urllib.request, "urlopen", fail)
    monkeypatch.setattr(socket.socket, "connect", fail)


def test_inception_missing_weights_error(no_network: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    images = random_images(4, seed=16)

    with pytest.raises(FileNotFoundError) as raised:
        inception_fid(images, images, "random")

    message = str(raised.value)
    assert INCEPTION_WEIGHTS_FILE in message
    assert INCEPTION_WEIGHTS_ENV in message
    assert "metrics.frechet=resnet20" in message
    assert "experiment=cifar10_resnet20" in message


def test_inception_missing_file_names_path(no_network: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "inception.pth"
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(missing))
    images = random_images(4, seed=17)

    with pytest.raises(FileNotFoundError) as raised:
        inception_fid(images, images, "random")

    assert str(missing) in str(raised.value)
    assert "metrics.frechet=resnet20" in str(raised.value)


# ---------------------------------------------------------------------------------------
# sample.py


@pytest.fixture(scope="module")
def ddpm_digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train a digits DDPM with train.py for two batches; return its run folder."""
    run_dir = tmp_path_factory.mktemp("ddpm")
    overrides = [
        "experiment=ddpm_digits",
        "logger=none",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "test=false",
        "module.sampling.every_n_epochs=0",
    ]
    train(compose_train_config(run_dir / "run", run_dir / "cache", *overrides))
    return run_dir / "run"


def test_sample_script_reports_frechet(ddpm_digits_run: Path, classifier_run: Path, tmp_path: Path) -> None:
    import sample

    cfg = compose_sample_config(
        f"ckpt_path={ddpm_digits_run}",
        f"output_dir={tmp_path / 'samples'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "num_steps=3",
        "num_samples=6",
        "metrics.frechet=resnet20",
        f"metrics.feature_checkpoint={classifier_run}",
        "data@metrics.data=digits",
    )

    report = sample.run_sampling(cfg)

    # The reference is the 1,437 digits left for training and validation after the 20% test hold-out.
    assert report["frechet"].startswith("FD-ResNet20 (6 samples) = ")
    assert report["frechet"].endswith("against DigitsDataModule train (1,437 images)")
    assert "Frechet distance" in sample.format_report(report)
    assert len(list((tmp_path / "cache").glob("frechet-DigitsDataModule_train-*.npz"))) == 1


def test_sample_script_checks_frechet_first(
    ddpm_digits_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sample

    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    common = (f"ckpt_path={ddpm_digits_run}", f"output_dir={tmp_path / 'samples'}")

    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE):
        sample.run_sampling(compose_sample_config(*common, "metrics.frechet=inception"))
    with pytest.raises(ValueError, match="needs metrics.feature_checkpoint"):
        sample.run_sampling(compose_sample_config(*common, "metrics.frechet=resnet20"))
    # Neither error comes after sampling, so no samples were written.
    assert not (tmp_path / "samples").exists()


def test_sample_script_names_reference_data(
    ddpm_digits_run: Path, classifier_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sample

    common = (
        f"ckpt_path={ddpm_digits_run}",
        f"output_dir={tmp_path / 'samples'}",
        "num_steps=1",
        "num_samples=2",
        "metrics.frechet=resnet20",
        f"metrics.feature_checkpoint={classifier_run}",
    )
    missing = compose_sample_config(*common, f"metrics.data.path={tmp_path / 'none.tar.gz'}")
    with pytest.raises(DataError, match="(?s)reference data of the Frechet distance .* data@metrics.data=digits"):
        sample.run_sampling(missing)

    # Digits samples are 8x8 grey; CIFAR-10-shaped reference images would give a meaningless distance.
    reference = frechet.ReferenceData(
        images=np.zeros((4, 32, 32, 3), dtype=np.uint8), mean=(0.5,), std=(0.5,), label="CIFAR-shaped"
    )
    monkeypatch.setattr(sample, "reference_data_from_datamodule", lambda *args, **kwargs: reference)
    with pytest.raises(ValueError, match=r"samples are \(8, 8, 1\) .* are \(32, 32, 3\)"):
        sample.run_sampling(compose_sample_config(*common, "data@metrics.data=digits"))
    # Both errors come before sampling, so no samples were written.
    assert not (tmp_path / "samples").exists()


def test_sample_script_without_frechet(ddpm_digits_run: Path, tmp_path: Path) -> None:
    import sample

    cfg = compose_sample_config(f"ckpt_path={ddpm_digits_run}", f"output_dir={tmp_path / 'samples'}", "num_steps=2")

    report = sample.run_sampling(cfg)

    assert cfg.metrics.frechet is None
    assert "frechet" not in report
    assert "Frechet distance" not in sample.format_report(report)
    assert (tmp_path / "samples" / "samples.npz").is_file()
