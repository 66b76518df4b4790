"""The IIR-SNN pipeline on digits: stage table, initialisation from the previous stage, resume, state file, energy."""

import importlib.util
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, open_dict

from lightning_modules.classifier import load_classifier_weights
from lightning_modules.iir_snn import IIRSNNPipeline
from lightning_modules.iir_snn_report import format_stage_table
from lightning_modules.pipeline import STATE_FILE, PipelineState, load_stage_weights
from lightning_modules.setup_run import instantiate_user_object
from lightning_modules.training import resume_folder, train
from snn import convert_vgg_to_snn, measure_spike_statistics
from tests.conftest import ROOT, compose_train_config

# A pipeline small enough for seconds on one thread: 128 training images (2 batches),
# one ANN epoch, two epochs at each of T=2 and T=1, 2 test batches.
PIPELINE = (
    "experiment=iir_snn_digits",
    "trainer.accelerator=cpu",
    "logger=none",
    "trainer.deterministic=true",
    "module.timesteps=[2,1]",
    "data.train_subset=128",
    "module.ann.max_epochs=1",
    "module.snn.max_epochs=2",
    "module.conversion.calibration_images=64",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=2",
)

STAGES = ["ann", "convert", "T2", "T1"]
TEST_BATCHES = 2


class SimulatedKill(RuntimeError):
    """Raised by :class:`KillInStage` to stop a pipeline as a killed job would stop."""


class KillInStage(L.Callback):
    """Raise at the start of ``epoch`` of the stage at T=``timesteps``, after the previous epoch's checkpoint."""

    def __init__(self, timesteps: int, epoch: int) -> None:
        self.timesteps = timesteps
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "timesteps", None) == self.timesteps and trainer.current_epoch == self.epoch:
            raise SimulatedKill(f"killed at epoch {self.epoch} of the T={self.timesteps} stage")


# (timesteps, epoch) of every training epoch that RecordEpochs saw, in order.
RECORDED_EPOCHS: list[tuple[int | None, int]] = []


class RecordEpochs(L.Callback):
    """Append the stage's T and the epoch to ``RECORDED_EPOCHS`` at the start of every training epoch."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        RECORDED_EPOCHS.append((getattr(pl_module, "timesteps", None), trainer.current_epoch))


def compose_pipeline(output_dir: Path, cache_dir: Path, *overrides: str) -> DictConfig:
    """Compose configs/train.yaml with the small pipeline's overrides, writing into ``output_dir``."""
    return compose_train_config(output_dir, cache_dir, *PIPELINE, *overrides)


def read_stage_table(folder: Path) -> list[dict[str, Any]]:
    return json.loads((folder / "iir_snn_stages.json").read_text())["stages"]


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Any]:
    """Run the small pipeline once, and return its folder, summary and the state file's content after every write."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    snapshots: list[dict[str, Any]] = []
    original_save = PipelineState.save

    def save_and_parse(state: PipelineState) -> None:
        original_save(state)
        snapshots.append(json.loads(state.path.read_text()))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PipelineState, "save", save_and_parse)
        summary = train(compose_pipeline(folder, cache_dir))
    return {"folder": folder, "summary": summary, "snapshots": snapshots}


def test_pipeline_ends_with_stage_table(uninterrupted: dict[str, Any]) -> None:
    folder = uninterrupted["folder"]
    rows = read_stage_table(folder)
    assert [row["stage"] for row in rows] == STAGES
    assert [row["timesteps"] for row in rows] == [None, 2, 2, 1]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0, row
        assert row["energy_uj"] > 0, row
    assert rows[0]["energy_ratio"] == 1.0
    # Fewer timesteps, fewer spikes to accumulate: T=1 costs less than T=2.
    assert rows[3]["energy_uj"] < rows[2]["energy_uj"]
    assert uninterrupted["summary"]["test/acc"] == rows[-1]["accuracy"]
    assert (folder / "plots" / "spike_rates.png").stat().st_size > 0
    assert (folder / "plots" / "accuracy_and_energy.png").stat().st_size > 0


def test_stage_table_explains_its_columns() -> None:
    ann_row = {
        "stage": "ann",
        "timesteps": None,
        "accuracy": 0.7,
        "spike_rate": None,
        "energy_uj": 10.0,
        "energy_ratio": 1.0,
    }
    table = format_stage_table([ann_row], "4.6 pJ/MAC")
    # Header, rule and one row, then one legend line per column that needs one.
    legends = [line.split(":")[0] for line in table.splitlines()[3:]]
    assert legends == ["energy", "spike rate", "ANN/SNN"]


def test_report_lists_stages_as_iir_snn(uninterrupted: dict[str, Any]) -> None:
    spec = importlib.util.spec_from_file_location("leanlight_report", ROOT / "scripts" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    folder = uninterrupted["folder"]

    records = report.records_from_folders([folder])

    assert {record.technique for record in records} == {"IIR-SNN"}
    assert {record.task_name for record in records} == {"iir_snn_digits"}
    # The pipeline's overview repeats the last stage, so only the stages' own summaries are rows.
    assert str(folder) not in {record.run for record in records}
    assert str(folder / "stages" / "T1") in {record.run for record in records}
    assert {"ann", "T2", "T1"} <= {record.stage for record in records}
    assert "| task | stage | model |" in report.format_tables(records)


def test_every_stage_finished_with_checkpoint(uninterrupted: dict[str, Any]) -> None:
    folder = uninterrupted["folder"]
    stages = read_state(folder)["stages"]
    assert list(stages) == STAGES
    for name, record in stages.items():
        assert record["finished"], name
        assert (folder / record["checkpoint"]).is_file(), name


def test_state_file_valid_after_every_write(uninterrupted: dict[str, Any]) -> None:
    snapshots = uninterrupted["snapshots"]
    finished_counts = [sum(record["finished"] for record in snapshot["stages"].values()) for snapshot in snapshots]
    # One write when the file is created, then a start and a finish per stage.
    assert len(snapshots) == 1 + 2 * len(STAGES)
    assert finished_counts == [0, 0, 1, 1, 2, 2, 3, 3, 4]


def test_stage_starts_from_previous_stage(uninterrupted: dict[str, Any]) -> None:
    stages = read_state(uninterrupted["folder"])["stages"]
    for previous, current in [("convert", "T2"), ("T2", "T1")]:
        summary = stages[current]["summary"]
        assert summary["initialised_from"] == previous
        assert summary["initial_thresholds"] == stages[previous]["summary"]["snn/thresholds"], current
        assert summary["initial_leaks"] == stages[previous]["summary"]["snn/leaks"], current
    # T2 trained its thresholds, so T1 started from T2's values, not from the conversion's.
    assert stages["T2"]["summary"]["snn/thresholds"] != stages["convert"]["summary"]["snn/thresholds"]


def test_reported_energy_matches_spike_statistics(uninterrupted: dict[str, Any], cache_dir: Path) -> None:
    folder = uninterrupted["folder"]
    cfg = compose_pipeline(folder / "measure", cache_dir)
    datamodule = instantiate_user_object(cfg.data)
    ann = instantiate_user_object(cfg.model, in_channels=datamodule.in_channels, num_classes=datamodule.num_classes)
    load_classifier_weights(ann, folder / "stages" / "ann" / "weights.pt")
    images, _ = next(iter(datamodule.test_dataloader()))
    network = convert_vgg_to_snn(ann.eval(), images, timesteps=1, output_reduction="sum")
    state = load_stage_weights(folder / "stages" / "T1" / "weights.pt")
    network.load_state_dict({key.removeprefix("network."): value for key, value in state.items()})

    statistics = measure_spike_statistics(network, datamodule.test_dataloader(), max_batches=TEST_BATCHES)

    row = read_stage_table(folder)[-1]
    summary = read_state(folder)["stages"]["T1"]["summary"]
    assert row["energy_uj"] == pytest.approx(statistics.snn_energy_pj / 1e6, rel=1e-9)
    assert row["energy_ratio"] == pytest.approx(statistics.energy_ratio, rel=1e-9)
    assert row["accumulates_per_image"] == pytest.approx(statistics.snn_accumulates, rel=1e-9)
    assert row["spike_rates"] == pytest.approx({layer.name: layer.spike_rate for layer in statistics.neuron_layers})
    # EnergyCallback's estimate comes from the module's operation_counts().
    assert summary["estimated_inference_energy_uj"] == pytest.approx(statistics.snn_energy_pj / 1e6, rel=1e-9)
    # FlopsCallback counts only the first layer's MACs, once per timestep.
    assert summary["macs_per_sample"] == pytest.approx(statistics.snn_macs, rel=1e-9)


def test_sigterm_between_stages_stops(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No Lightning handler is installed between two stages' trainers, so without the
    # pipeline's own the process would end there without a word.
    original_mark_finished = PipelineState.mark_finished

    def mark_finished_then_signal(state: PipelineState, name: str, *args: Any) -> None:
        original_mark_finished(state, name, *args)
        if name == "T2":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(PipelineState, "mark_finished", mark_finished_then_signal)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SIGTERMException):
        train(compose_pipeline(tmp_path, cache_dir))

    stages = read_state(tmp_path)["stages"]
    assert [stages[name]["finished"] for name in STAGES] == [True, True, True, False]
    assert stages["T1"]["started_at"] is None
    assert signal.getsignal(signal.SIGTERM) is handler_before


def test_resumed_pipeline_skips_finished_stages(uninterrupted: dict[str, Any], tmp_path: Path, cache_dir: Path) -> None:
    folder = tmp_path / "interrupted"
    killed = compose_pipeline(folder, cache_dir)
    with open_dict(killed):
        killed.callbacks.kill = {"_target_": f"{__name__}.KillInStage", "timesteps": 1, "epoch": 1}
    with pytest.raises(SimulatedKill):
        train(killed)

    stages = read_state(folder)["stages"]
    assert [stages[name]["finished"] for name in STAGES] == [True, True, True, False]
    assert (folder / "stages" / "T1" / "checkpoints" / "last.ckpt").is_file()
    finished_weights = {name: folder / stages[name]["checkpoint"] for name in ["ann", "convert", "T2"]}
    mtimes = {name: path.stat().st_mtime_ns for name, path in finished_weights.items()}

    resumed_cfg = compose_pipeline(tmp_path / "resumed", cache_dir, f"ckpt_path={folder}")
    with open_dict(resumed_cfg):
        resumed_cfg.callbacks.record = {"_target_": f"{__name__}.RecordEpochs"}
    RECORDED_EPOCHS.clear()
    resumed = train(resumed_cfg)

    # Only T1 trained, and only its second epoch: it resumed from its last.ckpt.
    assert RECORDED_EPOCHS == [(1, 1)]
    assert {name: path.stat().st_mtime_ns for name, path in finished_weights.items()} == mtimes
    assert read_state(folder)["stages"]["T1"]["finished"]
    assert resumed["pipeline_dir"] == str(folder)
    # The resumed T1 stage continues at the step where it stopped, with the same random
    # numbers, so on CPU the results agree to rounding.
    expected_rows = read_stage_table(uninterrupted["folder"])
    resumed_rows = read_stage_table(folder)
    assert len(resumed_rows) == len(expected_rows)
    for resumed_row, expected_row in zip(resumed_rows, expected_rows, strict=True):
        assert resumed_row["stage"] == expected_row["stage"]
        assert resumed_row["accuracy"] == pytest.approx(expected_row["accuracy"], abs=1e-6)
        assert resumed_row["energy_uj"] == pytest.approx(expected_row["energy_uj"], rel=1e-6)
        assert resumed_row["spike_rates"] == pytest.approx(expected_row["spike_rates"], rel=1e-6)


def test_ann_checkpoint_skips_ann_training(uninterrupted: dict[str, Any], tmp_path: Path, cache_dir: Path) -> None:
    ann_weights = uninterrupted["folder"] / "stages" / "ann" / "weights.pt"
    cfg = compose_pipeline(tmp_path, cache_dir, f"module.ann_checkpoint={ann_weights}")
    train(cfg)

    ann = read_state(tmp_path)["stages"]["ann"]
    assert ann["checkpoint"] == str(ann_weights)
    assert not (tmp_path / "stages" / "ann" / "weights.pt").exists()
    # Only tested, so the ANN's accuracy on the test batches is the trained run's.
    expected = read_state(uninterrupted["folder"])["stages"]["ann"]["summary"]["test/acc"]
    assert ann["summary"]["test/acc"] == pytest.approx(expected)


def test_ckpt_path_without_state_file_is_rejected(tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose_pipeline(tmp_path / "run", cache_dir, "trainer.fast_dev_run=true", f"ckpt_path={tmp_path}")
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        train(cfg)


def test_increasing_timesteps_are_rejected(tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose_pipeline(tmp_path, cache_dir, "trainer.fast_dev_run=true", "module.timesteps=[1,2]")
    with pytest.raises(ValueError, match="decreasing order"):
        train(cfg)


def test_stage_weights_contain_thresholds(uninterrupted: dict[str, Any]) -> None:
    folder = uninterrupted["folder"]
    state = load_stage_weights(folder / "stages" / "T1" / "weights.pt")
    thresholds = read_state(folder)["stages"]["T1"]["summary"]["snn/thresholds"]
    for name, value in thresholds.items():
        assert state[f"network.{name}.threshold"].item() == pytest.approx(value), name


def test_schedule_set_twice_raises_before_stages(tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose_pipeline(
        tmp_path, cache_dir, "module.snn.scheduler.name=multistep", "module.snn.scheduler.milestones=[1]"
    )

    with pytest.raises(ValueError, match=r"module.snn.scheduler.milestone_fractions=\[\]"):
        IIRSNNPipeline(cfg)
    assert not (tmp_path / "stages").exists()


def test_trainer_length_override_is_named(tmp_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        IIRSNNPipeline(compose_pipeline(tmp_path, cache_dir, "trainer.max_epochs=1"))
    assert "trainer.max_epochs=1 has no effect" in caplog.text
    assert "module.ann.max_epochs, module.snn.max_epochs" in caplog.text

    # trainer.max_steps does end each stage early, so it gets no warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        IIRSNNPipeline(compose_pipeline(tmp_path, cache_dir, "trainer.max_steps=5"))
    assert "has no effect" not in caplog.text


def test_resume_folder_of_pipeline(uninterrupted: dict[str, Any], tmp_path: Path, cache_dir: Path) -> None:
    # A signal stops a run that resumed the pipeline: the pipeline's folder, not the new run's, resumes it.
    folder = uninterrupted["folder"]
    assert resume_folder(compose_pipeline(tmp_path, cache_dir, f"ckpt_path={folder}")) == folder
    assert resume_folder(compose_pipeline(tmp_path, cache_dir)) == tmp_path


def test_each_stage_has_own_wandb_run(tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose_pipeline(tmp_path, cache_dir, "trainer.fast_dev_run=true", "logger=wandb")
    train(cfg)

    for stage in [*STAGES, "report"]:
        assert len(list((tmp_path / "stages" / stage / "wandb").glob("offline-run-*"))) == 1, stage
    stage_cfg = IIRSNNPipeline(cfg).stage_config("T1")
    assert stage_cfg.logger.wandb.group == f"iir_snn_digits-{tmp_path.name}"
    assert stage_cfg.logger.wandb.job_type == "T1"
    assert stage_cfg.paths.output_dir == str(tmp_path / "stages" / "T1")


def test_leftover_model_setting_named(tmp_path: Path, cache_dir: Path) -> None:
    # The experiment's model.layout is a VGG setting, which model=resnet20 does not take.
    with pytest.raises(ValueError, match="does not accept the setting 'layout' .*~model.layout"):
        train(compose_pipeline(tmp_path, cache_dir, "model=resnet20"))
    # With the setting removed as the message suggests, the pipeline raises its own error for ResNets.
    with pytest.raises(ValueError, match="residual"):
        train(compose_pipeline(tmp_path, cache_dir, "model=resnet20", "~model.layout"))
