"""Train a network with leanlight: ``python train.py experiment=<name> [overrides]``.

With no argument this runs the embedded default on scikit-learn's handwritten
digits, on the CPU, in a few minutes. See README.md for experiments and config groups.
"""

import logging
import os
import sys
from pathlib import Path

import hydra
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

import lightning_modules  # noqa: F401  (registers the resolvers that name run folders)

# Configs refer to the project root (data, logs, cache) through this variable, so a
# run behaves the same from any working directory.
os.environ["LEANLIGHT_ROOT"] = str(Path(__file__).resolve().parent)

log = logging.getLogger("train")

# The exit status of a process stopped by SIGTERM (128 + 15), so that `train.py && next step`
# does not go on with an unfinished run.
INTERRUPTED_EXIT_STATUS = 143


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run the training task; return the metric a Hydra sweeper optimises, if any."""
    from lightning_modules.pipeline import pipeline_class_of
    from lightning_modules.run_folder import resume_instruction
    from lightning_modules.training import resume_folder, train

    try:
        summary = train(cfg)
    except SIGTERMException:
        if cfg.get("train", True) or pipeline_class_of(cfg.get("module")) is not None:
            log.warning("training stopped on a signal; %s", resume_instruction(cfg.get("run_id"), resume_folder(cfg)))
        else:
            # A test-only run writes no checkpoint of its own, so there is nothing to resume.
            log.warning("testing stopped on a signal; run the same command again to test")
        sys.exit(INTERRUPTED_EXIT_STATUS)
    except (ValueError, FileNotFoundError) as error:
        # leanlight raises these for input a user can fix, with the value and the fix in
        # the message; a traceback would bury it. HYDRA_FULL_ERROR=1 shows the traceback.
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s\n(set HYDRA_FULL_ERROR=1 to see the traceback)", type(error).__name__, error)
        sys.exit(1)

    objective = cfg.get("optimized_metric")
    return summary.get(objective) if objective else None


if __name__ == "__main__":
    main()
