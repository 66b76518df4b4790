"""Multi-stage runs: named stages in one process, each resumable, with their progress in a JSON state file.

A technique that trains in stages (IIR-SNN's ANN, conversion and T=5..1 stages, or a
teacher, then a student) subclasses :class:`Pipeline` and lists its stages. A pipeline
run has one folder: the Hydra run folder, or the folder given as ``ckpt_path``. It contains

- ``pipeline_state.json``: for each stage, whether it finished, its checkpoint (the
  weights the next stage starts from) and its summary. The file is replaced atomically,
  so it is valid JSON whenever a run stops.
- ``stages/<name>/``: the stage's output folder. Its trainer writes checkpoints, logs,
  W&B files and ``summary.json`` there, as a single run writes to its run folder.

Running the same command again with ``ckpt_path=<pipeline folder>`` (or with the same
``hydra.run.dir``) skips the finished stages and resumes the unfinished one from its own
``checkpoints/last.ckpt`` through Lightning's ``ckpt_path``, so the resumed stage
continues at the step where it stopped.

Each stage has its own Trainer and its own W&B run, grouped by pipeline run
(W&B ``group``) and named by stage (``job_type``).

NOTE: only rank zero writes the state file and stage weights, but a pipeline whose
stages train under DDP has not been run.
"""

import copy
import datetime
import json
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object, instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_modules.cluster import stop_if_sigterm_received, trainer_plugins
from lightning_modules.run_summary import collect_summary, describe_run, save_summary
from lightning_modules.seeds import STAGE_STREAM, derive_seed
from lightning_modules.setup_run import (
    instantiate_callbacks,
    instantiate_loggers,
    log_resolved_config,
    resolve_precision,
)

log = logging.getLogger(__name__)

STATE_FILE = "pipeline_state.json"
STATE_VERSION = 1
STAGES_FOLDER = "stages"
# The weights a finished stage hands to the next one, inside the stage's folder.
STAGE_WEIGHTS_FILE = "weights.pt"


@dataclass
class StageRecord:
    """Progress of one stage, as stored in the state file."""

    finished: bool = False
    # Relative to the pipeline folder when inside it, so a moved folder still resumes.
    checkpoint: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    started_at: str | None = None
    finished_at: str | None = None


class PipelineState:
    """The state file of a pipeline run: which stages finished, their checkpoints and summaries."""

    def __init__(self, path: Path, pipeline: str, stages: dict[str, StageRecord], config: dict[str, Any]) -> None:
        self.path = path
        self.pipeline = pipeline
        self.stages = stages
        self.config = config

    @classmethod
    def open(cls, path: Path, pipeline: str, stage_names: list[str], config: dict[str, Any]) -> "PipelineState":
        """Load the state file at ``path``, or start a new one with every stage unfinished.

        Raises ValueError when the file belongs to another pipeline. A config that differs
        from the recorded one is only logged, because a user may change, for example, the
        number of epochs of the stages still to run.
        """
        if not path.is_file():
            state = cls(path, pipeline, {name: StageRecord() for name in stage_names}, config)
            state.save()
            return state

        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(
                f"pipeline state file {path} is not valid JSON ({error}). Delete it to run every stage again"
            ) from None
        if data.get("pipeline") != pipeline:
            raise ValueError(
                f"{path} belongs to pipeline {data.get('pipeline')!r}, not {pipeline!r}. "
                "Pass the folder of a run of this pipeline as ckpt_path"
            )
        records = {name: StageRecord(**record) for name, record in data.get("stages", {}).items()}
        for name in stage_names:
            records.setdefault(name, StageRecord())
        recorded = data.get("config", {})
        current_values, recorded_values = _flatten(config), _flatten(recorded)
        changed = sorted(
            key
            for key in current_values.keys() | recorded_values.keys()
            if current_values.get(key) != recorded_values.get(key)
        )
        if changed:
            log.warning(
                "the config differs from the one recorded in %s in %s, but finished stages keep their results",
                path,
                ", ".join(changed),
            )
        return cls(path, pipeline, records, recorded or config)

    def save(self) -> None:
        """Write the state file atomically: a temporary file in the same folder, then ``os.replace``."""
        if rank_zero_only.rank != 0:
            return
        data = {
            "version": STATE_VERSION,
            "pipeline": self.pipeline,
            "stages": {name: asdict(record) for name, record in self.stages.items()},
            "config": self.config,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with open(temporary, "w") as file:
            json.dump(data, file, indent=2, default=_json_fallback)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)

    def mark_started(self, name: str) -> None:
        """Record that stage ``name`` started (or restarted) now."""
        self.stages[name].started_at = _now()
        self.save()

    def mark_finished(self, name: str, checkpoint: str | None, summary: dict[str, Any]) -> None:
        """Record stage ``name`` as finished, with the checkpoint the next stage starts from and its summary."""
        record = self.stages[name]
        record.finished = True
        record.checkpoint = checkpoint
        record.summary = summary
        record.finished_at = _now()
        self.save()


@dataclass(frozen=True)
class StageContext:
    """Inputs of one stage: its folder, its config and the checkpoint to resume from."""

    name: str
    index: int
    folder: Path
    # The run's config with paths.output_dir set to the stage folder and W&B settings for the stage.
    config: DictConfig
    # The stage's own checkpoints/last.ckpt when an earlier attempt left one, else None.
    resume_checkpoint: str | None


@dataclass(frozen=True)
class StageResult:
    """Outputs of a finished stage: its checkpoint (or None) and its summary, both stored in the state file."""

    checkpoint: Path | None
    summary: dict[str, Any]


@dataclass(frozen=True)
class Stage:
    """A named step of a pipeline and the function that runs it."""

    name: str
    run: Callable[[StageContext], StageResult]


class Pipeline(ABC):
    """Base class of multi-stage techniques: runs :meth:`stages` in order, skipping finished ones.

    A subclass sets :attr:`name`, lists its stages and builds the final report. A module
    config whose ``_target_`` names a subclass is run by ``train.py`` as a pipeline, with
    the whole run config (see :func:`pipeline_class_of`).
    """

    name: ClassVar[str]
    # The config keys that set how long the stages train, named when the user sets one of
    # ignored_trainer_keys instead, which the stages replace.
    stage_length_keys: ClassVar[tuple[str, ...]] = ()
    ignored_trainer_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.folder = resolve_pipeline_folder(cfg)
        self.state: PipelineState | None = None
        self.stage_names: list[str] = []
        self.warn_about_trainer_length()

    def warn_about_trainer_length(self) -> None:
        """Warn that a command-line override of one of :attr:`ignored_trainer_keys` has no effect."""
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        ignored = [
            override for override in overrides if override.lstrip("+~").split("=")[0] in self.ignored_trainer_keys
        ]
        if ignored:
            log.warning(
                "%s has no effect: each stage of the %s pipeline trains for its own length; set %s instead",
                ", ".join(ignored),
                self.name,
                ", ".join(self.stage_length_keys),
            )

    @abstractmethod
    def stages(self) -> list[Stage]:
        """Return the stages in the order they run. Names must be unique and usable as folder names."""

    @abstractmethod
    def report(self, wall_time_s: float) -> dict[str, Any]:
        """Summarise the finished stages and return the run summary, which ``train`` returns."""

    def recorded_config(self) -> dict[str, Any]:
        """Return the part of the config stored in the state file and compared on resume."""
        return {
            key: OmegaConf.to_container(self.cfg[key], resolve=True)
            for key in ("module", "model")
            if self.cfg.get(key) is not None
        }

    def run(self) -> dict[str, Any]:
        """Run every unfinished stage, then the report, and return the report's summary."""
        start = time.perf_counter()
        stages = self.stages()
        names = [stage.name for stage in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"pipeline {self.name} has duplicate stage names: {names}")
        self.stage_names = names

        self.state = PipelineState.open(self.folder / STATE_FILE, self.name, names, self.recorded_config())
        log.info("pipeline %s in %s: stages %s", self.name, self.folder, ", ".join(names))
        for index, stage in enumerate(stages):
            record = self.state.stages[stage.name]
            if record.finished:
                log.info("stage %s finished in an earlier run, so it is skipped", stage.name)
                continue

            context = self.stage_context(stage.name, index)
            # Each stage starts from its own seed, so a stage draws the same numbers
            # whether the stages before it ran in this process or in an earlier one.
            if self.cfg.get("seed") is not None:
                L.seed_everything(derive_seed(STAGE_STREAM, self.cfg.seed, index), workers=True)
            if context.resume_checkpoint:
                log.info("stage %s: resuming from %s", stage.name, context.resume_checkpoint)
            else:
                log.info("stage %s: starting", stage.name)
            self.state.mark_started(stage.name)
            result = stage.run(context)
            checkpoint = None if result.checkpoint is None else self._relative(result.checkpoint)
            self.state.mark_finished(stage.name, checkpoint, result.summary)
            log.info("stage %s finished", stage.name)

        return self.report(time.perf_counter() - start)

    def stage_folder(self, name: str) -> Path:
        """Return the output folder of stage ``name``."""
        return self.folder / STAGES_FOLDER / name

    def stage_context(self, name: str, index: int) -> StageContext:
        """Return the context of stage ``name``: its folder, config and checkpoint to resume from."""
        folder = self.stage_folder(name)
        last = folder / "checkpoints" / "last.ckpt"
        return StageContext(
            name=name,
            index=index,
            folder=folder,
            config=self.stage_config(name),
            resume_checkpoint=str(last) if last.is_file() else None,
        )

    def stage_config(self, name: str) -> DictConfig:
        """Return the run's config for stage ``name``: output in the stage folder, and its own W&B run."""
        cfg = copy.deepcopy(self.cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(self.stage_folder(name))
            for entry in (cfg.get("logger") or {}).values():
                if entry and _is_wandb_logger(entry):
                    entry.group = self.run_name()
                    entry.job_type = name
                    entry.name = f"{cfg.get('task_name', self.name)}/{name}"
        return cfg

    def run_name(self) -> str:
        """Return the name that groups this run's stages in W&B: the user's ``group``, else task and folder."""
        return self.cfg.get("group") or f"{self.cfg.get('task_name', self.name)}-{self.folder.name}"

    def stage_record(self, name: str) -> StageRecord:
        """Return the record of stage ``name``, or raise ValueError if the stage has not finished."""
        record = self.state.stages.get(name) if self.state else None
        if record is None or not record.finished:
            raise ValueError(f"stage {name} of pipeline {self.name} has not finished, so its results are not available")
        return record

    def stage_checkpoint(self, name: str) -> Path:
        """Return the absolute path of the checkpoint that finished stage ``name`` recorded."""
        record = self.stage_record(name)
        if record.checkpoint is None:
            raise ValueError(f"stage {name} of pipeline {self.name} recorded no checkpoint")
        path = Path(record.checkpoint)
        path = path if path.is_absolute() else self.folder / path
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint {path} of finished stage {name} is missing. Restore it, or set "
                f"stages.{name}.finished to false in {self.folder / STATE_FILE} to run the stage again"
            )
        return path

    def _relative(self, path: Path) -> str:
        path = Path(path).resolve()
        try:
            return str(path.relative_to(self.folder.resolve()))
        except ValueError:
            return str(path)


def pipeline_class_of(module_cfg: DictConfig | None) -> type[Pipeline] | None:
    """Return the :class:`Pipeline` subclass that the module config's ``_target_`` names, else None.

    Any other target (a LightningModule, a function, a path that does not import) returns
    None, and the usual single-run path instantiates it and reports its errors.
    """
    target = module_cfg.get("_target_") if module_cfg else None
    if not target:
        return None
    try:
        found = get_object(target)
    except ImportError:
        return None
    return found if isinstance(found, type) and issubclass(found, Pipeline) else None


def resolve_pipeline_folder(cfg: DictConfig) -> Path:
    """Return the pipeline run folder: ``ckpt_path`` when set (a run to resume), else the run's output folder."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return Path(cfg.paths.output_dir)
    folder = Path(ckpt_path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} is not a folder, but a pipeline resumes from the folder of an earlier run, "
            f"the one that contains {STATE_FILE}"
        )
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} has no {STATE_FILE}, so it is not the folder of a pipeline run. "
            "Pass the run folder that train.py printed for the pipeline"
        )
    return folder


def run_lightning_stage(
    context: StageContext,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    fit: bool = True,
    max_epochs: int | None = None,
) -> dict[str, Any]:
    """Fit (unless ``fit`` is false) and test ``module`` as one stage, and return the stage's run summary.

    The Trainer, callbacks and loggers come from the stage's config, as ``train.py``
    builds them for a single run, so checkpoints, cost callbacks and W&B work the same.
    ``max_epochs`` overrides ``trainer.max_epochs`` for this stage. Fitting resumes from
    ``context.resume_checkpoint`` when there is one. With ``test_weights=best`` the best
    validation checkpoint is tested and left in ``module``. The summary is also saved as
    ``summary.json`` in the stage folder, and the W&B run is finished before returning.
    """
    cfg = context.config
    start = time.perf_counter()
    loggers = instantiate_loggers(cfg.get("logger"))
    callbacks = instantiate_callbacks(cfg.get("callbacks"), has_logger=bool(loggers))
    overrides = {} if max_epochs is None else {"max_epochs": max_epochs}
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        precision=resolve_precision(cfg.trainer.get("precision", "auto"), cfg.trainer.get("accelerator", "auto")),
        plugins=trainer_plugins(),
        **overrides,
    )

    try:
        log_resolved_config(cfg, loggers)
        if fit:
            trainer.fit(module, datamodule=datamodule, ckpt_path=context.resume_checkpoint)
            stop_if_sigterm_received(trainer, "fit")
        trainer.test(module, datamodule=datamodule, ckpt_path=_best_checkpoint(cfg, trainer) if fit else None)
        stop_if_sigterm_received(trainer, "test")

        summary = collect_summary(trainer, loggers, time.perf_counter() - start, context.folder)
        # The run's task, technique and model, so that a report places the stage with its pipeline.
        summary.update(describe_run(cfg))
        summary["stage"] = context.name
        if trainer.is_global_zero:
            save_summary(summary, context.folder)
            _log_numbers(loggers, summary, trainer.global_step)
        return summary
    finally:
        finish_wandb_run()


def save_stage_weights(module: torch.nn.Module, folder: Path) -> Path:
    """Save ``module.state_dict()`` atomically as ``{"state_dict": ...}`` in ``folder``, and return the path.

    This is the checkpoint a stage hands to the next one. Lightning's own ``last.ckpt`` is
    not used for that, because ``fast_dev_run`` and ``callbacks=none`` write none.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STAGE_WEIGHTS_FILE
    if rank_zero_only.rank == 0:
        temporary = path.with_name(f".{path.name}.tmp")
        torch.save({"state_dict": module.state_dict()}, temporary)
        os.replace(temporary, path)
    return path


def load_stage_weights(path: Path) -> dict[str, torch.Tensor]:
    """Return the state dict saved by :func:`save_stage_weights`, or of a Lightning checkpoint, on the CPU."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} does not contain a state dict but a {type(checkpoint).__name__}")
    return checkpoint.get("state_dict", checkpoint)


def instantiate_stage_loggers(context: StageContext) -> list[Logger]:
    """Instantiate the stage's loggers, for a stage that logs without a Trainer (a final report, say)."""
    return instantiate_loggers(context.config.get("logger"))


def finish_wandb_run() -> None:
    """Finish the current W&B run, if any, so that the next stage starts its own."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()


def _best_checkpoint(cfg: DictConfig, trainer: L.Trainer) -> str | None:
    if cfg.get("test_weights", "last") != "best":
        return None
    checkpoint = trainer.checkpoint_callback
    if checkpoint is None or not checkpoint.best_model_path:
        log.warning("test_weights=best but no best checkpoint was saved, so the final weights are tested")
        return None
    return checkpoint.best_model_path


def _log_numbers(loggers: list[Logger], summary: dict[str, Any], step: int) -> None:
    numbers = {
        f"summary/{key}": value
        for key, value in summary.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    for logger in loggers:
        logger.log_metrics(numbers, step=step)


def _is_wandb_logger(entry: DictConfig) -> bool:
    target = entry.get("_target_")
    if not target:
        return False
    try:
        found = get_object(target)
    except ImportError:
        return False
    return isinstance(found, type) and issubclass(found, WandbLogger)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Return the leaves of a nested dict under dotted keys, such as ``module.snn.max_epochs``."""
    leaves: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            leaves.update(_flatten(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _json_fallback(value: Any) -> Any:
    # Summaries contain numbers and strings. A tensor or path among them is stored as its value or text.
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)
