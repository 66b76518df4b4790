"""The summary printed at the end of a run and saved as ``summary.json`` in its output folder."""

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig


def collect_summary(trainer: L.Trainer, loggers: list[Logger], wall_time_s: float, output_dir: Path) -> dict[str, Any]:
    """Gather final metrics, the callbacks' ``summary()`` entries, wall time and output locations.

    A callback may also have ``summary_rows()``, returning ``(label, text)`` pairs that the
    terminal summary shows under the cost figures (a technique's own results, for example).
    They are stored under ``"technique_rows"``.
    ``loggers`` are the run's own loggers: under ``fast_dev_run`` the trainer replaces them with a stand-in.
    """
    summary: dict[str, Any] = {}
    for name, value in trainer.callback_metrics.items():
        if name.startswith(("test/", "val/")):
            summary[name] = float(value)

    for callback in trainer.callbacks:
        if hasattr(callback, "summary"):
            summary.update(callback.summary())
        if hasattr(callback, "summary_rows"):
            summary.setdefault("technique_rows", []).extend([list(row) for row in callback.summary_rows()])

    summary["wall_time_s"] = wall_time_s
    summary["output_dir"] = str(output_dir)
    checkpoint = trainer.checkpoint_callback
    # A test-only run, or a resumed run that had nothing left to train, writes no checkpoint.
    if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath and Path(checkpoint.dirpath).is_dir():
        summary["checkpoint_dir"] = checkpoint.dirpath
        summary["best_checkpoint"] = checkpoint.best_model_path or None
    # Only rank zero has a W&B run; the others hold a stand-in without settings.
    for logger in loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            summary["wandb_mode"] = logger.experiment.settings.mode
            # A disabled run's folder is a placeholder that is never written.
            if summary["wandb_mode"] != "disabled":
                # The run folder (what `wandb sync` takes), not its files/ subfolder.
                summary["wandb_dir"] = str(Path(logger.experiment.dir).parent)
    return summary


def describe_run(cfg: DictConfig) -> dict[str, Any]:
    """Return what a report needs to place the run: task, technique (module class), model, data, group and tags."""

    def class_name(node: Any) -> str | None:
        target = node.get("_target_") if node is not None else None
        return str(target).rsplit(".", 1)[-1] if target else None

    model = cfg.get("model")
    # A model without a registry name (model=oms, built by a function) is named by its config choice.
    model_name = (model.get("name") if model is not None else None) or _config_choice("model") or class_name(model)
    return {
        "task_name": cfg.get("task_name"),
        "module": class_name(cfg.get("module")),
        "model": model_name,
        "data": class_name(cfg.get("data")),
        "group": cfg.get("group"),
        "tags": list(cfg.get("tags") or []),
    }


def _config_choice(group: str) -> str | None:
    """Return the option chosen for config ``group`` in this Hydra run, or None outside one."""
    if not HydraConfig.initialized():
        return None
    choice = HydraConfig.get().runtime.choices.get(group)
    return str(choice) if choice is not None else None


def save_summary(summary: dict[str, Any], output_dir: Path) -> Path:
    """Write the summary as JSON; return its path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return path


def format_summary(summary: dict[str, Any]) -> str:
    """Render the summary as the aligned table the terminal shows at the end of a run."""
    rows: list[tuple[str, str]] = []

    if "test/acc" in summary:
        accuracy = f"{100 * summary['test/acc']:.2f} %"
        if "test/acc_top5" in summary:
            accuracy += f" (top-5 {100 * summary['test/acc_top5']:.2f} %)"
        rows.append(("test accuracy (top-1)", accuracy))
    if "params" in summary:
        rows.append(("parameters", f"{summary['params']:,}"))
    if "macs_per_sample" in summary:
        rows.append(("MACs per sample", _si(summary["macs_per_sample"]) + " MACs"))
        rows.append(("FLOPs per sample", _si(summary["flops_per_sample"]) + " FLOPs (2 per MAC; conv and linear)"))
    rows.extend((str(label), str(text)) for label, text in summary.get("technique_rows", []))
    if "estimated_inference_energy_uj" in summary:
        rows.append(("estimated energy/inference", f"{summary['estimated_inference_energy_uj']:.4g} uJ"))
        rows.append(("  constants", summary["estimated_energy_constants"]))
        rows.append(("  operations", summary["estimated_energy_counts"]))
    for key in ("measured_fit_energy", "measured_test_energy", "measured_energy"):
        if key in summary:
            rows.append((key.replace("_", " "), summary[key]))
    if "train_samples_per_sec_median" in summary:
        rate = summary["train_samples_per_sec_median"]
        rows.append(("train throughput", f"{rate:,.0f} samples/s (median of epochs)"))
    if "test_samples_per_sec" in summary:
        rows.append(("test throughput", f"{summary['test_samples_per_sec']:,.0f} samples/s"))
    rows.append(("wall time", f"{summary['wall_time_s']:.1f} s"))
    if "tested_weights" in summary:
        rows.append(("tested weights", summary["tested_weights"]))
    rows.append(("logs", summary["output_dir"]))
    if "checkpoint_dir" in summary:
        rows.append(("checkpoints", summary["checkpoint_dir"]))
    if "wandb_dir" in summary:
        rows.append((f"W&B ({summary['wandb_mode']})", summary["wandb_dir"]))
    elif "wandb_mode" in summary:
        rows.append(("W&B", f"{summary['wandb_mode']}, nothing written"))

    width = max(len(label) for label, _ in rows)
    lines = ["", "leanlight run summary"] + [f"  {label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines) + "\n"


def _si(value: float) -> str:
    if value <= 0 or math.isnan(value):
        return f"{value:.3g}"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3f} {prefix}"
    return f"{value:.0f}"
