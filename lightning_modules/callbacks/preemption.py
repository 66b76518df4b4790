"""Checkpoint, requeue and stop when the scheduler preempts the job or its time limit nears.

SLURM sends a signal some time before it kills a job: the one named by
``sbatch --signal=SIGUSR1@90`` (the sbatch example), or SIGUSR2 under submitit.
Local schedulers and ``kill`` send SIGTERM. On any of them this callback waits for
the end of the current training batch and writes ``checkpoints/last.ckpt``. Every DDP
rank takes part at the same step, because a checkpoint is written collectively. After a
requeue signal it also requeues the SLURM job. Then training stops. The same command then resumes from that file
(see lightning_modules/run_folder.py); lightning_modules/cluster.py explains why this
callback, and not Lightning or submitit, handles the signals.
"""

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def _signal_number(name: str) -> signal.Signals:
    number = getattr(signal, str(name), None)
    if not isinstance(number, signal.Signals):
        raise ValueError(f"requeue_signals contains {name!r}, which is not a signal name; use e.g. SIGUSR1 or SIGUSR2")
    return number


def _is_submitit_handler(handler: Any) -> bool:
    # submitit installs a bound method of its SignalHandler in each job before the task runs.
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("submitit")


def _slurm_job_id() -> str | None:
    array_job_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    array_task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job_id and array_task_id:
        return f"{array_job_id}_{array_task_id}"
    return os.environ.get("SLURM_JOB_ID")


class PreemptionCheckpoint(L.Callback):
    """Write ``<dirpath>/<filename>`` at the end of the batch during which a preemption signal arrived, then stop.

    Args:
        dirpath: folder of the checkpoint, the run's ``checkpoints`` folder.
        filename: name of the checkpoint file; ``last.ckpt`` is what a resume looks for.
        requeue_signals: signals after which the SLURM job is requeued. SIGTERM is always
            handled (through Lightning's handler) but never requeues.
        requeue: run ``scontrol requeue`` (or submitit's requeue) after a requeue signal.
    """

    def __init__(
        self,
        dirpath: str,
        filename: str = "last.ckpt",
        requeue_signals: Sequence[str] = ("SIGUSR1", "SIGUSR2"),
        requeue: bool = True,
    ) -> None:
        self.path = Path(dirpath) / filename
        self.requeue_signals = [_signal_number(name) for name in requeue_signals]
        self.requeue = requeue
        self.received_signal: int | None = None
        self.written_step: int | None = None
        self._previous_handlers: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning installs its own handlers just before this hook, so these replace its
        # handlers for the requeue signals, and SIGTERM stays with Lightning.
        if threading.current_thread() is not threading.main_thread():
            return
        for number in self.requeue_signals:
            self._previous_handlers[number] = signal.getsignal(number)
            signal.signal(number, self._record_signal)

    def _record_signal(self, number: int, frame: FrameType | None) -> None:
        # Only a flag is set here: the checkpoint is written between batches, where the
        # state of every rank is complete.
        self.received_signal = number

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_index: int
    ) -> None:
        received = self.received_signal is not None or trainer.received_sigterm
        if trainer.world_size > 1:
            # Any rank may be the one that got the signal, and all must write together.
            # NOTE: tested on CPU with one process only. Under DDP this adds one all-reduce
            # per step, and Lightning 2.6 also broadcasts from inside its SIGTERM handler.
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received or trainer.fast_dev_run:
            return

        trainer.save_checkpoint(self.path)
        self.written_step = trainer.global_step
        name = signal.Signals(self.received_signal).name if self.received_signal else "SIGTERM"
        if trainer.is_global_zero:
            log.warning("%s received: wrote %s at step %d", name, self.path, trainer.global_step)
        if self.received_signal is not None and self.requeue:
            self._requeue(trainer, self.received_signal)
        raise SIGTERMException()

    def _requeue(self, trainer: L.Trainer, number: int) -> None:
        previous = self._previous_handlers.get(number)
        if _is_submitit_handler(previous):
            # submitit decides whether to requeue (it counts max_num_timeout), requeues the
            # job and exits on rank zero; the other ranks return here.
            previous(number, None)
            return
        if not trainer.is_global_zero:
            return
        job_id = _slurm_job_id()
        if job_id is None:
            log.warning("not inside a SLURM job, so nothing is requeued")
            return
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if result.returncode == 0:
            log.warning("requeued SLURM job %s", job_id)
        else:
            log.error(
                "scontrol requeue %s failed with exit status %d: %s, so the job is not requeued",
                job_id,
                result.returncode,
                result.stderr.strip(),
            )

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning checks for SIGTERM once more after the batch's callbacks, so a SIGTERM
        # that arrives after this callback's on_train_batch_end stops training here
        # instead. The batch is complete, so the checkpoint is written now.
        try:
            if isinstance(exception, SIGTERMException) and self.written_step != trainer.global_step:
                self._write_after_sigterm(trainer)
        finally:
            self._restore_handlers()

    def _write_after_sigterm(self, trainer: L.Trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or not trainer.training:
            phase = "testing" if trainer.testing else "validation"
            log.warning(
                "stopped on SIGTERM during %s, outside a training batch, so %s was not written at this step. "
                "A resume starts from the last checkpoint written before",
                phase,
                self.path,
            )
            return
        if trainer.world_size > 1:
            # NOTE: Lightning 2.6 may stop the ranks of a DDP run at different points here,
            # and writing a checkpoint waits for all of them, so none is written.
            log.warning(
                "SIGTERM stopped rank %d between batches, so %s was not written at this step",
                trainer.global_rank,
                self.path,
            )
            return
        trainer.save_checkpoint(self.path)
        self.written_step = trainer.global_step
        log.warning("SIGTERM received: wrote %s at step %d", self.path, trainer.global_step)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers = {}
