"""End-to-end runs of the training task on CPU: every experiment, every logger, resume, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn as nn
from omegaconf import open_dict

from lightning_modules.classifier import ClassifierModule, load_classifier_weights
from lightning_modules.run_summary import format_summary
from lightning_modules.setup_run import recorded_overrides, summarize_load_error
from lightning_modules.training import train
from models import create_model
from tests.conftest import CIFAR10_ARCHIVE, ROOT, ComposeConfig

EXPERIMENTS = sorted(path.stem for path in (ROOT / "configs" / "experiment").glob("*.yaml"))
FAST = ("trainer.fast_dev_run=true", "trainer.accelerator=cpu", "logger=none")


def test_default_config_runs(compose_config: ComposeConfig) -> None:
    summary = train(compose_config(*FAST))
    assert 0.0 <= summary["test/acc"] <= 1.0
    # What a report needs to place the run.
    assert summary["module"] == "PolarizationModule"
    assert summary["model"] == "resnet20"
    assert summary["data"] == "DigitsDataModule"
    assert summary["task_name"] == "train"


def test_run_shows_no_library_notices(
    compose_config: ComposeConfig, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    # Lightning's callback "override" notice, its advertisement, its note on counting steps
    # and a deprecation inside Lightning's pytree use appeared in every run, and a user can
    # act on none of them.
    train(compose_config(*FAST))
    messages = [record.getMessage() for record in caplog.records]
    assert not [message for message in messages if "will override" in message]
    assert not [message for message in messages if "Tip:" in message]
    assert not [message for message in messages if "estimate number of stepping batches" in message]
    assert not [warning for warning in recwarn if "LeafSpec" in str(warning.message)]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_one_batch(compose_config: ComposeConfig, experiment: str) -> None:
    # A small batch keeps the paper-scale experiments (VGG-16 over five SNN stages) quick on a CPU.
    cfg = compose_config(f"experiment={experiment}", *FAST, "data.batch_size=16")
    if cfg.data.get("search_paths") and not CIFAR10_ARCHIVE.exists():
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR10_ARCHIVE}")
    with open_dict(cfg):
        cfg.data.num_workers = 0
    summary = train(cfg)
    # Classifiers report test/acc; generative models report only a test loss.
    assert any(key.startswith("test/") for key in summary)


# fast_dev_run writes no checkpoint, so these runs train one real batch: the best
# checkpoint must monitor a metric that the module logs, with no experiment to set it.
@pytest.mark.parametrize(
    "module_overrides", [("module=classifier",), ("module=ddpm", "model=unet"), ("module=oms", "model=oms")]
)
def test_module_alone_writes_best_checkpoint(
    compose_config: ComposeConfig, tmp_path: Path, module_overrides: tuple[str, ...]
) -> None:
    one_batch = [f"trainer.limit_{split}_batches=1" for split in ("train", "val", "test")]
    train(
        compose_config(*module_overrides, *one_batch, "trainer.max_epochs=1", "trainer.accelerator=cpu", "logger=none")
    )
    assert len(list((tmp_path / "checkpoints").glob("best_epoch_*.ckpt"))) == 1


@pytest.mark.parametrize("module", ["ddpm", "slimflow"])
def test_classifier_as_denoiser_is_rejected(compose_config: ComposeConfig, tmp_path: Path, module: str) -> None:
    # The default model, resnet20, takes no timesteps. SlimFlow must reject it before its teacher trains.
    with pytest.raises(ValueError, match=f"module={module} needs a network that takes \\(images, timesteps\\)"):
        train(compose_config(f"module={module}", *FAST))
    assert not (tmp_path / "stages").exists()


def test_slimflow_alone_monitors_val_loss(compose_config: ComposeConfig) -> None:
    checkpoint = compose_config("module=slimflow").callbacks.model_checkpoint
    assert checkpoint.monitor == "val/loss"
    assert checkpoint.mode == "min"


@pytest.mark.parametrize("logger", ["wandb", "csv", "tensorboard", "none", "many"])
def test_logger_choice_runs(compose_config: ComposeConfig, logger: str) -> None:
    cfg = compose_config("trainer.fast_dev_run=true", "trainer.accelerator=cpu", f"logger={logger}")
    summary = train(cfg)
    assert "test/acc" in summary


def test_wandb_writes_offline_run(compose_config: ComposeConfig, tmp_path: Path) -> None:
    cfg = compose_config("trainer.fast_dev_run=true", "trainer.accelerator=cpu", "logger=wandb")
    summary = train(cfg)
    assert summary["wandb_mode"] == "offline"
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_disabled_wandb_reports_no_folder(compose_config: ComposeConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    summary = train(compose_config("trainer.fast_dev_run=true", "trainer.accelerator=cpu", "logger=wandb"))
    assert summary["wandb_mode"] == "disabled"
    assert "wandb_dir" not in summary
    assert ["W&B", "disabled,", "nothing", "written"] in [line.split() for line in format_summary(summary).splitlines()]


def test_summary_reports_cost(compose_config: ComposeConfig, tmp_path: Path) -> None:
    summary = train(compose_config(*FAST))
    assert summary["macs_per_sample"] > 0
    assert summary["flops_per_sample"] == 2 * summary["macs_per_sample"]
    assert summary["params"] > 0
    assert summary["estimated_inference_energy_uj"] > 0
    assert summary["measured_test_energy"]
    assert (tmp_path / "summary.json").is_file()


class StopAfterEpoch(L.Callback):
    """Stop training at the end of ``epoch``, as if the job had been killed there."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_resume_matches_uninterrupted_run(compose_config: ComposeConfig, tmp_path: Path) -> None:
    # Augmentation is on, so the test also checks that shuffling and crops continue as
    # they would have: the random generators' state travels in the checkpoint.
    common = (
        "trainer.accelerator=cpu",
        "logger=none",
        "trainer.deterministic=true",
        "trainer.max_epochs=3",
        "data.train_subset=256",
        "data.crop_padding=1",
    )
    uninterrupted = train(compose_config(*common))

    interrupted = compose_config(*common, "test=false")
    with open_dict(interrupted):
        interrupted.paths.output_dir = str(tmp_path / "interrupted")
        interrupted.callbacks.stop = {"_target_": f"{__name__}.StopAfterEpoch", "epoch": 0}
    train(interrupted)
    resumed_cfg = compose_config(*common, f"ckpt_path={tmp_path / 'interrupted'}")
    with open_dict(resumed_cfg):
        resumed_cfg.paths.output_dir = str(tmp_path / "resumed")
    resumed = train(resumed_cfg)

    assert resumed["test/acc"] == pytest.approx(uninterrupted["test/acc"], abs=1e-6)
    assert resumed["test/loss"] == pytest.approx(uninterrupted["test/loss"], rel=1e-5)


def test_missing_checkpoint_names_path(compose_config: ComposeConfig, tmp_path: Path) -> None:
    cfg = compose_config(*FAST, f"ckpt_path={tmp_path / 'missing.ckpt'}")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        train(cfg)


def test_truncated_checkpoint_is_named(compose_config: ComposeConfig, tmp_path: Path) -> None:
    path = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"weight": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:200])

    with pytest.raises(ValueError, match="truncated.ckpt could not be read as a checkpoint"):
        train(compose_config(*FAST, f"ckpt_path={path}"))


def test_foreign_checkpoint_is_rejected(tmp_path: Path) -> None:
    from lightning_modules.setup_run import resolve_lightning_checkpoint

    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(3)}, path)

    with pytest.raises(ValueError, match="weights.pt is not a Lightning checkpoint"):
        resolve_lightning_checkpoint(str(path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_gpu_trainer_without_gpu_is_named(compose_config: ComposeConfig) -> None:
    with pytest.raises(ValueError, match="trainer.accelerator=gpu but torch sees no CUDA GPU"):
        train(compose_config("trainer=gpu", "logger=none"))


def test_unknown_config_key_is_rejected(compose_config: ComposeConfig) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer.max_epoch"):
        compose_config("trainer.max_epoch=3")


def test_missing_required_value_is_named(compose_config: ComposeConfig) -> None:
    with pytest.raises(ValueError, match="require a value for data.path, .* data.path=<value>"):
        train(compose_config("data=imagefolder", *FAST))


def test_negative_batch_size_is_rejected(compose_config: ComposeConfig) -> None:
    from lightning_modules.data import DataError

    with pytest.raises(DataError, match="-8"):
        train(compose_config(*FAST, "data.batch_size=-8"))


def test_missing_cifar10_names_paths(compose_config: ComposeConfig, tmp_path: Path) -> None:
    from lightning_modules.data import DataError

    data_dir = tmp_path / "data"
    cfg = compose_config(
        *FAST, "data=cifar10", f"data.search_paths=[{tmp_path / 'nowhere'},{data_dir}]", f"data.data_dir={data_dir}"
    )
    with pytest.raises(DataError, match="nowhere") as raised:
        train(cfg)
    # data_dir is one of the search paths here too, and is listed once.
    assert str(raised.value).count(f"{data_dir} ") == 1


def test_download_folder_of_missing_archive(compose_config: ComposeConfig, tmp_path: Path) -> None:
    from lightning_modules.data import DataError

    cfg = compose_config(*FAST, "data=cifar10", f"data.path={tmp_path / 'nope.tar.gz'}")
    with pytest.raises(DataError, match=f"download the original release into {tmp_path}\n"):
        train(cfg)


def test_multirun_gives_one_wandb_run_per_job(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "--multirun",
        "seed=1,2",
        "trainer.fast_dev_run=true",
        "trainer.accelerator=cpu",
        "logger=wandb",
        f"paths.log_dir={tmp_path}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    run_folders = sorted(tmp_path.glob("train/multiruns/*/*/wandb/offline-run-*"))
    job_folders = {folder.parents[1].name for folder in run_folders}
    assert len(run_folders) == 2
    assert job_folders == {"0", "1"}


def test_ddp_two_cpu_processes_share_one_run_folder(tmp_path: Path) -> None:
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        "logger=csv",
        f"paths.log_dir={tmp_path}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    run_folders = list(tmp_path.glob("train/runs/*"))
    assert len(run_folders) == 1
    summary = json.loads((run_folders[0] / "summary.json").read_text())
    assert summary["train_samples_per_sec_median"] > 0
    assert "sync_dist=True" not in result.stderr


def test_checkpoint_loads_weights_only(compose_config: ComposeConfig, tmp_path: Path) -> None:
    cfg = compose_config("trainer.accelerator=cpu", "logger=none", "trainer.max_epochs=1", "data.train_subset=64")
    train(cfg)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] > 0
    assert "RNGStateCallback" in checkpoint["callbacks"]


# A one-epoch dense digits run whose checkpoint other runs start from.
DENSE_RUN = (
    "module=classifier",
    "trainer.accelerator=cpu",
    "logger=none",
    "trainer.max_epochs=1",
    "data.train_subset=64",
)


def test_init_checkpoint_loads_network_weights(compose_config: ComposeConfig, tmp_path: Path) -> None:
    cfg = compose_config(*DENSE_RUN)
    train(cfg)
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    torch.save({key.removeprefix("net."): value for key, value in trained.items()}, tmp_path / "plain.pt")

    # A run folder, a Lightning checkpoint and a plain state dict all give the trained weights.
    for source in (tmp_path, tmp_path / "checkpoints" / "last.ckpt", tmp_path / "plain.pt"):
        net = create_model("resnet20", in_channels=1, num_classes=10)
        module = ClassifierModule(net, torch.optim.SGD, {"name": "none"}, num_classes=10, init_checkpoint=str(source))
        module.trainer = SimpleNamespace(datamodule=None)
        module.setup("fit")
        for key, value in net.state_dict().items():
            assert torch.equal(value, trained[f"net.{key}"]), f"{source}: {key}"


def test_resume_does_not_need_init_checkpoint(compose_config: ComposeConfig, tmp_path: Path) -> None:
    folders = {name: tmp_path / name for name in ("dense", "finetuned", "resumed")}
    options = {
        "dense": (),
        "finetuned": (f"module.init_checkpoint={folders['dense']}",),
        # One epoch more than the fine-tuned run, from its checkpoint, with the dense run gone.
        "resumed": (
            f"module.init_checkpoint={folders['dense']}",
            f"ckpt_path={folders['finetuned']}",
            "trainer.max_epochs=2",
        ),
    }
    for name, folder in folders.items():
        if name == "resumed":
            shutil.rmtree(folders["dense"])
        cfg = compose_config(*DENSE_RUN, *options[name])
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder)
        train(cfg)

    checkpoint = torch.load(folders["resumed"] / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["epoch"] == 1


def test_init_checkpoint_of_other_model_is_named(compose_config: ComposeConfig, tmp_path: Path) -> None:
    train(compose_config(*DENSE_RUN))
    net = create_model("resnet32", in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="(?s)do not fit the model of this run .*Set model="):
        load_classifier_weights(net, tmp_path)


def test_mismatched_checkpoint_names_overrides(compose_config: ComposeConfig, tmp_path: Path) -> None:
    train(compose_config(*DENSE_RUN))
    # What Hydra writes into a run folder; compose_config runs no Hydra job, so the test writes it.
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(
        "- module=classifier\n- data.train_subset=64\n- run_id=first\n- paths.log_dir=/tmp/logs\n"
        "- trainer.max_epochs=1\n- test_weights=best\n"
    )

    cfg = compose_config("module=classifier", "model=resnet32", "logger=none", "train=false", f"ckpt_path={tmp_path}")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "test_only")
    with pytest.raises(ValueError) as raised:
        train(cfg)

    message = str(raised.value)
    assert "do not fit this run's module (ClassifierModule, network CifarResNet)" in message
    assert "missing key(s) (net.layer1.3.conv1.weight" in message
    # trainer.* and test_weights share a prefix with the train and test keys, and are kept.
    assert (
        "started with: module=classifier data.train_subset=64 trainer.max_epochs=1 test_weights=best. "
        "Pass the same overrides" in message
    )
    assert len(message) < 1000


def test_recorded_overrides_skip_own_run_folder(tmp_path: Path) -> None:
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- model=resnet32\n- run_id=r1\n- +ckpt_path=x\n")
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"

    assert recorded_overrides(checkpoint, tmp_path / "other_run") == ["model=resnet32"]
    # A run resumed in its own folder: Hydra has replaced the record with the failing command's overrides.
    assert recorded_overrides(checkpoint, tmp_path) is None


def _load_error(net: nn.Module, state: dict[str, torch.Tensor]) -> RuntimeError:
    with pytest.raises(RuntimeError) as raised:
        net.load_state_dict(state)
    return raised.value


def test_load_error_summary_counts_keys() -> None:
    error = _load_error(
        nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 4)), {"0.weight": torch.zeros(3), "2.weight": torch.zeros(1)}
    )
    summary = summarize_load_error(error)
    assert summary.startswith("3 missing key(s) (0.bias, 1.weight, 1.bias); 1 unexpected key(s) (2.weight); ")
    assert "size mismatch for 0.weight: copying a param with shape torch.Size([3])" in summary


def test_load_error_summary_shortens_mismatches() -> None:
    net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(8)])
    error = _load_error(net, {name: torch.zeros(1) for name in net.state_dict()})
    summary = summarize_load_error(error)
    assert summary.count("size mismatch for") == 3
    assert summary.endswith("; 13 more size mismatch(es)")


# Four epochs at a constant learning rate of 0.4, which makes validation accuracy fall in
# some epoch, so the best checkpoint is an earlier one than the last.
BEST_BEFORE_LAST = (
    "trainer.accelerator=cpu",
    "logger=none",
    "trainer.max_epochs=4",
    "data.train_subset=64",
    "module.scheduler.name=constant",
    "module.optimizer.lr=0.4",
)


def test_last_checkpoint_is_last_epoch(compose_config: ComposeConfig, tmp_path: Path) -> None:
    # A last.ckpt tied to the best checkpoint would fall behind here.
    train(compose_config(*BEST_BEFORE_LAST))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["epoch"] == 3


def test_test_only_run_uses_checkpoint(compose_config: ComposeConfig, tmp_path: Path) -> None:
    trained_cfg = compose_config("trainer.accelerator=cpu", "logger=none", "trainer.max_epochs=2")
    trained = train(trained_cfg)

    test_only_cfg = compose_config("trainer.accelerator=cpu", "logger=none", "train=false", f"ckpt_path={tmp_path}")
    with open_dict(test_only_cfg):
        test_only_cfg.paths.output_dir = str(tmp_path / "test_only")
    tested = train(test_only_cfg)

    assert tested["test/acc"] == pytest.approx(trained["test/acc"])
    assert tested["tested_weights"] == str(tmp_path / "checkpoints" / "last.ckpt")
    # The test-only run writes no checkpoint, so the summary names no checkpoint folder.
    assert "checkpoint_dir" not in tested
    assert trained["tested_weights"] == "the weights at the end of training"


def test_test_only_run_picks_best_checkpoint(compose_config: ComposeConfig, tmp_path: Path) -> None:
    train(compose_config(*BEST_BEFORE_LAST, "test=false"))
    best = sorted((tmp_path / "checkpoints").glob("best_*.ckpt"))
    assert len(best) == 1
    assert best[0].name != "best_epoch_003.ckpt"

    results = {}
    for name, options in {
        "folder": (f"ckpt_path={tmp_path}", "test_weights=best"),
        "file": (f"ckpt_path={best[0]}",),
    }.items():
        cfg = compose_config("trainer.accelerator=cpu", "logger=none", "train=false", *options)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
        results[name] = train(cfg)

    assert results["folder"]["test/loss"] == results["file"]["test/loss"]
    bad = compose_config(
        "trainer.accelerator=cpu", "logger=none", "train=false", f"ckpt_path={best[0]}", "test_weights=best"
    )
    with pytest.raises(ValueError, match="is not a folder; pass the run folder"):
        train(bad)
    best[0].unlink()
    missing_best = compose_config(
        "trainer.accelerator=cpu", "logger=none", "train=false", f"ckpt_path={tmp_path}", "test_weights=best"
    )
    with pytest.raises(FileNotFoundError, match=f"records \\({best[0].name}\\) is missing from"):
        train(missing_best)


def test_test_only_run_needs_checkpoint(compose_config: ComposeConfig) -> None:
    with pytest.raises(ValueError, match="set ckpt_path"):
        train(compose_config(*FAST, "train=false"))


def test_misspelt_test_weights_fails_before_training(compose_config: ComposeConfig) -> None:
    with pytest.raises(ValueError, match="'bset'"):
        train(compose_config("trainer.accelerator=cpu", "logger=none", "test_weights=bset"))


def test_steps_per_epoch_ignore_max_steps() -> None:
    from lightning_modules.classifier import optimizer_steps_per_epoch

    # A run cut short by max_steps has the same epochs: 21 batches, 2 per optimizer step.
    trainer = SimpleNamespace(num_training_batches=21, accumulate_grad_batches=2, max_steps=4, max_epochs=10)
    assert optimizer_steps_per_epoch(trainer) == 11


def test_steps_per_epoch_need_finite_loader() -> None:
    from lightning_modules.classifier import optimizer_steps_per_epoch

    trainer = SimpleNamespace(num_training_batches=float("inf"), accumulate_grad_batches=1)
    with pytest.raises(ValueError, match="scheduler.name=none"):
        optimizer_steps_per_epoch(trainer)


def test_command_line_error_is_one_message(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "train.py"), "data.batch_size=-3", "logger=none", f"paths.log_dir={tmp_path}"]
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "batch_size=-3 is invalid" in output
    assert "Traceback" not in output


def test_top5_only_above_five_classes() -> None:
    from functools import partial

    from lightning_modules.classifier import ClassifierModule

    def make(num_classes: int) -> ClassifierModule:
        optimizer = partial(torch.optim.SGD, lr=0.1)
        return ClassifierModule(torch.nn.Linear(4, num_classes), optimizer, {"name": "none"}, num_classes)

    assert make(3).test_accuracy_top5 is None
    assert make(10).test_accuracy_top5 is not None


def test_epoch_line_counts_steps() -> None:
    from lightning_modules.callbacks.epoch_log import progress_text

    by_epochs = SimpleNamespace(current_epoch=2, max_epochs=10, global_step=30, max_steps=-1)
    by_steps = SimpleNamespace(current_epoch=10, max_epochs=-1, global_step=1200, max_steps=5000)
    assert progress_text(by_epochs) == "epoch 3/10"
    assert progress_text(by_steps) == "epoch 11, step 1200/5000"


class NetWithTypo(torch.nn.Module):
    """A network whose constructor has a bug: a misspelt keyword of nn.Conv2d."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, num_classes, 3, paddin=1)


def test_target_type_error_kept() -> None:
    from hydra.errors import InstantiationException
    from omegaconf import OmegaConf

    from lightning_modules.setup_run import instantiate_user_object

    node = OmegaConf.create({"_target_": f"{__name__}.NetWithTypo"})
    with pytest.raises(InstantiationException, match="paddin"):
        instantiate_user_object(node, in_channels=1, num_classes=10)
