"""IIR-SNN as one command: train a VGG, convert it to a spiking network, then retrain at T = 5, 4, ..., 1.

Chowdhury, Rathi and Roy, "One Timestep is All You Need: Training Spiking Neural
Networks with Ultra Low Latency" (arXiv 2110.05929). The stages, each resumable (see
:mod:`lightning_modules.pipeline`):

- ``ann``: train the VGG with :class:`ClassifierModule`, or, with ``module.ann_checkpoint``,
  load trained weights and only test them.
- ``convert``: fold BatchNorm, set each layer's threshold to a percentile of its
  ANN pre-activations or of its spiking input currents (``module.conversion.threshold_source``)
  on a calibration batch from the training loader (:func:`snn.convert_vgg_to_snn`), and
  test the spiking network at the first T.
- ``T<t>`` for each t in ``module.timesteps``: train the spiking network at T=t with
  surrogate gradients, starting from the previous stage's weights, thresholds and leaks.

Every stage is tested on the test set. Spiking stages report per-layer spike rates,
synaptic operations and the estimated compute energy against the same network as an
ANN. At the end a table over the stages goes to the terminal, ``iir_snn_stages.json``
and W&B, with plots of spike rates per layer and of accuracy and energy against T.
"""

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from lightning_modules.callbacks.flops import count_forward_cost
from lightning_modules.classifier import ClassifierModule, load_classifier_weights
from lightning_modules.iir_snn_report import (
    format_stage_table,
    plot_accuracy_and_energy,
    plot_spike_rates,
    stage_table_rows,
)
from lightning_modules.pipeline import (
    Pipeline,
    Stage,
    StageContext,
    StageResult,
    finish_wandb_run,
    instantiate_stage_loggers,
    load_stage_weights,
    run_lightning_stage,
    save_stage_weights,
)
from lightning_modules.run_summary import save_summary
from lightning_modules.schedules import check_scheduler_options
from lightning_modules.setup_run import instantiate_user_object, resolve_checkpoint_path
from lightning_modules.spiking_classifier import SpikingClassifierModule
from snn import ENERGY_PER_ACCUMULATE_PJ, ENERGY_PER_MAC_PJ, SpikingNetwork, convert_vgg_to_snn

log = logging.getLogger(__name__)

STAGE_TABLE_FILE = "iir_snn_stages.json"
PLOTS_FOLDER = "plots"
# Images that calibrate the thresholds of a skeleton network, which are overwritten. Few keep it cheap.
SKELETON_CALIBRATION_IMAGES = 8


class IIRSNNPipeline(Pipeline):
    """The IIR-SNN stages: ``ann``, ``convert``, then one training stage per entry of ``module.timesteps``.

    It reads ``cfg.module`` (configs/module/iir_snn.yaml): ``timesteps``, ``ann_checkpoint``,
    ``ann`` (the ANN's optimizer, schedule and epochs), ``conversion`` (threshold source,
    percentile, calibration images and timesteps, output reduction) and ``snn`` (optimizer,
    schedule and epochs of each spiking stage). ``cfg.model`` must be a VGG that :func:`snn.convert_vgg_to_snn`
    accepts, and the energy constants come from ``cfg.callbacks.energy`` when it is set.
    """

    name = "iir_snn"
    stage_length_keys = ("module.ann.max_epochs", "module.snn.max_epochs")
    # Each stage sets max_epochs; trainer.max_steps still ends a stage early.
    ignored_trainer_keys = ("trainer.max_epochs",)

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        if not cfg.get("train", True) or not cfg.get("test", True):
            raise ValueError(
                "the IIR-SNN pipeline always trains and tests each stage, so train=false and test=false are not "
                "supported. To print the results of a finished pipeline, run it again with ckpt_path=<its folder>"
            )
        self.options = cfg.module
        self.timesteps = _validate_timesteps(self.options.timesteps)
        energy = (cfg.get("callbacks") or {}).get("energy") or {}
        self.energy_per_mac_pj = float(energy.get("energy_per_mac_pj", ENERGY_PER_MAC_PJ))
        self.energy_per_accumulate_pj = float(energy.get("energy_per_accumulate_pj", ENERGY_PER_ACCUMULATE_PJ))
        self.datamodule = instantiate_user_object(cfg.data)
        # Raises now, rather than after the ANN has trained, when the model cannot be converted
        # or a schedule is set twice.
        self._check_convertible(self.build_ann())
        check_scheduler_options(self.options.ann.scheduler, "module.ann.scheduler")
        check_scheduler_options(self.options.snn.scheduler, "module.snn.scheduler")

    def stages(self) -> list[Stage]:
        stages = [Stage("ann", self.run_ann_stage), Stage("convert", self.run_convert_stage)]
        stages += [Stage(stage_name(timesteps), self.run_spiking_stage) for timesteps in self.timesteps]
        return stages

    # ----------------------------------------------------------------------------------
    # Stages

    def run_ann_stage(self, context: StageContext) -> StageResult:
        """Train the ANN (or test the given ``ann_checkpoint``) and hand its weights to the conversion."""
        net = self.build_ann()
        ann_options = self.options.ann
        module = ClassifierModule(
            net,
            optimizer=instantiate(ann_options.optimizer),
            scheduler=OmegaConf.to_container(ann_options.scheduler, resolve=True),
            num_classes=self.datamodule.num_classes,
            label_smoothing=ann_options.label_smoothing,
        )
        given_checkpoint = self.options.get("ann_checkpoint")
        if given_checkpoint:
            path = Path(resolve_checkpoint_path(given_checkpoint))
            load_classifier_weights(net, path)
            summary = run_lightning_stage(context, module, self.datamodule, fit=False)
            summary["ann_checkpoint"] = str(path)
        else:
            summary = run_lightning_stage(context, module, self.datamodule, max_epochs=ann_options.max_epochs)
            path = save_stage_weights(module.net, context.folder)

        macs = count_forward_cost(net, self._example_images(1)).macs
        summary["ann/macs_per_image"] = macs
        summary["ann/energy_pj"] = macs * self.energy_per_mac_pj
        return StageResult(checkpoint=path, summary=summary)

    def run_convert_stage(self, context: StageContext) -> StageResult:
        """Convert the trained ANN with thresholds from a calibration batch, and test it at the first T."""
        conversion = self.options.conversion
        ann = self.trained_ann()
        count = conversion.calibration_images
        if self.cfg.trainer.get("fast_dev_run"):
            # A smoke test runs one batch of everything, the calibration included.
            count = min(count, self.datamodule.batch_size)
        calibration_images = self._calibration_images(count)
        network = convert_vgg_to_snn(
            ann,
            calibration_images,
            timesteps=self.timesteps[0],
            percentile=conversion.percentile,
            output_reduction=conversion.output_reduction,
            threshold_source=conversion.get("threshold_source", "ann"),
            calibration_timesteps=conversion.get("calibration_timesteps"),
        )
        module = self.build_spiking_module(network)
        summary = run_lightning_stage(context, module, self.datamodule, fit=False)
        summary["calibration_images"] = len(calibration_images)
        summary["timesteps"] = network.timesteps
        return StageResult(checkpoint=save_stage_weights(module, context.folder), summary=summary)

    def run_spiking_stage(self, context: StageContext) -> StageResult:
        """Train the spiking network at this stage's T, starting from the previous stage's weights."""
        timesteps = self.timesteps[context.index - 2]
        previous = "convert" if context.index == 2 else stage_name(self.timesteps[context.index - 3])
        module = self.build_spiking_module(self.spiking_network_skeleton(timesteps))
        module.load_state_dict(load_stage_weights(self.stage_checkpoint(previous)))
        initial_thresholds, initial_leaks = module.thresholds(), module.leaks()

        summary = run_lightning_stage(context, module, self.datamodule, max_epochs=self.options.snn.max_epochs)
        summary["timesteps"] = timesteps
        summary["initialised_from"] = previous
        summary["initial_thresholds"] = initial_thresholds
        summary["initial_leaks"] = initial_leaks
        return StageResult(checkpoint=save_stage_weights(module, context.folder), summary=summary)

    # ----------------------------------------------------------------------------------
    # Report

    def report(self, wall_time_s: float) -> dict[str, Any]:
        """Print, save and log to W&B the stage table and plots, and return the pipeline's summary."""
        # Stages recorded by an earlier run with other timesteps are left out.
        summaries = {name: self.state.stages[name].summary for name in self.stage_names}
        rows = stage_table_rows(summaries)
        table = format_stage_table(rows, self._constants_text())
        log.info("IIR-SNN stages (%s):\n%s", self.folder, table)

        table_path = self.folder / STAGE_TABLE_FILE
        table_path.write_text(json.dumps({"energy_constants": self._constants_text(), "stages": rows}, indent=2) + "\n")
        plots_folder = self.folder / PLOTS_FOLDER
        plots = {
            "iir_snn/spike_rates": plot_spike_rates(rows, plots_folder / "spike_rates.png"),
            "iir_snn/accuracy_and_energy": plot_accuracy_and_energy(rows, plots_folder / "accuracy_and_energy.png"),
        }
        self._log_report_to_wandb(rows, plots)

        last = rows[-1]
        summary: dict[str, Any] = {
            "test/acc": last["accuracy"],
            "iir_snn/timesteps": last["timesteps"],
            "iir_snn/spike_rate": last["spike_rate"],
            "iir_snn/energy_uj": last["energy_uj"],
            "iir_snn/energy_ratio": last["energy_ratio"],
            "iir_snn/stage_table": str(table_path),
            "iir_snn/plots": {key: str(path) for key, path in plots.items()},
            "pipeline_dir": str(self.folder),
            "wall_time_s": wall_time_s,
        }
        save_summary(summary, self.folder)
        output_dir = Path(self.cfg.paths.output_dir)
        if output_dir.resolve() != self.folder.resolve():
            save_summary(summary, output_dir)
        return summary

    def _log_report_to_wandb(self, rows: list[dict[str, Any]], plots: dict[str, Path]) -> None:
        context = self.stage_context("report", len(self.timesteps) + 2)
        loggers = [logger for logger in instantiate_stage_loggers(context) if isinstance(logger, WandbLogger)]
        if not loggers:
            return
        try:
            columns = ["stage", "timesteps", "accuracy", "spike_rate", "energy_uj", "energy_ratio"]
            data = [[row[column] for column in columns] for row in rows]
            for logger in loggers:
                logger.log_table(key="iir_snn/stages", columns=columns, data=data)
                for key, path in plots.items():
                    logger.log_image(key=key, images=[str(path)])
        finally:
            finish_wandb_run()

    def _constants_text(self) -> str:
        return (
            f"{self.energy_per_mac_pj} pJ/MAC, {self.energy_per_accumulate_pj} pJ/accumulate, "
            "45 nm, Horowitz ISSCC 2014, compute only"
        )

    # ----------------------------------------------------------------------------------
    # Networks

    def build_ann(self) -> nn.Module:
        """Return a new, untrained network from ``cfg.model``."""
        return instantiate_user_object(
            self.cfg.model, in_channels=self.datamodule.in_channels, num_classes=self.datamodule.num_classes
        )

    def trained_ann(self) -> nn.Module:
        """Return the ANN with the weights of the finished ``ann`` stage, in eval mode."""
        net = self.build_ann()
        load_classifier_weights(net, self.stage_checkpoint("ann"))
        return net.eval()

    def spiking_network_skeleton(self, timesteps: int) -> SpikingNetwork:
        """Return a spiking network of the right layout, whose weights and thresholds the caller replaces.

        The layout comes from converting the trained ANN. A few test images serve as calibration,
        because the thresholds they set are overwritten, and the test loader draws no random numbers.
        """
        images, _ = next(iter(self.datamodule.test_dataloader()))
        return convert_vgg_to_snn(
            self.trained_ann(),
            images[:SKELETON_CALIBRATION_IMAGES],
            timesteps=timesteps,
            output_reduction=self.options.conversion.output_reduction,
        )

    def build_spiking_module(self, network: SpikingNetwork) -> SpikingClassifierModule:
        """Wrap ``network`` in the module that trains and tests it, with the ``snn`` options."""
        snn_options = self.options.snn
        return SpikingClassifierModule(
            network,
            optimizer=instantiate(snn_options.optimizer),
            scheduler=OmegaConf.to_container(snn_options.scheduler, resolve=True),
            num_classes=self.datamodule.num_classes,
            energy_per_mac_pj=self.energy_per_mac_pj,
            energy_per_accumulate_pj=self.energy_per_accumulate_pj,
            statistics_batches=snn_options.statistics_batches,
            neuron_lr_scale=snn_options.get("neuron_lr_scale", 1.0),
        )

    def _check_convertible(self, net: nn.Module) -> None:
        # Random inputs give every layer of an untrained VGG some positive pre-activation in practice,
        # so this raises for an unsupported layout, not for unlucky weights.
        generator = torch.Generator().manual_seed(0)
        height, width = self.datamodule.image_size
        images = torch.randn(4, self.datamodule.in_channels, height, width, generator=generator)
        convert_vgg_to_snn(net.eval(), images, timesteps=1)

    def _example_images(self, count: int) -> torch.Tensor:
        height, width = self.datamodule.image_size
        return torch.zeros(count, self.datamodule.in_channels, height, width)

    def _calibration_images(self, count: int) -> torch.Tensor:
        """Return up to ``count`` images from the training loader, augmented as in training."""
        if count < 1:
            raise ValueError(f"module.conversion.calibration_images must be >= 1, got {count}")
        batches = []
        collected = 0
        for images, _ in self.datamodule.train_dataloader():
            batches.append(images)
            collected += len(images)
            if collected >= count:
                break
        images = torch.cat(batches)[:count]
        if len(images) < count:
            log.warning("only %d training images for calibration, fewer than the %d requested", len(images), count)
        return images


def stage_name(timesteps: int) -> str:
    """Return the name of the spiking stage at T=``timesteps``, such as ``T5``."""
    return f"T{timesteps}"


def _validate_timesteps(timesteps: Any) -> list[int]:
    values = list(timesteps) if timesteps is not None else []
    valid = values and all(isinstance(value, int) and not isinstance(value, bool) and value >= 1 for value in values)
    if not valid or any(later >= earlier for earlier, later in zip(values, values[1:], strict=False)):
        raise ValueError(
            f"module.timesteps={values} is invalid: it must list integers >= 1 in decreasing order, "
            "for example module.timesteps=[5,4,3,2,1]"
        )
    return values
