"""Restore the training DataLoader's place in the epoch when a run resumes from a mid-epoch checkpoint.

Lightning 2.6 saves the state of a stateful training loader (see
lightning_modules/data/resumable.py) in each checkpoint, but loads it only when it
builds the loader after the checkpoint was restored. A module whose scheduler reads
``trainer.estimated_stepping_batches`` makes Lightning build the loader earlier, in
``configure_optimizers``, and the saved state is then never loaded. The resumed epoch
would then start a new shuffle from its first batch.
"""

import logging

import lightning as L

log = logging.getLogger(__name__)


class DataPositionCallback(L.Callback):
    """Load the checkpoint's training-loader state at the start of training, if Lightning has not."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # NOTE: these are private attributes of Lightning 2.6's fit loop. The loader's
        # iterator exists by now, but it has not drawn its first batch, so the state
        # still applies to the epoch that is about to run.
        fit_loop = trainer.fit_loop
        states = getattr(fit_loop, "_combined_loader_states_to_load", None)
        combined_loader = getattr(fit_loop, "_combined_loader", None)
        if not states or combined_loader is None:
            return
        combined_loader._load_state_dicts(states)
        fit_loop._combined_loader_states_to_load = []
        log.info("restored the training data loader's place in the epoch from the checkpoint")
