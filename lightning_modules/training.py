"""The training task behind ``train.py``: fit, test, summarise, and always close the loggers."""

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_modules.cluster import SigtermStops, stop_if_sigterm_received, trainer_plugins
from lightning_modules.pipeline import STATE_FILE, pipeline_class_of, resolve_pipeline_folder
from lightning_modules.run_folder import find_resume_checkpoint, resumes_automatically
from lightning_modules.run_summary import collect_summary, describe_run, format_summary, save_summary
from lightning_modules.setup_run import (
    check_accelerator,
    check_checkpoint_file,
    checkpoint_mismatch_error,
    instantiate_callbacks,
    instantiate_loggers,
    instantiate_user_object,
    log_resolved_config,
    resolve_lightning_checkpoint,
    resolve_precision,
)

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test the module that ``cfg`` describes; return the run summary.

    The data module is built first because the network takes its input channels and
    number of classes from it.
    """
    start = time.perf_counter()
    _check_no_missing_values(cfg)
    _validate_test_weights(cfg)
    check_accelerator(cfg.trainer.get("accelerator"))
    _route_lightning_logs_through_root()
    _silence_library_notices()

    # A module config whose _target_ is a Pipeline subclass runs its stages, each with its own Trainer.
    pipeline_class = pipeline_class_of(cfg.get("module"))
    if pipeline_class is not None:
        _log_pipeline_resume(cfg)
        try:
            with SigtermStops():
                return pipeline_class(cfg).run()
        finally:
            _close_wandb()

    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate_user_object(cfg.data)
    net = instantiate_user_object(cfg.model, in_channels=datamodule.in_channels, num_classes=datamodule.num_classes)
    module = instantiate_user_object(cfg.module, net=net, num_classes=datamodule.num_classes)

    loggers = instantiate_loggers(cfg.get("logger"))
    callbacks = instantiate_callbacks(cfg.get("callbacks"), has_logger=bool(loggers))
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        precision=resolve_precision(cfg.trainer.get("precision", "auto"), cfg.trainer.get("accelerator", "auto")),
        plugins=trainer_plugins(),
    )

    try:
        log_resolved_config(cfg, loggers)
        with SigtermStops():
            if cfg.get("train", True):
                resume_checkpoint = _fit_checkpoint(cfg)
                if resume_checkpoint is not None and getattr(module, "init_checkpoint", None):
                    # The resumed checkpoint has the run's weights, so the initial ones need not exist any more.
                    log.info("resuming, so module.init_checkpoint=%s is not loaded", module.init_checkpoint)
                    module.init_checkpoint = None
                with _checkpoint_fits(resume_checkpoint, module, cfg.paths.output_dir):
                    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint)
                stop_if_sigterm_received(trainer, "fit")
            if cfg.get("test", True):
                test_checkpoint = _test_weights(cfg, trainer)
                with _checkpoint_fits(test_checkpoint, module, cfg.paths.output_dir):
                    trainer.test(module, datamodule=datamodule, ckpt_path=test_checkpoint)
                stop_if_sigterm_received(trainer, "test")

        output_dir = Path(cfg.paths.output_dir)
        summary = collect_summary(trainer, loggers, time.perf_counter() - start, output_dir)
        summary.update(describe_run(cfg))
        if cfg.get("test", True):
            summary["tested_weights"] = test_checkpoint or "the weights at the end of training"
        if trainer.is_global_zero:
            save_summary(summary, output_dir)
            for logger in loggers:
                logger.log_metrics({f"summary/{k}": v for k, v in summary.items() if _is_number(v)})
            log.info(format_summary(summary))
        return summary
    finally:
        _close_wandb()


@contextmanager
def _checkpoint_fits(checkpoint: str | None, module: L.LightningModule, output_dir: str) -> Iterator[None]:
    """Replace torch's error for a checkpoint of another module or network with one that names the overrides to pass."""
    try:
        yield
    except RuntimeError as error:
        if checkpoint is None or not str(error).startswith("Error(s) in loading state_dict"):
            raise
        raise checkpoint_mismatch_error(checkpoint, module, error, output_dir) from None


def _check_no_missing_values(cfg: DictConfig) -> None:
    """Raise ``ValueError`` naming every setting that the chosen configs leave as ``???``."""
    missing = []
    # Hydra's own node, present when a config is composed for tests, has ??? values that its run fills.
    for key in (key for key in cfg if key != "hydra"):
        if OmegaConf.is_missing(cfg, key):
            missing.append(str(key))
        elif OmegaConf.is_config(cfg[key]):
            missing += sorted(OmegaConf.missing_keys(cfg[key]))
    if missing:
        examples = " ".join(f"{key}=<value>" for key in missing)
        raise ValueError(
            f"the chosen configs require a value for {', '.join(missing)}, which they leave as ???. "
            f"Set it on the command line: {examples}"
        )


def _validate_test_weights(cfg: DictConfig) -> None:
    choice = cfg.get("test_weights", "last")
    if choice not in ("last", "best"):
        raise ValueError(
            f"test_weights must be 'last' (final weights) or 'best' (best validation checkpoint), got {choice!r}"
        )
    if not cfg.get("train", True) and cfg.get("test", True) and cfg.get("ckpt_path") is None:
        raise ValueError("train=false tests a trained network: set ckpt_path to a .ckpt file or a run folder")


def _fit_checkpoint(cfg: DictConfig) -> str | None:
    """Return the checkpoint that fit resumes from: ``ckpt_path``, else the run folder's own last.ckpt.

    The run folder's checkpoint is used only when the folder is reused on purpose: a run id
    of the user's, or a SLURM job that was requeued. lightning_modules/run_folder.py has the rule.
    """
    explicit = resolve_lightning_checkpoint(cfg.get("ckpt_path"))
    if explicit is not None:
        log.info("resuming from ckpt_path=%s", explicit)
        return explicit

    run_id = cfg.get("run_id")
    found = find_resume_checkpoint(Path(cfg.paths.output_dir))
    if found is None:
        return None
    if not resumes_automatically(run_id):
        if run_id is None:
            return None
        # Only a SLURM-derived run id gets here: a second run inside a job that was not requeued.
        raise ValueError(
            f"run folder {cfg.paths.output_dir} already contains {found} from an earlier run of SLURM job "
            f"{run_id}, and this job was not requeued (SLURM_RESTART_COUNT is 0). Pass run_id=<new name> "
            "to start a new run, or run_id=<name> with a name of your own to share a folder on purpose"
        )
    check_checkpoint_file(found)
    log.info(
        "run folder %s already contains %s (run_id=%s), so training resumes from it",
        cfg.paths.output_dir,
        found,
        run_id,
    )
    return str(found)


def _log_pipeline_resume(cfg: DictConfig) -> None:
    state_file = Path(cfg.paths.output_dir) / STATE_FILE
    if cfg.get("ckpt_path") is None and state_file.is_file():
        log.info("run folder %s already contains %s, so the pipeline resumes from it", cfg.paths.output_dir, state_file)


def _test_weights(cfg: DictConfig, trainer: L.Trainer) -> str | None:
    """Return the checkpoint to test, or ``None`` for the weights in memory after training."""
    if not cfg.get("train", True):
        if cfg.get("test_weights", "last") == "best":
            return best_checkpoint_of_run(cfg.ckpt_path)
        return resolve_lightning_checkpoint(cfg.ckpt_path)
    if cfg.get("test_weights", "last") == "last":
        return None

    checkpoint = trainer.checkpoint_callback
    if checkpoint is None or not checkpoint.best_model_path:
        log.warning("test_weights=best but no best checkpoint was saved; testing the final weights")
        return None
    return checkpoint.best_model_path


def resume_folder(cfg: DictConfig) -> Path:
    """Return the folder to resume this run from: the run's own, or a pipeline's (``ckpt_path`` when it resumed one)."""
    if pipeline_class_of(cfg.get("module")) is not None:
        return resolve_pipeline_folder(cfg)
    return Path(cfg.paths.output_dir)


def best_checkpoint_of_run(run_folder: str) -> str:
    """Return the best validation checkpoint of ``run_folder``, as its ``last.ckpt`` records it.

    The file is looked up by name in the folder's ``checkpoints/``, so a moved or copied run
    folder still finds it.
    """
    folder = Path(run_folder).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"test_weights=best with train=false tests the best checkpoint of a run folder, but "
            f"ckpt_path={run_folder} is not a folder; pass the run folder, or drop test_weights=best "
            "to test this file"
        )
    last = torch.load(resolve_lightning_checkpoint(str(folder)), map_location="cpu", weights_only=True, mmap=True)
    names = [
        Path(state["best_model_path"]).name
        for state in last.get("callbacks", {}).values()
        if isinstance(state, dict) and state.get("monitor") and state.get("best_model_path")
    ]
    if not names:
        raise FileNotFoundError(
            f"ckpt_path={run_folder} has no best checkpoint: its last.ckpt records none, as in a run without "
            "validation. Use test_weights=last"
        )
    found = [folder / "checkpoints" / name for name in names if (folder / "checkpoints" / name).is_file()]
    if not found:
        raise FileNotFoundError(
            f"the best checkpoint that {run_folder}'s last.ckpt records ({', '.join(names)}) is missing from "
            f"{folder / 'checkpoints'}. Use test_weights=last"
        )
    return resolve_lightning_checkpoint(str(found[0]))


def _route_lightning_logs_through_root() -> None:
    # Lightning gives its loggers their own console handler, so under Hydra (which
    # configures the root logger) every Lightning message would be printed twice.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torchmetrics"):
        lightning_logger = logging.getLogger(name)
        for handler in list(lightning_logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                lightning_logger.removeHandler(handler)
        lightning_logger.propagate = True


# Notices from the libraries that a user of leanlight can do nothing about:
# - Lightning 2.6 calls a pytree API that torch 2.14 deprecates, once per batch loop.
# - On resume, Lightning warns that the run's new folder differs from the checkpoint's,
#   and that a reused run folder is not empty. leanlight chooses both on purpose
#   (lightning_modules/run_folder.py).
# - Lightning announces that a module's callbacks "override" those passed to the Trainer
#   each time test follows fit, because the fit's instance is still attached. The
#   modules here return their report callbacks from configure_callbacks on purpose.
# - Lightning advertises its cloud services, says it reads the training data to count
#   the steps, and that it loads checkpoints with weights_only=False.
LIBRARY_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The dirpath has changed from",
    r"Checkpoint directory .* exists and is not empty",
)
LIBRARY_LOG_NOTICES = {
    "lightning.pytorch.utilities.rank_zero": (
        "The following callbacks returned in `LightningModule.configure_callbacks` will override",
        "💡 Tip:",
        "Loading `train_dataloader` to estimate number of stepping batches",
    ),
    "lightning.pytorch.trainer.connectors.checkpoint_connector": ("`weights_only` was not set",),
}


class _DropLibraryNotices(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().lstrip().startswith(self.prefixes)


def _silence_library_notices() -> None:
    for pattern in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, prefixes in LIBRARY_LOG_NOTICES.items():
        library_logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropLibraryNotices) for existing in library_logger.filters):
            library_logger.addFilter(_DropLibraryNotices(prefixes))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _close_wandb() -> None:
    # Each job of a multirun must get its own W&B run, and a crashed run must not
    # leave the next one attached to it, so the run is finished whatever happened.
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()
