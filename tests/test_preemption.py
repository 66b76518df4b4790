"""Preemption: a run killed or signalled mid-epoch resumes, with the same command, to the same result.

Each interrupted run is a ``train.py`` subprocess with a fixed run id, slowed to 0.2 s per
batch so that the signal lands in the middle of an epoch. The reference is the same
config trained without interruption. On the CPU with ``trainer.deterministic=true`` and
one thread, the resumed run must match it to 1e-6 (in practice exactly).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import open_dict

from lightning_modules.cluster import SigtermStops
from lightning_modules.training import train
from tests.conftest import ROOT, ComposeConfig

# 320 training images in batches of 32: 10 optimizer steps per epoch, 20 in all.
COMMON = (
    "module=classifier",
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    "trainer.max_epochs=2",
    "trainer.limit_val_batches=2",
    "data.train_subset=320",
    "data.batch_size=32",
    # Random crops, so the test also checks that augmentation continues as it would have.
    "data.crop_padding=1",
    "logger=none",
)
STEPS_PER_EPOCH = 10
TOTAL_STEPS = 20
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


class SlowTraining(L.Callback):
    """Sleep after every training batch and write the global step to ``progress_file``."""

    def __init__(self, seconds_per_batch: float, progress_file: str) -> None:
        self.seconds_per_batch = seconds_per_batch
        self.progress_file = Path(progress_file)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.progress_file.write_text(str(trainer.global_step))
        time.sleep(self.seconds_per_batch)


def command(log_dir: Path, run_id: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *COMMON,
        f"run_id={run_id}",
        f"paths.log_dir={log_dir}",
        f"+callbacks.slow._target_={__name__}.SlowTraining",
        "+callbacks.slow.seconds_per_batch=0.2",
        f"+callbacks.slow.progress_file={log_dir / f'{run_id}.progress'}",
        *extra,
    ]


def read_step(progress_file: Path) -> int:
    try:
        return int(progress_file.read_text())
    except (FileNotFoundError, ValueError):
        return -1


def wait_for(condition: Any, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"train.py exited with {process.returncode} before the signal:\n{output[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.02)


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The summary of the reference run, trained in this process without interruption."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    folder = tmp_path_factory.mktemp("uninterrupted")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=list(COMMON))
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(cfg)
    finally:
        torch.set_num_threads(threads)
        GlobalHydra.instance().clear()


def assert_same_result(resumed: dict[str, Any], reference: dict[str, Any]) -> None:
    assert resumed["test/acc"] == pytest.approx(reference["test/acc"], abs=1e-6)
    assert resumed["test/loss"] == pytest.approx(reference["test/loss"], abs=1e-6)


def test_sigkill_mid_epoch_resumes_exactly(tmp_path: Path, uninterrupted: dict[str, Any]) -> None:
    # last.ckpt every 3 steps: at most 3 steps of work are lost when the job is killed.
    argv = command(tmp_path, "killed", "callbacks.step_checkpoint.every_n_train_steps=3")
    folder = tmp_path / "train" / "runs" / "killed"
    last = folder / "checkpoints" / "last.ckpt"
    progress = tmp_path / "killed.progress"

    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    wait_for(lambda: last.is_file() and read_step(progress) >= 4, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)

    killed_at = read_step(progress)
    saved_step = checkpoint_step(last)
    assert not (folder / "summary.json").exists(), "the killed run finished before it was killed"
    assert saved_step % 3 == 0
    assert 0 < saved_step < TOTAL_STEPS
    assert saved_step % STEPS_PER_EPOCH != 0, f"checkpoint at step {saved_step} is not mid-epoch"
    assert killed_at - saved_step <= 3, "more than one checkpoint interval of work was lost"

    # The same command again: it finds last.ckpt in the run folder and resumes.
    result = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert f"already contains {last}" in output
    assert "so training resumes from it" in output

    resumed = json.loads((folder / "summary.json").read_text())
    assert checkpoint_step(last) == TOTAL_STEPS
    assert_same_result(resumed, uninterrupted)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_writes_checkpoint_and_resumes(
    tmp_path: Path, compose_config: ComposeConfig, uninterrupted: dict[str, Any], signal_number: signal.Signals
) -> None:
    run_id = f"signal-{signal_number.name}"
    folder = tmp_path / "train" / "runs" / run_id
    last = folder / "checkpoints" / "last.ckpt"
    progress = tmp_path / f"{run_id}.progress"

    # Step checkpoints are off (the default), so a mid-epoch last.ckpt can only come from the signal.
    process = subprocess.Popen(
        command(tmp_path, run_id), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV
    )
    wait_for(lambda: read_step(progress) >= 3, process)
    process.send_signal(signal_number)
    output, _ = process.communicate(timeout=120)

    assert process.returncode == 143, output[-3000:]
    assert f"{signal_number.name} received: wrote {last}" in output
    assert f"training stopped on a signal; running the same command (run_id={run_id}) resumes it" in output
    saved_step = checkpoint_step(last)
    assert 3 <= saved_step < STEPS_PER_EPOCH, f"checkpoint at step {saved_step} is not in the first epoch"
    assert not (folder / "summary.json").exists(), "the signalled run went on to test instead of stopping"
    if signal_number == signal.SIGUSR1:
        assert "not inside a SLURM job, so nothing is requeued" in output

    # Resume in this process with the same overrides and run folder (a new process would
    # only add its start-up time).
    cfg = compose_config(*COMMON, f"run_id={run_id}")
    cfg.paths.output_dir = str(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = train(cfg)
    finally:
        torch.set_num_threads(threads)
    assert checkpoint_step(last) == TOTAL_STEPS
    assert_same_result(resumed, uninterrupted)


class StopAfterFirstEpoch(L.Callback):
    """Stop training at the end of the first epoch, as a job stopped there would."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


def test_epoch_boundary_resume_matches(
    compose_config: ComposeConfig, tmp_path: Path, uninterrupted: dict[str, Any]
) -> None:
    # The loader's saved place is the end of the epoch, so the next epoch must draw a new
    # shuffle, as the uninterrupted run did, instead of replaying the last one.
    stopped = compose_config(*COMMON, "run_id=boundary", "test=false")
    with open_dict(stopped):
        stopped.callbacks.stop = {"_target_": f"{__name__}.StopAfterFirstEpoch"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(stopped)
        assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == STEPS_PER_EPOCH
        resumed = train(compose_config(*COMMON, "run_id=boundary"))
    finally:
        torch.set_num_threads(threads)
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == TOTAL_STEPS
    assert_same_result(resumed, uninterrupted)


def test_run_without_run_id_ignores_old_checkpoint(compose_config: ComposeConfig, tmp_path: Path) -> None:
    # A folder named by the time is new, so only a run id (or SLURM) makes a run resume on its own.
    cfg = compose_config(*COMMON, "trainer.max_epochs=1", "test=false")
    first = train(cfg)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert "test/acc" not in first

    # Batches of 64 give 5 steps per epoch. A run that resumed from the finished epoch
    # above would train no step and leave last.ckpt at step 10.
    again = compose_config(*COMMON, "trainer.max_epochs=1", "test=false", "data.batch_size=64")
    assert again.run_id is None, "run inside a SLURM job: unset SLURM_JOB_ID to run this test"
    train(again)
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == STEPS_PER_EPOCH // 2


def test_run_id_must_be_a_folder_name(compose_config: ComposeConfig) -> None:
    from lightning_modules.run_folder import run_folder_name

    assert run_folder_name("slurm-123_4") == "slurm-123_4"
    with pytest.raises(ValueError, match="run_id='a/b' cannot name a folder"):
        run_folder_name("a/b")


def test_slurm_variables_give_run_id(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_modules.run_folder import resumes_automatically, slurm_run_id

    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    assert slurm_run_id() is None
    assert not resumes_automatically(None)
    assert resumes_automatically("my-run")

    # A second run in the same job shares the derived folder but must not continue the first run.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert slurm_run_id() == "slurm-4242"
    assert not resumes_automatically(None)
    assert not resumes_automatically("slurm-4242")
    assert resumes_automatically("my-run")

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resumes_automatically(None)
    assert resumes_automatically("slurm-4242")

    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm_run_id() == "slurm-4200_7"


def test_wandb_id_follows_run_folder(compose_config: ComposeConfig, tmp_path: Path) -> None:
    from lightning_modules.run_folder import wandb_run_id

    cfg = compose_config("logger=wandb", "run_id=wandb-resume")
    first_id = cfg.logger.wandb.id
    assert first_id == wandb_run_id(str(tmp_path))
    assert cfg.logger.wandb.resume == "allow"

    # The same folder gives the same W&B run; another folder (another multirun job) another run.
    assert wandb_run_id(str(tmp_path)) == first_id
    assert wandb_run_id(str(tmp_path / "1")) != first_id


def test_resume_instruction_names_the_way(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_modules.run_folder import resume_instruction

    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    # A folder named by the time (no run id, or an empty one) resumes only through ckpt_path.
    for run_id in (None, ""):
        assert resume_instruction(run_id, "runs/x") == "set ckpt_path=runs/x in the same command to resume it"
    assert resume_instruction("mine", "runs/mine") == "running the same command (run_id=mine) resumes it"

    # The SLURM-derived id resumes by itself only in a requeued job.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert resume_instruction("slurm-4242", "runs/slurm-4242") == (
        "a requeued SLURM job resumes it; otherwise set run_id=slurm-4242 or ckpt_path=runs/slurm-4242 "
        "in the same command"
    )


def test_sigterm_outside_trainer_raises() -> None:
    handler_before = signal.getsignal(signal.SIGTERM)
    with SigtermStops(), pytest.raises(SIGTERMException):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # Python runs the handler between bytecodes, so this only bounds the wait.
    assert signal.getsignal(signal.SIGTERM) is handler_before


def test_sigterm_in_trainer_left_to_lightning() -> None:
    # During fit and test Lightning's handler calls the one it replaced, which must then do nothing.
    calls = []
    with SigtermStops():
        replaced = signal.getsignal(signal.SIGTERM)

        def lightning_like(number: int, frame: Any) -> None:
            calls.append(number)
            replaced(number, frame)

        signal.signal(signal.SIGTERM, lightning_like)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        signal.signal(signal.SIGTERM, replaced)
    assert calls == [signal.SIGTERM]


class SigtermAt(L.Callback):
    """Send SIGTERM to this process from the hook named ``hook`` (``on_fit_end`` or ``on_test_end``)."""

    def __init__(self, hook: str) -> None:
        self.hook = hook

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.hook == "on_fit_end":
            os.kill(os.getpid(), signal.SIGTERM)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.hook == "on_test_end":
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("hook", ["on_fit_end", "on_test_end"])
def test_sigterm_at_phase_end_stops(compose_config: ComposeConfig, tmp_path: Path, hook: str) -> None:
    # Lightning's handler is still installed there and only sets a flag, so the run used to go on and exit 0.
    cfg = compose_config("module=classifier", "trainer.accelerator=cpu", "logger=none", "trainer.max_epochs=1")
    with open_dict(cfg):
        cfg.callbacks.sigterm = {"_target_": f"{__name__}.SigtermAt", "hook": hook}
    with pytest.raises(SIGTERMException):
        train(cfg)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "summary.json").exists()


def test_signalled_test_only_run_says_rerun(tmp_path: Path, compose_config: ComposeConfig) -> None:
    trained = compose_config("module=classifier", "trainer.accelerator=cpu", "logger=none", "trainer.max_epochs=1")
    train(trained)
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "module=classifier",
        "trainer.accelerator=cpu",
        "logger=none",
        "train=false",
        f"ckpt_path={tmp_path}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"+callbacks.sigterm._target_={__name__}.SigtermAt",
        "+callbacks.sigterm.hook=on_test_end",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)

    assert result.returncode == 143, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "testing stopped on a signal; run the same command again to test" in output
    assert "ckpt_path=" not in output.split("testing stopped on a signal")[-1]
