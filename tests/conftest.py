"""Shared fixtures: composed Hydra configs that write into a temporary folder."""

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
os.environ["LEANLIGHT_ROOT"] = str(ROOT)
# Tests never reach the network, whatever WANDB_MODE the user's shell sets.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")

# The CIFAR-10 archive the tests read: in data/, as a user places it, else the shared copy
# next to the repository. Both are among data=cifar10's search paths.
CIFAR10_CANDIDATES = (
    ROOT / "data" / "cifar10-jpeg.tar.gz",
    ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz",
)
CIFAR10_ARCHIVE = next((path for path in CIFAR10_CANDIDATES if path.is_file()), CIFAR10_CANDIDATES[-1])

ComposeConfig = Callable[..., DictConfig]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Decoded-data cache shared by the whole test session (LEANLIGHT_CACHE, if set, is reused)."""
    return Path(os.environ.get("LEANLIGHT_CACHE") or tmp_path_factory.mktemp("cache"))


def compose_train_config(output_dir: Path, cache_dir: Path, *overrides: str) -> DictConfig:
    """Compose ``configs/train.yaml`` with ``overrides``, writing into ``output_dir``.

    The config is also set as the current Hydra config, which ``train`` reads for the run folder.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=list(overrides))
    GlobalHydra.instance().clear()
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(Path(output_dir) / "logs")
        cfg.paths.cache_dir = str(cache_dir)
    return cfg


def compose_sample_config(*overrides: str) -> DictConfig:
    """Compose ``configs/sample.yaml`` with ``overrides``; pass ``output_dir`` so no Hydra run folder is needed."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="sample", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def compose_config(tmp_path: Path, cache_dir: Path) -> ComposeConfig:
    """Return a function that composes ``configs/train.yaml`` with overrides, writing into ``tmp_path``."""

    def compose_with(*overrides: str) -> DictConfig:
        return compose_train_config(tmp_path, cache_dir, *overrides)

    return compose_with
