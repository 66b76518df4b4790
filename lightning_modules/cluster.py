"""Trainer plugins for clusters: atomic checkpoint files and the SLURM environment without Lightning's requeue.

Who handles the preemption signals (one owner, so that handlers do not fight):

- ``PreemptionCheckpoint`` (lightning_modules/callbacks/preemption.py) handles the
  requeue signals, SIGUSR1 from ``sbatch --signal`` and SIGUSR2 from submitit. It waits
  for the end of the current training batch, writes ``checkpoints/last.ckpt`` on every
  rank at the same step, then requeues the job and stops.
- Lightning's own SLURM requeue is switched off (``SLURMEnvironment(auto_requeue=False)``).
  Lightning 2.6 writes its ``hpc_ckpt_<n>.ckpt`` from inside the signal handler, in the
  middle of a step, and calls ``scontrol requeue`` as well. Under submitit, the job
  would then be requeued twice.
- Under submitit, submitit's handler is kept and called after the checkpoint is written,
  so submitit still decides whether to requeue and counts ``max_num_timeout``.
- SIGTERM stays with Lightning, which stops after the current batch. The callback
  writes the checkpoint first.
- Outside fit and test (between them, between a pipeline's stages, or in a stage
  without a Trainer) no Lightning handler is installed. There :class:`SigtermStops`
  raises Lightning's ``SIGTERMException``. ``train.py`` then logs how to resume, where
  the process used to end without a log line.
"""

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each local checkpoint to a temporary file in the same folder, then rename it over the target.

    A job killed while writing leaves the previous checkpoint intact. Lightning 2.6
    writes through a temporary file in the system temp folder and then moves it. On a
    cluster that folder is often a node's local /tmp, on another file system than the
    run folder, and the move is then a copy, not an atomic rename. Remote paths (s3://,
    gs://) are written by Lightning as before.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            if temporary.exists():
                temporary.unlink()


def trainer_plugins() -> list[Any]:
    """Return the plugins of every leanlight Trainer: atomic checkpoints, and the SLURM environment inside SLURM."""
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


class SigtermStops:
    """Context manager that turns a SIGTERM into :class:`SIGTERMException` wherever no Trainer handles it.

    During fit and test Lightning's own handler is installed and calls this one after
    it. This one then does nothing, and training stops at the end of the batch. Elsewhere
    the exception is raised at once: between fit and test, between a pipeline's stages,
    or in a stage without a Trainer (reflow pair generation). ``train.py`` then logs how
    to resume. The handler is installed only in the main thread, where Python allows
    signal handlers, and the previous one is restored on exit.
    """

    def __init__(self) -> None:
        # One bound method, so that the handler can recognise itself with ``is``.
        self._handler = self._handle
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> "SigtermStops":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exception: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if signal.getsignal(signal.SIGTERM) is not self._handler:
            return
        log.warning("SIGTERM received outside fit and test, so the run stops here")
        raise SIGTERMException()


def stop_if_sigterm_received(trainer: L.Trainer, phase: str) -> None:
    """Raise :class:`SIGTERMException` if a SIGTERM reached ``trainer``'s handler during ``phase`` (fit or test).

    Lightning's handler stays installed while fit and test wind down (``on_fit_end``,
    where pruning writes its files, and the end of the test loop) and there it only sets
    ``trainer.received_sigterm``. Without this check such a signal would be ignored.
    """
    if trainer.received_sigterm:
        log.warning("SIGTERM received while %s was finishing, so the run stops here", phase)
        raise SIGTERMException()
