"""Polarization pruning through the training task on digits: budget, cost counts, outputs, resume."""

import csv
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from lightning_modules.polarization import PolarizationModule
from lightning_modules.run_summary import format_summary
from lightning_modules.setup_run import instantiate_user_object
from lightning_modules.training import train
from pruning import fit_masks_to_budget, load_pruned
from tests.conftest import ComposeConfig
from tests.test_train import StopAfterEpoch

# A small digits run: 512 training images, batch 64, so 8 steps per epoch.
SMALL = (
    "module=polarization",
    "trainer.accelerator=cpu",
    "logger=none",
    "data.train_subset=512",
    "module.channels_last=false",
)


def test_run_meets_flops_target(compose_config: ComposeConfig, tmp_path: Path) -> None:
    cfg = compose_config(*SMALL, "trainer.max_epochs=4", "module.gate_lr=0.5", "module.freeze_max_fraction=0.5")
    summary = train(cfg)

    target = summary["pruning_flops_reduction_target"]
    assert target == 0.5
    assert target <= summary["pruning_flops_reduction"] <= target + cfg.module.freeze_tolerance
    # In these 16 steps the gates overshoot (about 74 % removed at the freeze), and the freeze
    # reopens the highest-scored closed channels. This checks that the gates did cut.
    assert summary["pruning_flops_reduction_from_gates"] > 0.2
    assert summary["pruning_params_reduction"] > 0
    assert summary["pruning_freeze_epoch"] == 2
    # The callbacks count the extracted network after test; the gates predicted the same.
    assert summary["macs_per_sample"] == pytest.approx(summary["pruning_macs_per_sample"], abs=0.5)
    assert summary["params"] == summary["pruning_params"]

    folder = tmp_path / "pruning"
    for name in ("pruned_model.pt", "channels.txt", "channels.csv", "gate_histograms.png", "kept_channels.png"):
        assert (folder / name).is_file(), name
    assert "fewer MACs" in (folder / "channels.txt").read_text()
    loaded = load_pruned(folder / "pruned_model.pt")
    assert sum(parameter.numel() for parameter in loaded.parameters()) == summary["params"]

    terminal = {line.split("  ")[1]: line.split("  ")[-1].strip() for line in format_summary(summary).splitlines()[2:]}
    assert terminal["FLOPs reduction"].startswith(f"{100 * summary['pruning_flops_reduction']:.1f} % (target 50.0 %")
    assert terminal["pruned model"].startswith(str(folder / "pruned_model.pt"))
    # Without block gates the summary has no line about blocks.
    assert "residual blocks removed" not in terminal


def test_fit_start_counts_dense_network(compose_config: ComposeConfig) -> None:
    summary = train(compose_config(*SMALL, "trainer.fast_dev_run=true"))
    assert summary["pruning_dense_macs_per_sample"] > summary["macs_per_sample"] * 1.5


def test_resume_keeps_gate_state(compose_config: ComposeConfig, tmp_path: Path) -> None:
    # Gates freeze (and the network shrinks) at the start of epoch 1 of 3. The run is
    # stopped after epoch 0 (gated) or epoch 1 (extracted) and resumed; both must end
    # where the uninterrupted run ends. last.ckpt is rewritten at the end of every epoch.
    common = (
        *SMALL,
        "trainer.max_epochs=3",
        "trainer.deterministic=true",
        "module.freeze_max_fraction=0.3",
    )
    uninterrupted = train(compose_config(*common))

    for stop_epoch in (0, 1):
        interrupted = compose_config(*common, "test=false")
        with open_dict(interrupted):
            interrupted.paths.output_dir = str(tmp_path / f"stopped{stop_epoch}")
            interrupted.callbacks.stop = {
                "_target_": f"{StopAfterEpoch.__module__}.StopAfterEpoch",
                "epoch": stop_epoch,
            }
        train(interrupted)
        checkpoint_path = tmp_path / f"stopped{stop_epoch}" / "checkpoints" / "last.ckpt"
        state = torch.load(checkpoint_path, weights_only=False)["polarization"]
        assert state["extracted"] == (stop_epoch == 1)

        resumed_cfg = compose_config(*common, f"ckpt_path={checkpoint_path}")
        with open_dict(resumed_cfg):
            resumed_cfg.paths.output_dir = str(tmp_path / f"resumed{stop_epoch}")
        resumed = train(resumed_cfg)

        assert resumed["pruning_freeze_epoch"] == 1
        assert resumed["macs_per_sample"] == uninterrupted["macs_per_sample"]
        assert resumed["test/loss"] == pytest.approx(uninterrupted["test/loss"], rel=1e-5)


def test_budget_target_ramps_linearly(compose_config: ComposeConfig, tmp_path: Path) -> None:
    small_with_csv = [option for option in SMALL if option != "logger=none"]
    cfg = compose_config(
        *small_with_csv,
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "trainer.max_epochs=4",
        "module.budget_ramp_fraction=0.25",
    )
    summary = train(cfg)

    rows = [row for row in _csv_rows(tmp_path) if row.get("pruning/target_reduction")]
    targets = {int(row["step"]): float(row["pruning/target_reduction"]) for row in rows}
    # 8 steps per epoch, 32 in all: the target reaches 0.5 at step 8, and the gates freeze at step 16.
    assert targets[0] == 0.0
    assert targets[4] == pytest.approx(0.25)
    assert targets[8] == 0.5
    assert targets[15] == 0.5

    # Every epoch logs its own total loss, the frozen epochs 2 and 3 included: the task loss alone.
    epochs = {int(row["epoch"]): row for row in _csv_rows(tmp_path) if row.get("train/total_loss")}
    assert sorted(epochs) == [0, 1, 2, 3]
    for epoch in (2, 3):
        assert float(epochs[epoch]["train/total_loss"]) == pytest.approx(float(epochs[epoch]["train/loss"]))

    # The last logged reduction is the one the freeze fitted to the budget, as in the summary.
    reductions = [
        float(row["pruning/flops_reduction"]) for row in _csv_rows(tmp_path) if row.get("pruning/flops_reduction")
    ]
    assert reductions[-1] == pytest.approx(summary["pruning_flops_reduction"])


@pytest.mark.parametrize(("t", "warns"), [(1.2, True), (0.5, False)])
def test_warns_when_open_gates_pulled_down(compose_config: ComposeConfig, t: float, warns: bool) -> None:
    cfg = compose_config(*SMALL, f"module.polarization_t={t}")
    net = instantiate_user_object(cfg.model, in_channels=1, num_classes=10)
    module = instantiate_user_object(cfg.module, net=net, num_classes=10)
    module.build_gates(torch.zeros(2, 1, 8, 8))
    with torch.no_grad():
        for score in module.gates.scores.values():
            score.copy_((torch.arange(len(score)) % 2).float())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module._check_polarization_direction()
    messages = [str(warning.message) for warning in caught if "polarization_t" in str(warning.message)]
    assert len(messages) == int(warns)


def _csv_rows(folder: Path) -> list[dict[str, str]]:
    path = next(folder.rglob("metrics.csv"))
    with path.open() as handle:
        return list(csv.DictReader(handle))


def gated_module_at_budget(compose_config: ComposeConfig, *overrides: str) -> PolarizationModule:
    """Build a digits ResNet-20 module whose open gates remove the target's FLOPs, within tolerance."""
    cfg = compose_config(*SMALL, *overrides)
    net = instantiate_user_object(cfg.model, in_channels=1, num_classes=10)
    module = instantiate_user_object(cfg.module, net=net, num_classes=10)
    module.build_gates(torch.zeros(2, 1, 8, 8))
    scores = {int(index): torch.rand(len(score)) for index, score in module.gates.scores.items()}
    masks = fit_masks_to_budget(module.graph, scores, module.flops_reduction, module.freeze_tolerance)
    with torch.no_grad():
        for index, mask in masks.items():
            module.gates.scores[str(index)].copy_(mask.float())
    # The epoch hooks call log, which warns on every call while no trainer is attached.
    module.log = lambda *args, **kwargs: None
    return module


def end_epoch(module: PolarizationModule, epoch: int, max_epochs: int = 10) -> None:
    """Run the end-of-epoch hook at ``epoch``, then move the stub trainer to the next epoch."""
    module.trainer = SimpleNamespace(current_epoch=epoch, max_epochs=max_epochs)
    module.on_train_epoch_end()
    module.trainer = SimpleNamespace(current_epoch=epoch + 1, max_epochs=max_epochs)


def test_gates_settle_when_stable_on_budget(compose_config: ComposeConfig) -> None:
    module = gated_module_at_budget(
        compose_config,
        "module.freeze_stable_epochs=2",
        "module.freeze_min_fraction=0.3",
        "module.freeze_max_fraction=0.8",
    )

    # Epoch 0 has no earlier masks to compare with, and epochs 1 and 2 flip nothing.
    end_epoch(module, 0)
    end_epoch(module, 1)
    assert module.stable_epochs == 1
    assert not module._settled()
    end_epoch(module, 2)
    assert module.stable_epochs == 2
    assert module._settled()

    # One flipped gate starts the count again.
    with torch.no_grad():
        first = next(iter(module.gates.scores.values()))
        first[0] = 1.0 - first[0]
    end_epoch(module, 3)
    assert module.stable_epochs == 0
    assert not module._settled()


def test_gates_not_settled_early_or_off_budget(compose_config: ComposeConfig) -> None:
    module = gated_module_at_budget(
        compose_config,
        "module.freeze_stable_epochs=1",
        "module.freeze_min_fraction=0.5",
        "module.freeze_max_fraction=0.8",
    )
    for epoch in range(3):
        end_epoch(module, epoch)
    # Stable, within the budget, but before freeze_min_fraction of the run.
    assert module.stable_epochs == 2
    assert not module._settled()
    module.trainer = SimpleNamespace(current_epoch=5, max_epochs=10)
    assert module._settled()

    # Stable but keeping every channel: not settled until freeze_max_fraction forces it.
    with torch.no_grad():
        for score in module.gates.scores.values():
            score.fill_(1.0)
    end_epoch(module, 5)
    end_epoch(module, 6)
    assert module.stable_epochs == 1
    module.trainer = SimpleNamespace(current_epoch=7, max_epochs=10)
    assert not module._settled()
    module.trainer = SimpleNamespace(current_epoch=8, max_epochs=10)
    assert module._settled()


def test_checkpoint_keeps_settle_count(compose_config: ComposeConfig) -> None:
    module = gated_module_at_budget(compose_config)
    for epoch in range(3):
        end_epoch(module, epoch)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)

    cfg = compose_config(*SMALL)
    net = instantiate_user_object(cfg.model, in_channels=1, num_classes=10)
    restored = instantiate_user_object(cfg.module, net=net, num_classes=10)
    restored.on_load_checkpoint(checkpoint)

    assert restored.stable_epochs == module.stable_epochs == 2
    assert restored.last_masks.keys() == module.last_masks.keys()
    for index, mask in module.last_masks.items():
        assert torch.equal(restored.last_masks[index], mask)
    assert [epoch for epoch, _ in restored.score_history] == [0, 1, 2]


# The network's weights as each fit started, in order.
FIT_START_WEIGHTS: list[dict[str, torch.Tensor]] = []


class RecordFitStartWeights(L.Callback):
    """Append a copy of the network's weights to ``FIT_START_WEIGHTS`` when fit starts."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        FIT_START_WEIGHTS.append({key: value.clone() for key, value in pl_module.net.state_dict().items()})


def test_pruning_starts_from_dense_checkpoint(compose_config: ComposeConfig, tmp_path: Path) -> None:
    dense_cfg = compose_config("module=classifier", "trainer.accelerator=cpu", "logger=none", "trainer.max_epochs=1")
    with open_dict(dense_cfg):
        dense_cfg.paths.output_dir = str(tmp_path / "dense")
    train(dense_cfg)
    dense = torch.load(tmp_path / "dense" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]

    cfg = compose_config(*SMALL, "trainer.fast_dev_run=true", f"module.init_checkpoint={tmp_path / 'dense'}")
    with open_dict(cfg):
        cfg.callbacks.record = {"_target_": f"{__name__}.RecordFitStartWeights"}
    FIT_START_WEIGHTS.clear()
    train(cfg)

    assert len(FIT_START_WEIGHTS) == 1
    started = FIT_START_WEIGHTS[0]
    weights = [key for key in dense if key.startswith("net.")]
    assert weights
    for key in weights:
        assert torch.equal(started[key.removeprefix("net.")], dense[key]), key


@pytest.mark.parametrize("train_again", [False, True], ids=["test-only", "resumed-after-fit"])
def test_report_without_fit_end(compose_config: ComposeConfig, tmp_path: Path, train_again: bool) -> None:
    # Neither a test-only run nor a run resumed from the end of fit reaches on_train_end.
    common = (*SMALL, "trainer.max_epochs=2", "module.freeze_max_fraction=0.5")
    first = compose_config(*common)
    with open_dict(first):
        first.paths.output_dir = str(tmp_path / "first")
    finished = train(first)

    second = compose_config(*common, f"ckpt_path={tmp_path / 'first'}", f"train={str(train_again).lower()}")
    with open_dict(second):
        second.paths.output_dir = str(tmp_path / "second")
    summary = train(second)

    assert summary["pruning_flops_reduction"] == finished["pruning_flops_reduction"]
    assert summary["pruning_params"] == finished["pruning_params"] == summary["params"]
    assert (tmp_path / "second" / "pruning" / "channels.txt").is_file()
    assert load_pruned(tmp_path / "second" / "pruning" / "pruned_model.pt") is not None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("module.flops_reduction=-0.5", "module.flops_reduction must be in [0, 1), got -0.5"),
        ("module.budget_penalty=foo", "module.budget_penalty must be one of squared, hinge, got 'foo'"),
        ("module.round_to=0", "module.round_to must be >= 1"),
    ],
)
def test_invalid_setting_names_config_key(compose_config: ComposeConfig, override: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        train(compose_config(*SMALL, override))
