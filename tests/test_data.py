"""Tests of the LightningDataModules in lightning_modules.data.

Most tests build tiny image folders and tar archives with Pillow in ``tmp_path``. One test
reads the real CIFAR-10 archive when it exists and is skipped otherwise.
"""

import itertools
import logging
import math
import multiprocessing
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lightning_modules.data.cache as cache_module
import lightning_modules.data.decode as decode_module
from lightning_modules.data import CIFAR10DataModule, DataError, DigitsDataModule, ImageFolderDataModule
from lightning_modules.data.cifar10 import inspect_candidate, load_torchvision_cifar10
from lightning_modules.data.transforms import BatchTransform, random_crop, random_horizontal_flip

REAL_CIFAR10 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10-jpeg.tar.gz"

CHANNELS_BY_MODE = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def write_image(path: Path, mode: str, size: tuple[int, int], seed: int) -> np.ndarray:
    """Write a random image of ``size`` (height, width) and return its pixels ``(H, W, C)``."""
    height, width = size
    channels = CHANNELS_BY_MODE[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode).save(path)
    return pixels


def make_tree(
    root: Path,
    classes: dict[str, int],
    splits: tuple[str, ...] = ("train", "test"),
    mode: str = "RGB",
    size: tuple[int, int] = (6, 5),
    extension: str = ".png",
) -> Path:
    """Write ``classes[name]`` random images per class and split below ``root``."""
    seed = 0
    for split in splits:
        for class_name, count in classes.items():
            for index in range(count):
                seed += 1
                write_image(root / split / class_name / f"{index:03d}{extension}", mode, size, seed)
    return root


def make_archive(source: Path, archive: Path, top_folder: str | None = None) -> Path:
    """Pack the contents of ``source`` into a .tar.gz, under ``top_folder`` if given."""
    with tarfile.open(archive, "w:gz") as tar:
        for child in sorted(source.iterdir()):
            name = f"{top_folder}/{child.name}" if top_folder else child.name
            tar.add(child, arcname=name)
    return archive


def folder_module(path: Path, cache_dir: Path, **options) -> ImageFolderDataModule:
    """Build an ImageFolderDataModule with small defaults for the tiny test data."""
    options = {"batch_size": 4, "val_size": 0, **options}
    return ImageFolderDataModule(str(path), cache_dir=str(cache_dir), **options)


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate all batches of a DataLoader."""
    batches = list(loader)
    return torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches])


def denormalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Invert the normalisation of float32 images ``(B, C, H, W)`` back to uint8."""
    mean_tensor = torch.tensor(mean)[:, None, None]
    std_tensor = torch.tensor(std)[:, None, None]
    return ((images * std_tensor + mean_tensor) * 255).round().clamp(0, 255).to(torch.uint8)


def crop_and_flip_candidates(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """All crops after zero padding and their mirror images, for one image ``(C, H, W)``."""
    _, height, width = image.shape
    padded = torch.nn.functional.pad(image, (padding, padding, padding, padding))
    crops = [
        padded[:, top : top + height, left : left + width]
        for top, left in itertools.product(range(2 * padding + 1), repeat=2)
    ]
    return crops + [crop.flip(-1) for crop in crops]


# Batches and properties


def test_batch_shapes_and_dtypes(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 4, "dog": 4})
    module = folder_module(tree, tmp_path / "cache")
    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (4, 3, 6, 5)
    assert images.dtype == torch.float32
    assert labels.shape == (4,)
    assert labels.dtype == torch.int64
    assert torch.isfinite(images).all()
    assert labels.min() >= 0
    assert labels.max() < 2


def test_batches_normalised_with_train_stats(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 4, "dog": 4})
    module = folder_module(tree, tmp_path / "cache")
    stored = module.splits().test
    mean = torch.tensor(module.mean)[:, None, None]
    std = torch.tensor(module.std)[:, None, None]
    expected = (torch.from_numpy(stored.images).permute(0, 3, 1, 2) / 255 - mean) / std
    images, labels = collect(module.test_dataloader())
    assert torch.allclose(images, expected, atol=1e-5)
    assert torch.equal(labels, torch.from_numpy(stored.labels))


def test_mean_std_from_train_split(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 4, "dog": 4})
    module = folder_module(tree, tmp_path / "cache")
    pixels = module.splits().train.images.reshape(-1, 3).astype(np.float64) / 255
    assert np.allclose(module.mean, pixels.mean(axis=0))
    assert np.allclose(module.std, pixels.std(axis=0))


def test_properties(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 5, "dog": 5}, size=(7, 9))
    module = folder_module(tree, tmp_path / "cache", val_size=2)
    assert module.image_size == (7, 9)
    assert module.in_channels == 3
    assert module.num_train_samples == 8
    assert module.num_val_samples == 2
    assert module.num_test_samples == 10


def test_loader_options(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 3, "dog": 3})
    module = folder_module(tree, tmp_path / "cache", batch_size=4, val_size=2)
    train_loader = module.train_dataloader()
    val_loader = module.val_dataloader()
    assert isinstance(train_loader.sampler, torch.utils.data.RandomSampler)
    assert train_loader.drop_last is False
    assert len(train_loader) == 1
    assert isinstance(val_loader.sampler, torch.utils.data.SequentialSampler)
    assert isinstance(module.test_dataloader().sampler, torch.utils.data.SequentialSampler)


def test_worker_processes(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 3, "dog": 3})
    module = folder_module(tree, tmp_path / "cache", num_workers=1, crop_padding=1, horizontal_flip=True)
    loader = module.train_dataloader()
    images, _ = collect(loader)
    assert loader.persistent_workers is True
    assert images.shape == (6, 3, 6, 5)


def test_classes_from_folder_names(tmp_path):
    tree = make_tree(tmp_path / "data", {"dog": 2, "bird": 2, "cat": 2})
    module = folder_module(tree, tmp_path / "cache")
    assert module.class_names == ["bird", "cat", "dog"]
    assert module.num_classes == 3
    assert module.splits().train.labels.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("LA", 2), ("RGB", 3), ("RGBA", 4)])
def test_in_channels_from_mode(tmp_path, mode, channels):
    tree = make_tree(tmp_path / "data", {"a": 2, "b": 2}, mode=mode)
    module = folder_module(tree, tmp_path / "cache")
    images, _ = next(iter(module.train_dataloader()))
    assert module.in_channels == channels
    assert images.shape[1] == channels


def test_grey_pixels_kept(tmp_path):
    pixels = write_image(tmp_path / "data" / "train" / "a" / "0.png", "L", (4, 4), seed=1)
    write_image(tmp_path / "data" / "train" / "b" / "0.png", "L", (4, 4), seed=2)
    write_image(tmp_path / "data" / "test" / "a" / "0.png", "L", (4, 4), seed=3)
    module = folder_module(tmp_path / "data", tmp_path / "cache")
    assert np.array_equal(module.splits().train.images[0], pixels)


def test_channels_option_converts(tmp_path):
    tree = make_tree(tmp_path / "data", {"a": 2, "b": 2}, mode="L")
    module = folder_module(tree, tmp_path / "cache", channels=3)
    assert module.in_channels == 3


def test_mixed_modes_converted_to_first(tmp_path, caplog):
    write_image(tmp_path / "data" / "train" / "a" / "0.png", "RGB", (4, 4), seed=1)
    write_image(tmp_path / "data" / "train" / "b" / "0.png", "L", (4, 4), seed=2)
    write_image(tmp_path / "data" / "test" / "a" / "0.png", "RGBA", (4, 4), seed=3)
    with caplog.at_level(logging.WARNING):
        module = folder_module(tmp_path / "data", tmp_path / "cache")
        assert module.in_channels == 3
    assert "data.channels" in caplog.text


def test_jpeg_images(tmp_path):
    tree = make_tree(tmp_path / "data", {"a": 2, "b": 2}, extension=".jpg", size=(8, 8))
    module = folder_module(tree, tmp_path / "cache")
    assert module.image_size == (8, 8)
    assert module.num_train_samples == 4


def test_resize_with_image_size(tmp_path):
    write_image(tmp_path / "data" / "train" / "a" / "0.png", "RGB", (10, 12), seed=1)
    write_image(tmp_path / "data" / "train" / "b" / "0.png", "RGB", (5, 7), seed=2)
    write_image(tmp_path / "data" / "test" / "a" / "0.png", "RGB", (8, 6), seed=3)
    module = folder_module(tmp_path / "data", tmp_path / "cache", image_size=[8, 6])
    images, _ = next(iter(module.train_dataloader()))
    assert module.image_size == (8, 6)
    assert images.shape == (2, 3, 8, 6)


def test_size_mismatch_error(tmp_path):
    write_image(tmp_path / "data" / "train" / "a" / "0.png", "RGB", (6, 6), seed=1)
    write_image(tmp_path / "data" / "train" / "b" / "0.png", "RGB", (6, 8), seed=2)
    module = folder_module(tmp_path / "data", tmp_path / "cache")
    with pytest.raises(DataError) as error:
        module.setup()
    message = str(error.value)
    assert str(tmp_path / "data" / "train" / "b" / "0.png") in message
    assert "6x8" in message
    assert "6x6" in message
    assert "data.image_size=[H,W]" in message


# Layouts and archives


def test_archive_matches_folder(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 3, "dog": 3})
    archive = make_archive(tree, tmp_path / "data.tar.gz", top_folder="mydata")
    from_folder = folder_module(tree, tmp_path / "cache").splits()
    from_archive = folder_module(archive, tmp_path / "cache").splits()
    assert np.array_equal(from_archive.train.images, from_folder.train.images)
    assert np.array_equal(from_archive.train.labels, from_folder.train.labels)
    assert np.array_equal(from_archive.test.images, from_folder.test.images)
    assert from_archive.class_names == ["cat", "dog"]


def test_archive_member_order_ignored(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 3, "dog": 3})
    archive = tmp_path / "reversed.tar"
    with tarfile.open(archive, "w") as tar:
        for file in sorted(tree.rglob("*.png"), reverse=True):
            tar.add(file, arcname=file.relative_to(tree).as_posix())
    from_folder = folder_module(tree, tmp_path / "cache").splits()
    from_archive = folder_module(archive, tmp_path / "cache").splits()
    assert from_archive.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(from_archive.train.images, from_folder.train.images)
    assert np.array_equal(from_archive.test.images, from_folder.test.images)


def test_plain_tar_without_top_folder(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    archive = tmp_path / "data.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tree / "train", arcname="train")
        tar.add(tree / "test", arcname="test")
    module = folder_module(archive, tmp_path / "cache")
    assert module.num_train_samples == 4
    assert module.num_test_samples == 4


def test_folder_with_one_top_folder(tmp_path):
    make_tree(tmp_path / "outer" / "cifar10", {"cat": 2, "dog": 2})
    module = folder_module(tmp_path / "outer", tmp_path / "cache")
    assert module.class_names == ["cat", "dog"]


def test_non_images_skipped(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    (tree / "README.md").write_text("not an image")
    (tree / "train" / "labels.csv").write_text("not an image")
    (tree / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    module = folder_module(tree, tmp_path / "cache")
    assert module.num_train_samples == 4


def test_no_test_folder_holds_out(tmp_path, caplog):
    tree = make_tree(tmp_path / "data", {"cat": 5, "dog": 5}, splits=("train",))
    with caplog.at_level(logging.WARNING):
        module = folder_module(tree, tmp_path / "cache", test_size=0.2)
        assert module.num_test_samples == 2
    assert module.num_train_samples == 8
    assert "no test/<class>/ images" in caplog.text
    assert sorted(module.splits().test.labels.tolist()) == [0, 1]


def test_missing_train_folder_error(tmp_path):
    write_image(tmp_path / "data" / "cat" / "0.png", "RGB", (4, 4), seed=1)
    module = folder_module(tmp_path / "data", tmp_path / "cache")
    with pytest.raises(DataError, match=r"train/<class>/<image>"):
        module.setup()


def test_archive_without_train_error(tmp_path):
    make_tree(tmp_path / "data", {"cat": 2}, splits=("test",))
    archive = make_archive(tmp_path / "data", tmp_path / "data.tar.gz")
    module = folder_module(archive, tmp_path / "cache")
    with pytest.raises(DataError, match=r"no training images"):
        module.setup()


def test_test_class_not_in_train_error(tmp_path):
    make_tree(tmp_path / "data", {"cat": 2, "dog": 2}, splits=("train",))
    make_tree(tmp_path / "data", {"cat": 1, "emu": 1, "yak": 1}, splits=("test",))
    module = folder_module(tmp_path / "data", tmp_path / "cache")
    with pytest.raises(DataError, match=r"test classes without training images: emu, yak"):
        module.setup()


def test_corrupt_image_in_archive(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    (tree / "train" / "dog" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    archive = make_archive(tree, tmp_path / "broken.tar.gz", top_folder="top")
    module = folder_module(archive, tmp_path / "cache")
    with pytest.raises(DataError) as error:
        module.setup()
    message = str(error.value)
    assert "top/train/dog/001.png" in message
    assert str(archive) in message
    assert "UnidentifiedImageError" in message


def test_corrupt_image_in_folder(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 2, "dog": 2}, extension=".jpg", size=(8, 8))
    broken = tree / "test" / "cat" / "000.jpg"
    broken.write_bytes(broken.read_bytes()[:40])
    module = folder_module(tree, tmp_path / "cache")
    with pytest.raises(DataError, match=f"Decoding {broken} failed"):
        module.setup()


def test_truncated_archive_error(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 20, "dog": 20}, size=(32, 32))
    archive = make_archive(tree, tmp_path / "data.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    module = folder_module(archive, tmp_path / "cache")
    with pytest.raises(DataError, match=r"damaged or truncated"):
        module.setup()


def test_missing_folder_error(tmp_path):
    module = folder_module(tmp_path / "nowhere", tmp_path / "cache")
    with pytest.raises(DataError, match=r"nowhere not found"):
        module.setup()


# Options


@pytest.mark.parametrize("batch_size", [0, -1])
def test_non_positive_batch_size(tmp_path, batch_size):
    with pytest.raises(DataError, match=rf"batch_size={batch_size} is invalid"):
        DigitsDataModule(batch_size=batch_size)


@pytest.mark.parametrize("val_size", [-1, 1.5, "0.1"])
def test_invalid_val_size(val_size):
    with pytest.raises(DataError, match=r"val_size="):
        DigitsDataModule(val_size=val_size)


def test_val_size_too_large(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    module = folder_module(tree, tmp_path / "cache", val_size=4)
    with pytest.raises(DataError, match=r"val_size=4 selects 4 of the 4 images"):
        module.setup()


def test_train_subset_too_large(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 3, "dog": 3})
    module = folder_module(tree, tmp_path / "cache", val_size=2, train_subset=5)
    with pytest.raises(DataError, match=r"train_subset=5 is larger than the 4 training images"):
        module.setup()


@pytest.mark.parametrize("train_subset", [0, -3])
def test_non_positive_train_subset(train_subset):
    with pytest.raises(DataError, match=rf"train_subset={train_subset} is invalid"):
        DigitsDataModule(train_subset=train_subset)


def test_invalid_image_size(tmp_path):
    with pytest.raises(DataError, match=r"data.image_size=\[32,32\]"):
        folder_module(tmp_path, tmp_path / "cache", image_size=[32])


def test_invalid_channels(tmp_path):
    with pytest.raises(DataError, match=r"channels=5 is invalid"):
        folder_module(tmp_path, tmp_path / "cache", channels=5)


# Splits


def image_keys(images: np.ndarray) -> set[bytes]:
    """Return the raw bytes of each image, to compare sets of unique random images."""
    return {image.tobytes() for image in images}


def test_val_split_deterministic(tmp_path):
    tree = make_tree(tmp_path / "data", {"a": 10, "b": 10, "c": 10})
    first = folder_module(tree, tmp_path / "cache", val_size=0.2, split_seed=3).splits()
    second = folder_module(tree, tmp_path / "cache", val_size=0.2, split_seed=3).splits()
    other_seed = folder_module(tree, tmp_path / "cache", val_size=0.2, split_seed=4).splits()
    assert np.array_equal(first.val.images, second.val.images)
    assert np.array_equal(first.train.images, second.train.images)
    assert image_keys(first.val.images) != image_keys(other_seed.val.images)


def test_val_split_disjoint(tmp_path):
    tree = make_tree(tmp_path / "data", {"a": 10, "b": 10, "c": 10})
    splits = folder_module(tree, tmp_path / "cache", val_size=0.2).splits()
    train_keys = image_keys(splits.train.images)
    val_keys = image_keys(splits.val.images)
    assert len(val_keys) == 6
    assert len(train_keys) == 24
    assert not train_keys & val_keys


def test_val_split_stratified(tmp_path):
    tree = make_tree(tmp_path / "data", {"a": 10, "b": 20, "c": 30})
    splits = folder_module(tree, tmp_path / "cache", val_size=12).splits()
    assert np.bincount(splits.val.labels).tolist() == [2, 4, 6]


def test_train_subset_stratified(tmp_path):
    tree = make_tree(tmp_path / "data", {"a": 10, "b": 20, "c": 30})
    full = folder_module(tree, tmp_path / "cache", val_size=12).splits()
    subset = folder_module(tree, tmp_path / "cache", val_size=12, train_subset=12).splits()
    assert len(subset.train) == 12
    assert np.bincount(subset.train.labels).tolist() == [2, 4, 6]
    assert image_keys(subset.train.images) <= image_keys(full.train.images)
    assert np.array_equal(subset.val.images, full.val.images)


def test_train_subset_uneven_classes(tmp_path):
    tree = make_tree(tmp_path / "data", {"a": 3, "b": 3, "c": 3})
    splits = folder_module(tree, tmp_path / "cache", train_subset=4).splits()
    assert len(splits.train) == 4
    assert sorted(np.bincount(splits.train.labels, minlength=3).tolist()) == [1, 1, 2]


# Cache


def count_decodes(monkeypatch) -> list[str]:
    """Patch the image decoder to record the location of every decoded image."""
    decoded = []
    original = decode_module.decode_image

    def counting_decode(data, location):
        decoded.append(location)
        return original(data, location)

    monkeypatch.setattr(decode_module, "decode_image", counting_decode)
    return decoded


def test_cache_written_once(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    archive = make_archive(tree, tmp_path / "data.tar.gz")
    decoded = count_decodes(monkeypatch)
    first = folder_module(archive, tmp_path / "cache").splits()
    cache_files = list((tmp_path / "cache").glob("*.npz"))
    modified = cache_files[0].stat().st_mtime_ns
    assert len(decoded) == 8
    assert len(cache_files) == 1

    second = folder_module(archive, tmp_path / "cache").splits()
    assert len(decoded) == 8
    assert cache_files[0].stat().st_mtime_ns == modified
    assert np.array_equal(second.train.images, first.train.images)
    assert second.class_names == first.class_names


def test_cache_file_uncompressed(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    folder_module(tree, tmp_path / "cache").setup()
    (cache_file,) = (tmp_path / "cache").glob("*.npz")
    with np.load(cache_file) as arrays:
        assert arrays["train_images"].dtype == np.uint8
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_cache_key_includes_options(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    decoded = count_decodes(monkeypatch)
    folder_module(tree, tmp_path / "cache").setup()
    folder_module(tree, tmp_path / "cache", channels=1).setup()
    assert len(decoded) == 16
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_cache_key_includes_source_state(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    decoded = count_decodes(monkeypatch)
    folder_module(tree, tmp_path / "cache").setup()
    write_image(tree / "train" / "cat" / "new.png", "RGB", (6, 5), seed=99)
    module = folder_module(tree, tmp_path / "cache")
    assert module.num_train_samples == 5
    assert len(decoded) == 17


def test_corrupt_cache_rebuilt(tmp_path, monkeypatch, caplog):
    tree = make_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    first = folder_module(tree, tmp_path / "cache").splits()
    (cache_file,) = (tmp_path / "cache").glob("*.npz")
    cache_file.write_bytes(cache_file.read_bytes()[:100])

    decoded = count_decodes(monkeypatch)
    with caplog.at_level(logging.WARNING):
        rebuilt = folder_module(tree, tmp_path / "cache").splits()
    assert "is invalid" in caplog.text
    assert len(decoded) == 8
    assert np.array_equal(rebuilt.train.images, first.train.images)

    folder_module(tree, tmp_path / "cache").setup()
    assert len(decoded) == 8


def test_concurrent_loads_decode_once(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    archive = make_archive(tree, tmp_path / "data.tar.gz")
    decode_log = tmp_path / "decodes.txt"
    original = cache_module.decode_image_folder

    def slow_logged_decode(*args):
        # The delay keeps the lock held until the other process is waiting for it.
        time.sleep(0.5)
        with decode_log.open("a") as log:
            log.write(f"{os.getpid()}\n")
        return original(*args)

    monkeypatch.setattr(cache_module, "decode_image_folder", slow_logged_decode)
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=cache_module.load_image_folder, args=(archive, tmp_path / "cache")) for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0]
    assert len(decode_log.read_text().splitlines()) == 1
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1


def test_unwritable_cache_still_loads(tmp_path, caplog):
    tree = make_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING):
        module = folder_module(tree, blocker)
        assert module.num_train_samples == 4
    assert "Writing cache file" in caplog.text


# Augmentation


def test_augmentation_leaves_eval_untouched(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 4, "dog": 4}, size=(8, 8))
    module = folder_module(tree, tmp_path / "cache", val_size=2, crop_padding=2, horizontal_flip=True)
    splits = module.splits()
    for loader, dataset in ((module.val_dataloader(), splits.val), (module.test_dataloader(), splits.test)):
        for _ in range(2):
            images, _ = collect(loader)
            stored = torch.from_numpy(dataset.images).permute(0, 3, 1, 2)
            assert torch.equal(denormalize(images, module.mean, module.std), stored)


def test_train_augmentation_only_crops_and_flips(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 4, "dog": 4}, size=(6, 6))
    padding = 2
    module = folder_module(tree, tmp_path / "cache", batch_size=3, crop_padding=padding, horizontal_flip=True)
    originals = torch.from_numpy(module.splits().train.images).permute(0, 3, 1, 2)
    candidates = {
        candidate.numpy().tobytes() for image in originals for candidate in crop_and_flip_candidates(image, padding)
    }

    torch.manual_seed(0)
    epochs = [denormalize(collect(module.train_dataloader())[0], module.mean, module.std) for _ in range(2)]
    epoch_keys = [{image.numpy().tobytes() for image in epoch} for epoch in epochs]
    for epoch in epochs:
        assert all(image.numpy().tobytes() in candidates for image in epoch)
    assert epoch_keys[0] != epoch_keys[1]
    assert epoch_keys[0] != {image.numpy().tobytes() for image in originals}


def test_train_without_augmentation_unchanged(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 4, "dog": 4})
    module = folder_module(tree, tmp_path / "cache")
    images, _ = collect(module.train_dataloader())
    stored = {image.tobytes() for image in torch.from_numpy(module.splits().train.images).permute(0, 3, 1, 2).numpy()}
    restored = {image.numpy().tobytes() for image in denormalize(images, module.mean, module.std)}
    assert restored == stored


def test_random_crop_offsets():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).reshape(2, 1, 4, 4) + 1
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        cropped = random_crop(images, 1, generator)
        assert cropped.shape == images.shape
        assert cropped.dtype == torch.uint8
        for image, original in zip(cropped, images, strict=True):
            candidates = crop_and_flip_candidates(original, 1)[:9]
            assert any(torch.equal(image, candidate) for candidate in candidates)


def test_random_crop_covers_all_offsets():
    images = torch.arange(1, 10, dtype=torch.uint8).reshape(1, 1, 3, 3).repeat(200, 1, 1, 1)
    cropped = random_crop(images, 1, torch.Generator().manual_seed(0))
    assert len({image.numpy().tobytes() for image in cropped}) == 9


def test_random_flip_mirrors_some():
    images = torch.arange(12, dtype=torch.uint8).reshape(1, 1, 3, 4).repeat(64, 1, 1, 1)
    flipped = random_horizontal_flip(images, torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.equal(image, images[0].flip(-1)) for image in flipped])
    unchanged = torch.tensor([torch.equal(image, images[0]) for image in flipped])
    assert (mirrored | unchanged).all()
    assert 0 < mirrored.sum() < 64


def test_batch_transform_accepts_sample_list():
    transform = BatchTransform((0.5,), (0.25,))
    samples = [(torch.full((1, 2, 2), 255, dtype=torch.uint8), 1), (torch.zeros(1, 2, 2, dtype=torch.uint8), 0)]
    images, labels = transform(samples)
    assert torch.allclose(images[0], torch.full((1, 2, 2), 2.0))
    assert torch.allclose(images[1], torch.full((1, 2, 2), -2.0))
    assert labels.tolist() == [1, 0]
    assert labels.dtype == torch.int64


# Digits


def test_digits_sizes():
    module = DigitsDataModule(batch_size=64)
    total = module.num_train_samples + module.num_val_samples + module.num_test_samples
    assert total == 1797
    assert module.num_test_samples == math.ceil(0.2 * 1797)
    assert module.num_val_samples == math.ceil(0.1 * (1797 - 360))
    assert module.num_classes == 10
    assert module.in_channels == 1
    assert module.image_size == (8, 8)
    assert module.class_names == [str(digit) for digit in range(10)]


def test_digits_pixel_range():
    splits = DigitsDataModule(batch_size=64).splits()
    assert splits.train.images.dtype == np.uint8
    assert splits.train.images.max() == 255
    assert splits.train.images.min() == 0


def test_digits_normalised():
    module = DigitsDataModule(batch_size=256)
    images, _ = collect(module.train_dataloader())
    assert abs(images.mean().item()) < 1e-4
    assert abs(images.std().item() - 1) < 1e-3


def test_digits_test_split_fixed():
    first = DigitsDataModule(batch_size=64, split_seed=1).splits()
    second = DigitsDataModule(batch_size=64, split_seed=2).splits()
    assert np.array_equal(first.test.images, second.test.images)
    assert not np.array_equal(first.val.images, second.val.images)


# CIFAR-10


def make_fake_cifar10(root: Path) -> Path:
    """Write a CIFAR-10-shaped image folder: 10 classes of 32x32 RGB, 3 train and 1 test image each."""
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for class_index, class_name in enumerate(classes):
        for index in range(3):
            write_image(root / "train" / class_name / f"{index}.jpg", "RGB", (32, 32), seed=10 * class_index + index)
        write_image(root / "test" / class_name / "0.jpg", "RGB", (32, 32), seed=10 * class_index + 9)
    return root


def test_cifar10_found_in_search_paths(tmp_path):
    make_fake_cifar10(tmp_path / "fake" / "cifar10")
    searched = tmp_path / "searched"
    searched.mkdir()
    make_archive(tmp_path / "fake", searched / "cifar10-jpeg.tar.gz")

    module = CIFAR10DataModule(
        search_paths=[str(tmp_path / "missing"), str(searched)],
        data_dir=str(tmp_path / "data"),
        batch_size=8,
        val_size=10,
        cache_dir=str(tmp_path / "cache"),
    )
    images, labels = next(iter(module.train_dataloader()))
    assert module.num_train_samples == 20
    assert module.num_val_samples == 10
    assert module.num_test_samples == 10
    assert module.class_names[0] == "airplane"
    assert images.shape == (8, 3, 32, 32)
    assert labels.shape == (8,)


def test_cifar10_downsample_averages_blocks(tmp_path):
    make_fake_cifar10(tmp_path / "fake")
    full = CIFAR10DataModule(path=str(tmp_path / "fake"), val_size=10, cache_dir=str(tmp_path / "cache"))
    half = CIFAR10DataModule(
        path=str(tmp_path / "fake"), val_size=10, cache_dir=str(tmp_path / "cache"), downsample_factor=2
    )
    full_images = full.load_data().test_images.astype(np.float64)
    half_images = half.load_data().test_images

    assert half.image_size == (16, 16)
    assert half_images.dtype == np.uint8
    block_means = full_images.reshape(-1, 16, 2, 16, 2, 3).mean(axis=(2, 4))
    assert np.abs(half_images - block_means).max() <= 0.5


@pytest.mark.parametrize("factor", [0, 3, 2.0, True])
def test_cifar10_downsample_factor_validated(tmp_path, factor):
    with pytest.raises(DataError, match="downsample_factor"):
        CIFAR10DataModule(path=str(tmp_path), downsample_factor=factor)


def test_cifar10_missing_error_names_paths(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    not_archive = tmp_path / "notes.txt"
    not_archive.write_text("not a tar archive")
    module = CIFAR10DataModule(
        search_paths=[str(tmp_path / "missing"), str(empty), str(not_archive)],
        data_dir=str(tmp_path / "data"),
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(DataError) as error:
        module.setup()
    message = str(error.value)
    assert f"{tmp_path / 'missing'} (does not exist)" in message
    assert f"{empty} (contains no cifar-10-batches-py/" in message
    assert f"{not_archive} (is not a tar archive)" in message
    assert f"{tmp_path / 'data'} (does not exist)" in message
    assert "data.path=/path/to/cifar10-jpeg.tar.gz" in message
    assert "data.download=true" in message


def test_cifar10_explicit_path_only(tmp_path):
    make_fake_cifar10(tmp_path / "fake")
    module = CIFAR10DataModule(
        path=str(tmp_path / "missing"), search_paths=[str(tmp_path / "fake")], cache_dir=str(tmp_path / "cache")
    )
    with pytest.raises(DataError) as error:
        module.setup()
    assert str(tmp_path / "missing") in str(error.value)
    assert str(tmp_path / "fake") not in str(error.value)


def test_cifar10_rejects_other_data(tmp_path):
    tree = make_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    module = CIFAR10DataModule(path=str(tree), val_size=1, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"is not CIFAR-10: it has 2 classes .* data=imagefolder"):
        module.setup()


def test_torchvision_root_detected(tmp_path):
    (tmp_path / "root" / "cifar-10-batches-py").mkdir(parents=True)
    source = inspect_candidate(tmp_path / "root")
    assert source.kind == "torchvision"
    assert source.path == tmp_path / "root"


def test_torchvision_root_corrupt_error(tmp_path):
    (tmp_path / "root" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(DataError, match=r"torchvision could not read CIFAR-10"):
        load_torchvision_cifar10(tmp_path / "root", download=False)


@pytest.fixture(scope="session")
def cifar10_cache_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session cache folder: the project's ``cache_dir`` fixture if a conftest defines it.

    Sharing that folder lets other tests reuse the decoded archive. Without it, the folder
    is LEANLIGHT_CACHE if set, else a new temporary folder.
    """
    try:
        return Path(request.getfixturevalue("cache_dir"))
    except pytest.FixtureLookupError:
        return Path(os.environ.get("LEANLIGHT_CACHE") or tmp_path_factory.mktemp("cifar10_cache"))


@pytest.mark.skipif(not REAL_CIFAR10.is_file(), reason=f"real CIFAR-10 archive not found at {REAL_CIFAR10}")
def test_real_cifar10_archive(cifar10_cache_dir):
    module = CIFAR10DataModule(path=str(REAL_CIFAR10), batch_size=256, cache_dir=str(cifar10_cache_dir))
    images, labels = next(iter(module.train_dataloader()))
    assert module.num_train_samples == 45_000
    assert module.num_val_samples == 5_000
    assert module.num_test_samples == 10_000
    assert module.num_classes == 10
    assert module.in_channels == 3
    assert module.image_size == (32, 32)
    assert images.shape == (256, 3, 32, 32)
    assert np.bincount(module.splits().val.labels).tolist() == [500] * 10


def test_evaluation_batches_mix_classes() -> None:
    datamodule = DigitsDataModule(batch_size=32)
    for loader in (datamodule.val_dataloader(), datamodule.test_dataloader()):
        _, labels = next(iter(loader))
        assert len(labels.unique()) >= 5
