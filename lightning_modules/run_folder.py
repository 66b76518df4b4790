"""Stable run folders: a run id names the folder, so a requeued job finds its own checkpoint.

Without a run id, Hydra names each run folder by the time it started, so a SLURM job
that is requeued would start in a new, empty folder. With a run id, the folder is
``logs/<task_name>/runs/<run_id>`` (``multiruns/<run_id>/<job number>`` for a multirun).
A run that starts in a folder that already contains ``checkpoints/last.ckpt`` resumes from it.

The run id is, in order: ``run_id=...`` on the command line, ``slurm-<job id>`` (or
``slurm-<array job id>_<array task id>`` in a job array) inside a SLURM job, else none.

The resolvers below are registered when ``lightning_modules`` is imported, because
``configs/hydra/default.yaml`` uses them to name the run folder.
"""

import datetime
import hashlib
import logging
import os
import re
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
# A run id becomes one folder name, so it may not contain a path separator.
_RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")
# W&B run ids may not contain / \ # ? % :, so the id keeps only these characters.
_WANDB_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def slurm_run_id() -> str | None:
    """Return ``slurm-<job id>``, or ``slurm-<array job id>_<task id>`` in a job array, or None outside SLURM.

    Every task of one job, and the same job after ``scontrol requeue``, gets the same id.
    """
    array_job_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    array_task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job_id and array_task_id:
        return f"slurm-{array_job_id}_{array_task_id}"
    job_id = os.environ.get("SLURM_JOB_ID")
    return f"slurm-{job_id}" if job_id else None


def run_folder_name(run_id: str | None) -> str:
    """Return the folder name of a run: its run id, or the current time when it has none."""
    if run_id is None or str(run_id) == "":
        return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    run_id = str(run_id)
    if not _RUN_ID_PATTERN.match(run_id) or run_id in (".", ".."):
        raise ValueError(
            f"run_id={run_id!r} cannot name a folder: use letters, digits and . _ = + - "
            "(no '/'), for example run_id=resnet20-seed1"
        )
    return run_id


def wandb_run_id(output_dir: str) -> str:
    """Return a W&B run id derived from the run folder, so a resumed run continues the same W&B run.

    The id is the folder name and a hash of the folder's absolute path, so two jobs of a
    multirun (folders ``0`` and ``1``) and two tasks with the same folder name differ.
    """
    folder = Path(output_dir).resolve()
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:10]
    name = _WANDB_ID_UNSAFE.sub("-", folder.name)[:48]
    return f"{name}-{digest}"


def register_resolvers() -> None:
    """Register the ``leanlight.*`` resolvers that the configs use; calling it again does nothing.

    The resolvers cache their value, and Hydra copies the cache into each job of a
    multirun (also into submitit jobs, where the config is pickled), so every job and
    every rank uses the folder name that the launching process chose.
    """
    resolvers = {
        "leanlight.slurm_run_id": slurm_run_id,
        "leanlight.run_folder": run_folder_name,
        "leanlight.wandb_id": wandb_run_id,
    }
    for name, function in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function, use_cache=True)


def slurm_restart_count() -> int:
    """Return how many times SLURM has requeued or restarted this job (``SLURM_RESTART_COUNT``), 0 outside SLURM."""
    value = os.environ.get("SLURM_RESTART_COUNT", "")
    return int(value) if value.isdigit() else 0


def resume_instruction(run_id: str | None, run_folder: str | Path) -> str:
    """Return how to resume a run that a signal stopped, for its last log line.

    A run id the user chose resumes with the same command. The SLURM-derived one resumes
    when SLURM requeues the job, and otherwise needs the id (or the folder) named. A run
    without an id, or with an empty one, has a folder named by the time and needs ``ckpt_path``.
    """
    if run_id and run_id != slurm_run_id():
        return f"running the same command (run_id={run_id}) resumes it"
    if run_id:
        return (
            f"a requeued SLURM job resumes it; otherwise set run_id={run_id} or ckpt_path={run_folder} "
            "in the same command"
        )
    return f"set ckpt_path={run_folder} in the same command to resume it"


def resumes_automatically(run_id: str | None) -> bool:
    """Return whether a run resumes from the checkpoint its folder already contains.

    - A run id the user chose (anything but the SLURM-derived ``slurm-<job id>``) reuses
      its folder on purpose, so the run resumes.
    - Otherwise only a job that SLURM requeued (``SLURM_RESTART_COUNT`` >= 1) resumes.
      That covers the derived run id and the jobs of a submitit multirun, which keep their
      folder when requeued. A second run started inside the same, not requeued, job
      gets the same derived folder but must not continue the first run.
    - A run folder named by the time is new, so it never has a checkpoint.
    """
    if run_id is not None and run_id != slurm_run_id():
        return True
    return "SLURM_JOB_ID" in os.environ and slurm_restart_count() >= 1


def find_resume_checkpoint(output_dir: Path) -> Path | None:
    """Return ``<output_dir>/checkpoints/last.ckpt`` if it exists, else None."""
    path = Path(output_dir) / LAST_CHECKPOINT
    return path if path.is_file() else None
