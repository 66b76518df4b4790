"""SlimFlow as one command: teacher, reflow pairs, Annealing Reflow, Flow-Guided Distillation.

Zhu et al., "SlimFlow: Training Smaller One-Step Diffusion Models with Rectified Flow"
(ECCV 2024). The stages, each resumable (see :mod:`lightning_modules.pipeline`):

- ``teacher``: train a 1-rectified flow of ``module.teacher.model`` on ``cfg.data``, or,
  with ``module.teacher_checkpoint``, use that flow checkpoint and train nothing.
- ``pairs``: draw noise and solve the teacher's ODE (RK45 or Euler) to write
  ``module.pairs.num_pairs`` pairs in shards. Complete shards are kept on resume.
- ``annealing_reflow``: train the student (``cfg.model``) from scratch on the pairs, with
  beta annealed from 1 to 0 over ``anneal_steps`` and joint horizontal flips.
- ``distillation``: start from the reflow student, guide with a frozen copy of its EMA,
  and train the one-step prediction with both terms.

``module.variant=baseline`` is the ablation: plain reflow (beta = 0 throughout, no flips)
and plain one-step distillation (term 1 only), with every budget unchanged.
"""

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion.rectified_flow import network_velocity, sample_flow
from diffusion.reflow_pairs import generate_reflow_pairs
from diffusion.slimflow import check_distance, describe_distance
from lightning_modules.diffusion import check_denoiser, save_grid, to_uint8
from lightning_modules.pipeline import (
    Pipeline,
    Stage,
    StageContext,
    StageResult,
    run_lightning_stage,
)
from lightning_modules.run_summary import describe_run, save_summary
from lightning_modules.setup_run import instantiate_user_object
from lightning_modules.slimflow import (
    CHECKPOINT_KEY,
    EMA_STATE_PREFIX,
    FlowDistillationModule,
    RectifiedFlowModule,
    ReflowPairDataModule,
    copy_for_guide,
    load_flow_model,
    save_flow_checkpoint,
)
from models.unet import check_min_group_channels, stored_min_group_channels

log = logging.getLogger(__name__)

VARIANTS = ("slimflow", "baseline")
PAIRS_FOLDER = "pairs"
REPORT_FILE = "slimflow_report.json"


class SlimFlowPipeline(Pipeline):
    """The SlimFlow stages ``teacher``, ``pairs``, ``annealing_reflow`` and ``distillation``.

    It reads ``cfg.module`` (configs/module/slimflow.yaml) and builds the student from
    ``cfg.model`` and the teacher from ``cfg.module.teacher.model``; both must be made by
    :func:`models.create_model` and take ``(x, timesteps)``.
    """

    name = "slimflow"
    stage_length_keys = (
        "module.teacher.max_steps",
        "module.annealing_reflow.max_steps",
        "module.distillation.max_steps",
    )
    ignored_trainer_keys = ("trainer.max_epochs", "trainer.max_steps")

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        if not cfg.get("train", True) or not cfg.get("test", True):
            raise ValueError(
                "the SlimFlow pipeline always trains and tests each stage, so train=false and test=false are not "
                "supported. To print the results of a finished pipeline, run it again with ckpt_path=<its folder>"
            )
        self.options = cfg.module
        if self.options.variant not in VARIANTS:
            raise ValueError(f"module.variant={self.options.variant!r} is invalid; use one of {', '.join(VARIANTS)}")
        self.baseline = self.options.variant == "baseline"
        self.distance = OmegaConf.to_container(self.options.distance, resolve=True)
        # Raises now, not after the teacher has trained, for an unknown distance or missing LPIPS weights.
        check_distance(self.distance["name"], self.distance.get("vgg_weights"))
        self.datamodule = instantiate_user_object(cfg.data)
        # Raises now, not after the teacher has trained, for a student that takes no timesteps.
        check_denoiser(self._build_network(cfg.model), "slimflow")
        self.parameter_counts: dict[str, int] = {}

    def stages(self) -> list[Stage]:
        return [
            Stage("teacher", self.run_teacher_stage),
            Stage("pairs", self.run_pairs_stage),
            Stage("annealing_reflow", self.run_reflow_stage),
            Stage("distillation", self.run_distillation_stage),
        ]

    # ----------------------------------------------------------------------------------
    # Stages

    def run_teacher_stage(self, context: StageContext) -> StageResult:
        """Train the 1-rectified-flow teacher, or record the user's ``teacher_checkpoint``."""
        given_checkpoint = self.options.get("teacher_checkpoint")
        if given_checkpoint:
            path = Path(given_checkpoint).expanduser()
            loaded = load_flow_model(path)
            if tuple(loaded.image_shape) != self._image_shape():
                raise ValueError(
                    f"module.teacher_checkpoint={path} makes images of shape {tuple(loaded.image_shape)}, but the "
                    f"data are {self._image_shape()}; pass a teacher trained on this data set"
                )
            summary = {
                "teacher_checkpoint": str(path),
                "trained": False,
                "parameters": _count_parameters(loaded.net),
                "stage": context.name,
            }
            log.info("teacher: using the given checkpoint %s, so no teacher is trained", path)
            return StageResult(checkpoint=path, summary=summary)

        teacher = self.options.teacher
        net = self._build_network(teacher.model)
        module = RectifiedFlowModule(
            net,
            optimizer=instantiate(self.options.optimizer),
            warmup_steps=teacher.warmup_steps,
            ema_decay=teacher.ema_decay,
            role="teacher",
            sampling={"num_steps": teacher.grid_euler_steps, "num_samples": self.options.grid_samples},
        )
        summary = self._fit(context, module, self.datamodule, teacher.max_steps)
        summary["trained"] = True
        summary["parameters"] = _count_parameters(net)
        return StageResult(checkpoint=save_flow_checkpoint(module, context.folder), summary=summary)

    def run_pairs_stage(self, context: StageContext) -> StageResult:
        """Write the teacher's reflow pairs in shards; shards of an earlier attempt are kept."""
        # NOTE: the pairs stage runs in one process. Under DDP every rank would write the same
        # shard files at once, so it stops here rather than corrupt them.
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1:
            raise ValueError(
                f"the SlimFlow pairs stage does not support several processes (WORLD_SIZE={world_size}); "
                "run the pipeline with trainer.devices=1, or generate the pairs first with one process and "
                "resume the pipeline with ckpt_path=<run folder>"
            )
        options = self.options.pairs
        teacher = load_flow_model(self.stage_checkpoint("teacher")).net
        device = _stage_device(self.cfg)
        teacher = teacher.to(device)
        velocity = network_velocity(teacher)
        evaluations: list[int] = []
        num_pairs, solver_name, num_steps = options.num_pairs, options.solver, options.num_steps
        if self.cfg.trainer.get("fast_dev_run"):
            # A smoke test runs one batch of everything. One Euler step stands in for the solver,
            # because an adaptive solve through an untrained paper-scale teacher takes hours on a CPU.
            num_pairs, solver_name, num_steps = min(num_pairs, 2 * options.shard_size, 64), "euler", 1

        def teacher_map(z0: torch.Tensor) -> torch.Tensor:
            x1, count = sample_flow(velocity, z0, solver_name, num_steps, rtol=options.rtol, atol=options.atol)
            evaluations.append(count)
            return x1.clamp(-1.0, 1.0) if options.clamp else x1

        solver = _describe_solver(options)
        if self.cfg.trainer.get("fast_dev_run"):
            solver = "Euler, 1 step (fast_dev_run)"
        start = time.perf_counter()
        shards = generate_reflow_pairs(
            teacher_map,
            context.folder / PAIRS_FOLDER,
            num_pairs,
            shard_size=options.shard_size,
            image_shape=self._image_shape(),
            base_seed=options.seed,
            batch_size=options.batch_size,
            device=device,
            description={"teacher": str(self.stage_checkpoint("teacher")), "solver": solver},
        )
        summary = {
            # The run's task, technique and model, so that a report places the stage with its pipeline.
            **describe_run(self.cfg),
            "stage": context.name,
            "num_pairs": num_pairs,
            "shards": len(shards),
            "solver": solver,
            "mean_evaluations_per_batch": sum(evaluations) / len(evaluations) if evaluations else None,
            "wall_time_s": time.perf_counter() - start,
        }
        save_summary(summary, context.folder)
        return StageResult(checkpoint=context.folder / PAIRS_FOLDER / "pairs.json", summary=summary)

    def run_reflow_stage(self, context: StageContext) -> StageResult:
        """Train the student from scratch on the pairs: Annealing Reflow, or plain reflow for the baseline."""
        options = self.options.annealing_reflow
        net = self._build_network(self.cfg.model)
        anneal_steps = 0 if self.baseline else options.anneal_steps
        flip_probability = 0.0 if self.baseline else options.flip_probability
        module = RectifiedFlowModule(
            net,
            optimizer=instantiate(self.options.optimizer),
            warmup_steps=options.warmup_steps,
            ema_decay=options.ema_decay,
            role="reflow_student",
            sampling={"num_steps": 1, "num_samples": self.options.grid_samples},
            anneal_steps=anneal_steps,
            beta_schedule=options.beta_schedule,
            flip_probability=flip_probability,
        )
        summary = self._fit(context, module, self._pair_datamodule(), options.max_steps)
        summary.update(
            {"variant": self.options.variant, "anneal_steps": anneal_steps, "beta_schedule": options.beta_schedule}
        )
        summary["flip_probability"] = flip_probability
        summary["parameters"] = _count_parameters(net)
        return StageResult(checkpoint=save_flow_checkpoint(module, context.folder), summary=summary)

    def run_distillation_stage(self, context: StageContext) -> StageResult:
        """Distil the reflow student to one step, guided by a frozen copy of its EMA unless the baseline runs."""
        options = self.options.distillation
        reflow_path = self.stage_checkpoint("annealing_reflow")
        reflow_ema = self._build_network(self.cfg.model)
        reflow = torch.load(reflow_path, map_location="cpu", weights_only=True)
        stored_rule = stored_min_group_channels((reflow.get(CHECKPOINT_KEY) or {}).get("model_spec"))
        check_min_group_channels(stored_rule, reflow_ema, f"the annealing_reflow stage ({reflow_path})")
        reflow_ema.load_state_dict(_strip_prefix(reflow["state_dict"], EMA_STATE_PREFIX))
        student = copy_for_guide(reflow_ema).train().requires_grad_(True)
        flow_guidance = not self.baseline and options.flow_guidance
        module = FlowDistillationModule(
            student,
            guide=copy_for_guide(reflow_ema),
            optimizer=instantiate(self.options.optimizer),
            warmup_steps=options.warmup_steps,
            ema_decay=options.ema_decay,
            role="one_step_student",
            sampling={"num_steps": 1, "num_samples": self.options.grid_samples},
            distance=self.distance,
            flow_guidance=flow_guidance,
            t_prime_range=tuple(options.t_prime_range),
        )
        with warnings.catch_warnings():
            # Lightning warns at fit start about every module not in train mode, but the
            # guide is frozen in eval mode on purpose. The filter ends with this stage.
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            summary = self._fit(context, module, self._pair_datamodule(), options.max_steps)
        summary.update({"variant": self.options.variant, "flow_guidance": flow_guidance})
        summary["distance"] = describe_distance(self.distance["name"])
        summary["parameters"] = _count_parameters(student)
        return StageResult(checkpoint=save_flow_checkpoint(module, context.folder), summary=summary)

    # ----------------------------------------------------------------------------------
    # Report

    def report(self, wall_time_s: float) -> dict[str, Any]:
        """Save a grid of one-step student samples and the run summary; return the summary."""
        student = load_flow_model(self.stage_checkpoint("distillation"))
        teacher = load_flow_model(self.stage_checkpoint("teacher"))
        noise = torch.randn(
            (self.options.grid_samples, *student.image_shape), generator=torch.Generator().manual_seed(0)
        )
        samples, _ = sample_flow(network_velocity(student.net), noise, "euler", 1)
        grid = save_grid(to_uint8(samples.clamp(-1, 1)), self.folder / "samples" / "one_step_student.png")

        stage_summaries = {name: self.state.stages[name].summary for name in self.stage_names}
        distillation = stage_summaries["distillation"]
        summary: dict[str, Any] = {
            "slimflow/variant": self.options.variant,
            "slimflow/distance": describe_distance(self.distance["name"]),
            "slimflow/teacher_parameters": _count_parameters(teacher.net),
            "slimflow/student_parameters": _count_parameters(student.net),
            "slimflow/student_checkpoint": str(self.stage_checkpoint("distillation")),
            "slimflow/pair_solver": stage_summaries["pairs"].get("solver"),
            "slimflow/num_pairs": stage_summaries["pairs"].get("num_pairs"),
            "slimflow/one_step_grid": str(grid),
            "test/one_step_distance": distillation.get("test/one_step_distance"),
            "pipeline_dir": str(self.folder),
            "wall_time_s": wall_time_s,
        }
        distance = summary["test/one_step_distance"]
        distance_text = "not measured"
        if distance is not None:
            distance_text = f"{distance:.4g} to the teacher's images, on held-out pairs"
        rows = [
            ("pipeline", str(self.folder)),
            ("teacher", f"{summary['slimflow/teacher_parameters']:,} parameters"),
            ("one-step student", f"{summary['slimflow/student_parameters']:,} parameters"),
            ("one-step distance", distance_text),
            ("  distance", summary["slimflow/distance"]),
            ("one-step samples", str(grid)),
        ]
        width = max(len(label) for label, _ in rows)
        lines = [f"  {label:<{width}}  {value}" for label, value in rows]
        log.info("SlimFlow (%s) results\n%s", self.options.variant, "\n".join(lines))
        (self.folder / REPORT_FILE).write_text(
            json.dumps({"summary": summary, "stages": stage_summaries}, indent=2, default=str) + "\n"
        )
        save_summary(summary, self.folder)
        output_dir = Path(self.cfg.paths.output_dir)
        if output_dir.resolve() != self.folder.resolve():
            save_summary(summary, output_dir)
        return summary

    # ----------------------------------------------------------------------------------
    # Helpers

    def _fit(self, context: StageContext, module: Any, datamodule: Any, max_steps: int) -> dict[str, Any]:
        # Stage budgets are optimizer steps; epochs run until max_steps is reached.
        with open_dict(context.config):
            context.config.trainer.max_steps = int(max_steps)
            context.config.trainer.max_epochs = -1
        return run_lightning_stage(context, module, datamodule)

    def _build_network(self, model_cfg: DictConfig) -> torch.nn.Module:
        return instantiate_user_object(
            model_cfg, in_channels=self.datamodule.in_channels, num_classes=self.datamodule.num_classes
        )

    def _image_shape(self) -> tuple[int, int, int]:
        height, width = self.datamodule.image_size
        return int(self.datamodule.in_channels), int(height), int(width)

    def _pair_datamodule(self) -> ReflowPairDataModule:
        holdout = self.options.pairs.holdout
        if self.cfg.trainer.get("fast_dev_run"):
            # The pairs stage of a smoke test writes at most 64 pairs, so a quarter of them validate.
            holdout = min(holdout, self.stage_record("pairs").summary["num_pairs"] // 4)
        return ReflowPairDataModule(
            self.stage_folder("pairs") / PAIRS_FOLDER, batch_size=self.options.batch_size, holdout=holdout
        )


def _describe_solver(options: DictConfig) -> str:
    if options.solver == "rk45":
        return f"RK45 (scipy), rtol {options.rtol}, atol {options.atol}"
    return f"Euler, {options.num_steps} steps"


def _stage_device(cfg: DictConfig) -> torch.device:
    accelerator = cfg.trainer.get("accelerator", "auto")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    stripped = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if not stripped:
        raise ValueError(f"the reflow stage's weights have no entries under {prefix!r}")
    return stripped


def _count_parameters(net: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in net.parameters())
