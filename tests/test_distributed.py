"""Multi-process runs on CPU: DDP with two gloo processes, and a submitit multirun of two jobs.

Each run is a ``train.py`` subprocess, because DDP and the launcher start processes of
their own, as they would on a cluster.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import ROOT

DDP = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}


class SaveGateScores(L.Callback):
    """Save each rank's gate scores and keep masks after every epoch, and its weights after fit."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.gates is None:
            return
        scores = {name: score.detach().cpu().clone() for name, score in pl_module.gates.scores.items()}
        scores.update(
            {f"block{name}": score.detach().cpu().clone() for name, score in pl_module.gates.block_scores.items()}
        )
        masks = {str(index): mask.cpu() for index, mask in pl_module.gates.keep_masks().items()}
        path = self.folder / f"gates_epoch{trainer.current_epoch}_rank{trainer.global_rank}.pt"
        torch.save({"scores": scores, "masks": masks}, path)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {name: value.detach().cpu().clone() for name, value in pl_module.net.state_dict().items()}
        torch.save(state, self.folder / f"weights_rank{trainer.global_rank}.pt")


def run_train(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train.py"), *overrides]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_ddp_classifier_batch_is_per_device(tmp_path: Path) -> None:
    run_train(
        *DDP,
        "module=classifier",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=2",
        "data.batch_size=32",
        "data.train_subset=256",
        "run_id=ddp-classifier",
        f"paths.log_dir={tmp_path}",
    )

    folder = tmp_path / "train" / "runs" / "ddp-classifier"
    assert sorted(path.name for path in (tmp_path / "train" / "runs").iterdir()) == ["ddp-classifier"]
    summary = json.loads((folder / "summary.json").read_text())
    assert 0.0 <= summary["test/acc"] <= 1.0

    # data.batch_size is per device: each of the 2 ranks takes 32 of the 256 images per
    # step, so an epoch is ceil(256 / 64) = 4 optimizer steps, not ceil(256 / 32) = 8.
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == math.ceil(256 / (32 * 2))


def test_ddp_polarization_gates_match_across_ranks(tmp_path: Path) -> None:
    gates_folder = tmp_path / "gates"
    gates_folder.mkdir()
    run_train(
        *DDP,
        "module=polarization",
        "module.prune_blocks=true",
        "trainer.max_epochs=2",
        "trainer.limit_val_batches=2",
        "data.batch_size=32",
        "data.train_subset=256",
        f"paths.log_dir={tmp_path}",
        f"+callbacks.save_gates._target_={__name__}.SaveGateScores",
        f"+callbacks.save_gates.folder={gates_folder}",
    )

    epochs = sorted({path.name.split("_rank")[0] for path in gates_folder.glob("gates_epoch*_rank0.pt")})
    assert epochs, f"no gate scores were saved in {gates_folder}"
    for epoch in epochs:
        rank0 = torch.load(gates_folder / f"{epoch}_rank0.pt", weights_only=True)
        rank1 = torch.load(gates_folder / f"{epoch}_rank1.pt", weights_only=True)
        assert rank0["scores"].keys() == rank1["scores"].keys()
        assert any(name.startswith("block") for name in rank0["scores"])
        for name in rank0["scores"]:
            assert torch.equal(rank0["scores"][name], rank1["scores"][name]), f"{epoch}: gate {name} differs"
        for name in rank0["masks"]:
            assert torch.equal(rank0["masks"][name], rank1["masks"][name]), f"{epoch}: keep mask {name} differs"

    # The pruned networks (after extraction at the end of fit) are identical too.
    weights0 = torch.load(gates_folder / "weights_rank0.pt", weights_only=True)
    weights1 = torch.load(gates_folder / "weights_rank1.pt", weights_only=True)
    assert weights0.keys() == weights1.keys()
    for name in weights0:
        assert torch.equal(weights0[name], weights1[name]), f"parameter {name} differs between ranks"


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="hydra-submitit-launcher is not installed",
)
def test_submitit_local_multirun_gives_one_folder_per_job(tmp_path: Path) -> None:
    run_train(
        "--multirun",
        "hydra/launcher=submitit_local",
        "seed=1,2",
        "module=classifier",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "logger=none",
        "run_id=sweep",
        f"paths.log_dir={tmp_path}",
    )

    sweep = tmp_path / "train" / "multiruns" / "sweep"
    job_folders = sorted(path.name for path in sweep.iterdir() if path.is_dir() and not path.name.startswith("."))
    assert job_folders == ["0", "1"]
    for job in job_folders:
        assert (sweep / job / "summary.json").is_file(), f"job {job} wrote no summary"
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file(), f"job {job} wrote no checkpoint"
