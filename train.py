"""Train a network with leanlight: ``python train.py experiment=<name> [overrides]``.

With no argument this runs the embedded default on scikit-learn's handwritten
digits, on the CPU, in a few minutes. See README.md for experiments and config groups.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

# Configs refer to the project root (data, logs, cache) through this variable, so a
# run behaves the same from any working directory.
os.environ["LEANLIGHT_ROOT"] = str(Path(__file__).resolve().parent)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run the training task; return the metric a Hydra sweeper optimises, if any."""
    from lightning_modules.training import train

    summary = train(cfg)
    objective = cfg.get("optimized_metric")
    return summary.get(objective) if objective else None


if __name__ == "__main__":
    main()
