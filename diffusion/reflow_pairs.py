"""Reflow pairs ``(z0, x1 = teacher(z0))`` written in resumable shards, and a Dataset over them.

Each shard ``shard_00000.pt`` contains ``z0`` and ``x1`` (float32 ``(n, C, H, W)``), its index and
the seed of the CPU generator that drew its noise, derived from ``(base_seed, index)``
by :func:`shard_seed`. The same base seed and teacher give the same pairs, up to the
floating-point rounding of the device.
A shard is written to a temporary file and renamed, so a killed job leaves only complete
shards, and :func:`generate_reflow_pairs` skips the shards that are already there.
"""

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_modules.seeds import SHARD_STREAM, derive_seed

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard_{:05d}.pt"
MANIFEST_FILE = "pairs.json"

# Maps noise z0 (n, C, H, W) to the teacher's end point x1 of the same shape.
TeacherMap = Callable[[torch.Tensor], torch.Tensor]


def shard_seed(base_seed: int, index: int) -> int:
    """Return the seed of shard ``index``'s noise generator, unrelated to the seeds of other ``(base_seed, index)``."""
    return derive_seed(SHARD_STREAM, base_seed, index)


def shard_sizes(num_pairs: int, shard_size: int) -> list[int]:
    """Return the number of pairs in each shard: full shards, then the remainder."""
    if num_pairs < 1 or shard_size < 1:
        raise ValueError(f"num_pairs and shard_size must be >= 1, got {num_pairs} and {shard_size}")
    sizes = [shard_size] * (num_pairs // shard_size)
    if num_pairs % shard_size:
        sizes.append(num_pairs % shard_size)
    return sizes


def read_shard(path: Path) -> dict[str, Any]:
    """Load a shard with ``torch.load(weights_only=True)`` and return its entries."""
    return torch.load(path, map_location="cpu", weights_only=True)


def is_complete_shard(path: Path, expected_count: int, expected_seed: int, image_shape: Sequence[int]) -> bool:
    """Return whether ``path`` is a readable shard with the expected pair count, seed and image shape."""
    if not path.is_file():
        return False
    try:
        shard = read_shard(path)
    # A truncated or foreign file raises one of many unpickling errors, so any of them marks the shard bad.
    except Exception as error:
        log.warning("reflow shard %s is unreadable (%s), so it is generated again", path, error)
        return False
    expected_shape = (expected_count, *image_shape)
    return (
        int(shard.get("seed", -1)) == expected_seed
        and tuple(shard["z0"].shape) == expected_shape
        and tuple(shard["x1"].shape) == expected_shape
    )


def write_shard_atomically(path: Path, shard: dict[str, Any]) -> None:
    """Save ``shard`` to a temporary file beside ``path`` and rename it to ``path``."""
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(shard, temporary)
    os.replace(temporary, path)


def generate_reflow_pairs(
    teacher: TeacherMap,
    folder: str | Path,
    num_pairs: int,
    shard_size: int,
    image_shape: Sequence[int],
    base_seed: int = 0,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    description: dict[str, Any] | None = None,
) -> list[Path]:
    """Write ``num_pairs`` pairs ``(z0, teacher(z0))`` in shards to ``folder``; return the shard paths.

    Complete shards already in ``folder`` (right count, seed and shape) are skipped. The
    noise of shard ``i`` comes from a CPU generator seeded with ``shard_seed(base_seed, i)`` and the
    teacher runs on ``device`` in batches of ``batch_size`` (the shard size by default).
    ``description`` (the teacher and solver, say) is stored in ``pairs.json`` with the seeds.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image_shape = tuple(int(size) for size in image_shape)
    sizes = shard_sizes(num_pairs, shard_size)
    batch_size = batch_size or shard_size

    paths = []
    generated = 0
    for index, count in enumerate(sizes):
        path = folder / SHARD_PATTERN.format(index)
        seed = shard_seed(base_seed, index)
        paths.append(path)
        if is_complete_shard(path, count, seed, image_shape):
            continue

        z0 = torch.randn((count, *image_shape), generator=torch.Generator().manual_seed(seed))
        outputs = []
        for start in range(0, count, batch_size):
            batch = z0[start : start + batch_size].to(device)
            outputs.append(teacher(batch).float().cpu())
        x1 = torch.cat(outputs)
        write_shard_atomically(path, {"z0": z0, "x1": x1, "seed": seed, "index": index})
        generated += 1
        log.info("reflow shard %d/%d (%d pairs, seed %d) -> %s", index + 1, len(sizes), count, seed, path)

    manifest = {
        "num_pairs": num_pairs,
        "shard_size": shard_size,
        "base_seed": base_seed,
        "image_shape": list(image_shape),
        "shards": [{"file": path.name, "seed": shard_seed(base_seed, i)} for i, path in enumerate(paths)],
        "description": description or {},
    }
    manifest_path = folder / MANIFEST_FILE
    temporary = manifest_path.with_name(f".{manifest_path.name}.tmp")
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, manifest_path)
    log.info(
        "reflow pairs in %s: %d shards, %d generated now, %d reused",
        folder,
        len(paths),
        generated,
        len(paths) - generated,
    )
    return paths


def manifest_shards(folder: Path) -> list[Path]:
    """Return the shard files that ``folder``'s manifest lists, in order.

    Only the manifest counts, because a folder can keep shards of an earlier generation
    with more pairs or another shard size, and those must not be trained on.
    """
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{MANIFEST_FILE} not found in {folder}, so it contains no finished reflow pairs; generate them first"
        )
    manifest = json.loads(manifest_path.read_text())
    paths = [folder / entry["file"] for entry in manifest["shards"]]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{manifest_path} lists shards that do not exist: {', '.join(missing)}; generate them again"
        )
    return paths


class ReflowPairDataset(Dataset):
    """All pairs of the shards that a folder's manifest lists (or of a list of shard files), as ``(z0, x1)`` items."""

    def __init__(self, shards: str | Path | Sequence[str | Path]) -> None:
        if isinstance(shards, (str, Path)):
            paths = manifest_shards(Path(shards))
        else:
            paths = [Path(path) for path in shards]
        loaded = [read_shard(path) for path in paths]
        self.z0 = torch.cat([shard["z0"] for shard in loaded]).float()
        self.x1 = torch.cat([shard["x1"] for shard in loaded]).float()
        self.seeds = [int(shard["seed"]) for shard in loaded]

    def __len__(self) -> int:
        return len(self.z0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.z0[index], self.x1[index]
