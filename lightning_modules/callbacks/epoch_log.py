"""One log line per epoch with the epoch's metrics, for log files where progress bars do not show."""

import logging

import lightning as L

log = logging.getLogger(__name__)


class EpochLogCallback(L.Callback):
    """Log the epoch's metrics (``train/*``, ``val/*``, ``throughput/*``) at the end of each training epoch.

    Progress bars redraw one terminal line, so a batch job's log file (SLURM's, or
    ``train.log``) keeps none of their figures; this line stays.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = {
            name: float(value)
            for name, value in sorted(trainer.callback_metrics.items())
            if name.startswith(("train/", "val/", "throughput/")) and not name.endswith(("_step", "_epoch"))
        }
        text = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
        log.info("%s: %s", progress_text(trainer), text)


def progress_text(trainer: L.Trainer) -> str:
    """Return "epoch 3/10", or for a run that max_steps ends, "epoch 3, step 1200/5000"."""
    epoch = trainer.current_epoch + 1
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        return f"epoch {epoch}/{trainer.max_epochs}"
    return f"epoch {epoch}, step {trainer.global_step}/{trainer.max_steps}"
