"""Polarization-regularized one-pass channel pruning around any backbone.

Weights and channel gates train together in one run (Zhuang et al., "Neuron-level
Structured Pruning using Polarization Regularizer", NeurIPS 2020; Zhi et al., arXiv
2302.10798). The loss is

    cross-entropy + polarization_weight * R(s) + budget_weight * P(kept FLOPs fraction)

where R is the polarization regularizer over every gate score and P pulls the FLOPs
kept by the open gates towards ``1 - flops_reduction``. Once the gates have settled
they are frozen, the closed channels are removed physically, and training continues
on the smaller network to the end of the same run. At the end the extracted network
is tested, and saved with a table of kept channels and plots under
``<run folder>/pruning/``. With ``prune_blocks`` each removable residual branch has a
gate too, and a closed one is removed whole (layer pruning).
"""

import copy
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from lightning_modules.callbacks.flops import example_input_of
from lightning_modules.classifier import ClassifierModule, OptimizerFactory
from pruning import (
    ChannelGates,
    block_costs,
    branch_parameters,
    build_channel_graph,
    channel_costs,
    channel_table,
    dense_macs,
    extract_subnetwork,
    fit_masks_to_budget,
    format_channel_table,
    macs_from_counts,
    polarization_gradient_on_open,
    polarization_regularizer,
    remap_optimizer_state,
    remove_residual_branches,
    reopen_blocks_to_budget,
    round_kept_channels,
    save_pruned,
)
from pruning.checkpoint import model_spec_of
from pruning.report import plot_gate_histograms, plot_kept_channels, save_channel_table

log = logging.getLogger(__name__)

BUDGET_PENALTIES = ("squared", "hinge")
BUDGET_GRADIENTS = ("per_gate", "flops")


def polarization_direction_warning(t: float, open_gradient: float, above_mean: float) -> str:
    """Return the warning for a ``t`` at which R(s) pulls the open gates down, with the ``t`` that would not.

    R separates the gates above the mean only for ``t < 2 * (1 - above_mean)``, ``above_mean``
    being the fraction of scores above their mean.
    """
    bound = 2 * (1 - above_mean)
    advice = f"Lower module.polarization_t below {bound:.3g}"
    if t > 0.5:
        advice += ", for example to 0.5, which separates them while up to 75% of the scores are above their mean"
    return (
        f"[pruning] polarization_t={t} pulls the open gates down towards the threshold (mean dR/ds "
        f"{open_gradient:+.3f} on open gates), so R(s) does not separate them: with {100 * above_mean:.1f}% of "
        f"the scores above their mean it does only for t < {bound:.3g}. {advice}."
    )


class PolarizationModule(ClassifierModule):
    """Train ``net`` with channel gates and a FLOPs budget; return it physically pruned at the end of fit.

    Args (besides those of :class:`ClassifierModule`):
        flops_reduction: fraction of the network's MACs (conv and linear) to remove, in [0, 1).
        polarization_weight: weight of the polarization regularizer R(s) (a sum over all gates).
        polarization_t: ``t`` of R(s). R separates open from closed gates only while
            ``t < 2 * (1 - f)``, ``f`` being the fraction of scores above their mean; a warning
            says when it does not (:func:`pruning.polarization_gradient_on_open`).
        budget_weight: weight of the budget penalty on the kept FLOPs fraction.
        budget_penalty: ``"squared"`` pulls the kept fraction to the target from both sides,
            ``"hinge"`` only penalises keeping more than the target.
        budget_gradient: the penalty's value is always the FLOPs kept by the open gates. With
            ``"flops"`` its gradient pushes each gate in proportion to its channel's cost, which
            on CIFAR ResNets closes whole high-resolution blocks first. ``"per_gate"`` divides
            each group's gradient by its channel cost (times the mean cost), so every gate is
            pushed alike and the task loss decides which channels close.
        budget_ramp_fraction: the budget's target reduction grows linearly from 0 to
            ``flops_reduction`` over this fraction of the training steps, so that the gates
            choose channels on a network that has already learned something. 0 sets the full
            target from the first step. At most ``freeze_max_fraction``.
        gate_lr: learning rate of the gate scores (their own param group, without weight decay);
            the learning-rate schedule scales it like the weights' rate.
        gate_init: initial gate score, in (0.5, 1] so that training starts dense.
        freeze_stable_epochs: freeze once no gate has flipped for this many epochs and the
            FLOPs reduction is within ``freeze_tolerance`` of the target ...
        freeze_tolerance: ... (absolute, as a fraction of dense MACs) ...
        freeze_min_fraction: ... but not before this fraction of ``max_epochs``.
        freeze_max_fraction: freeze at this fraction of ``max_epochs`` at the latest;
            1.0 freezes only at the end of training.
        fit_budget_at_freeze: when the gates freeze outside the budget, close the open channels
            with the lowest scores (or open the closed ones with the highest) until the FLOPs
            reduction is in [flops_reduction, flops_reduction + freeze_tolerance].
        round_to: at the freeze, keep a multiple of this many channels in every group (or all
            of them), chosen by gate score, within the budget; CPU and GPU kernels run odd
            widths slower than their FLOPs suggest. 1 keeps any width.
        prune_blocks: also give each removable residual branch one gate (layer pruning). It is
            trained, regularized and budgeted like the channel gates. A closed block keeps only
            its shortcut, and extraction replaces its layers (:mod:`pruning.blocks`).
        save_model: save the extracted network as ``<run folder>/pruning/pruned_model.pt``.
        init_checkpoint: a trained dense network to start from, in place of random weights
            (see :class:`ClassifierModule`). Its weights load before the gates are built.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: dict[str, Any],
        num_classes: int,
        flops_reduction: float = 0.5,
        polarization_weight: float = 1e-3,
        polarization_t: float = 0.5,
        budget_weight: float = 5.0,
        budget_penalty: str = "squared",
        budget_gradient: str = "per_gate",
        budget_ramp_fraction: float = 0.0,
        gate_lr: float = 0.2,
        gate_init: float = 1.0,
        freeze_stable_epochs: int = 2,
        freeze_tolerance: float = 0.03,
        freeze_min_fraction: float = 0.2,
        freeze_max_fraction: float = 0.5,
        fit_budget_at_freeze: bool = True,
        round_to: int = 1,
        prune_blocks: bool = False,
        save_model: bool = True,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        decay_norm_and_bias: bool = True,
        init_checkpoint: str | None = None,
    ) -> None:
        super().__init__(
            net,
            optimizer,
            scheduler,
            num_classes,
            label_smoothing=label_smoothing,
            channels_last=channels_last,
            decay_norm_and_bias=decay_norm_and_bias,
            init_checkpoint=init_checkpoint,
        )
        if not 0.0 <= flops_reduction < 1.0:
            raise ValueError(f"module.flops_reduction must be in [0, 1), got {flops_reduction}")
        if budget_gradient not in BUDGET_GRADIENTS:
            raise ValueError(
                f"module.budget_gradient must be one of {', '.join(BUDGET_GRADIENTS)}, got {budget_gradient!r}"
            )
        if budget_penalty not in BUDGET_PENALTIES:
            raise ValueError(
                f"module.budget_penalty must be one of {', '.join(BUDGET_PENALTIES)}, got {budget_penalty!r}"
            )
        if not 0.5 < gate_init <= 1.0:
            raise ValueError(f"module.gate_init must be in (0.5, 1] so that every channel starts open, got {gate_init}")
        if not 0.0 <= freeze_min_fraction <= freeze_max_fraction <= 1.0:
            raise ValueError(
                "module.freeze_min_fraction and module.freeze_max_fraction must satisfy 0 <= min <= max <= 1, got "
                f"{freeze_min_fraction} and {freeze_max_fraction}"
            )
        if not 0.0 <= budget_ramp_fraction <= freeze_max_fraction:
            raise ValueError(
                f"module.budget_ramp_fraction must be in [0, module.freeze_max_fraction={freeze_max_fraction}] "
                f"so that the target is complete by the freeze, got {budget_ramp_fraction}. Lower it or raise "
                "module.freeze_max_fraction"
            )
        self.flops_reduction = flops_reduction
        self.budget_ramp_fraction = budget_ramp_fraction
        self.polarization_weight = polarization_weight
        self.polarization_t = polarization_t
        self.budget_weight = budget_weight
        self.budget_penalty = budget_penalty
        self.budget_gradient = budget_gradient
        self.budget_gradient_scale: dict[int, float] | None = None
        self.block_gradient_scale: dict[int, float] | None = None
        self.gate_lr = gate_lr
        self.gate_init = gate_init
        self.freeze_stable_epochs = freeze_stable_epochs
        self.freeze_tolerance = freeze_tolerance
        self.freeze_min_fraction = freeze_min_fraction
        self.freeze_max_fraction = freeze_max_fraction
        self.fit_budget_at_freeze = fit_budget_at_freeze
        if round_to < 1:
            raise ValueError(f"module.round_to must be >= 1 (1 keeps any width), got {round_to}")
        self.round_to = round_to
        self.prune_blocks = prune_blocks
        self.save_model = save_model

        self.graph = None
        self.gates: ChannelGates | None = None
        self.dense_macs = 0.0
        self.dense_params = 0
        # Gate state that checkpoints carry (see on_save_checkpoint).
        self.frozen = False
        self.extracted = False
        # The gates freeze at the start of an epoch or at the end of training, so this 0-based
        # epoch index is also the number of epochs trained before the freeze.
        self.freeze_epoch: int | None = None
        self.reduction_from_gates: float | None = None
        self.keep_masks: dict[int, torch.Tensor] | None = None
        self.removed_blocks: set[int] = set()
        self.stable_epochs = 0
        self.last_masks: dict[int, torch.Tensor] | None = None
        self.last_removed_blocks: set[int] | None = None
        self.score_history: list[tuple[int, torch.Tensor]] = []
        self.warned_polarization_direction = False
        self._report_callback: PruningReportCallback | None = None

    # -- gates -------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.graph is None:
            self.build_gates(example_input_of(self))

    def build_gates(self, example_input: torch.Tensor) -> None:
        """Trace the network on ``example_input``, create one gate per prunable channel and attach them."""
        self.graph = build_channel_graph(self.net, example_input[:1])
        self.dense_macs = dense_macs(self.graph)
        self.dense_params = sum(parameter.numel() for parameter in self.net.parameters())
        self.gates = ChannelGates(self.graph, init=self.gate_init, blocks=self.prune_blocks).to(example_input.device)
        if self.budget_gradient == "per_gate":
            costs = channel_costs(self.graph)
            mean_cost = sum(costs.values()) / max(1, len(costs))
            self.budget_gradient_scale = {index: mean_cost / cost if cost > 0 else 1.0 for index, cost in costs.items()}
            self.block_gradient_scale = {
                index: mean_cost / cost if cost > 0 else 1.0 for index, cost in block_costs(self.graph).items()
            }
        self.gates.attach(self.net)
        log.info(
            "gated %d of %d channel groups (%d gates)%s; dense network: %.4g MACs per sample",
            len(self.graph.prunable_groups),
            len(self.graph.groups),
            sum(group.channels for group in self.graph.prunable_groups),
            f" and {len(self.gates.block_scores)} residual blocks" if self.prune_blocks else "",
            self.dense_macs,
        )
        if self.prune_blocks and not self.graph.blocks:
            rank_zero_warn(
                f"[pruning] prune_blocks=true, but {type(self.net).__name__} has no residual branch that can be "
                "removed whole, so only channels are pruned"
            )

    def kept_flops_fraction(self) -> float:
        """Return the fraction of dense MACs that the open gates (or the extracted network) keep."""
        masks = self.keep_masks if self.gates is None else self.gates.keep_masks()
        removed = self.removed_blocks if self.gates is None else self.gates.removed_blocks()
        kept = {index: float(mask.sum()) for index, mask in (masks or {}).items()}
        return float(macs_from_counts(self.graph, kept, dict.fromkeys(removed, 0.0))) / self.dense_macs

    def cost_model(self) -> tuple[nn.Module, torch.Tensor]:
        """Return the network the cost callbacks count: while gated, an extracted copy with the current gates."""
        example = example_input_of(self)
        if self.gates is None:
            return self, example
        with self.gates.detached(self.net):
            network = copy.deepcopy(self.net)
        extract_subnetwork(network, self.graph, self.gates.keep_masks())
        remove_residual_branches(network, self.graph, self.gates.removed_blocks())
        return network, example

    # -- training ----------------------------------------------------------------------

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        # The classifier computes and logs the cross-entropy and accuracy; the gate terms are added here.
        task_loss = super().training_step(batch, batch_index)
        if self.gates is None or self.frozen:
            # Logged after the freeze too, or the epoch log would repeat the last gated epoch's value.
            self.log(
                "train/total_loss", task_loss, on_step=False, on_epoch=True, batch_size=len(batch[1]), sync_dist=True
            )
            return task_loss

        polarization = polarization_regularizer(self.gates.all_scores(), self.polarization_t)
        counts = self.gates.kept_counts(straight_through=True, gradient_scale=self.budget_gradient_scale)
        blocks = self.gates.block_states(gradient_scale=self.block_gradient_scale)
        kept_macs = macs_from_counts(self.graph, counts, blocks)
        kept_fraction = kept_macs / self.dense_macs
        target_reduction = self.target_reduction()
        excess = kept_fraction - (1.0 - target_reduction)
        if self.budget_penalty == "hinge":
            excess = excess.clamp(min=0.0)
        budget = excess.square()
        loss = task_loss + self.polarization_weight * polarization + self.budget_weight * budget

        batch_size = len(batch[1])
        epoch_options = {"on_step": False, "on_epoch": True, "batch_size": batch_size, "sync_dist": True}
        self.log("pruning/polarization", polarization, **epoch_options)
        self.log("pruning/budget_penalty", budget, **epoch_options)
        self.log("train/total_loss", loss, **epoch_options)
        self.log("pruning/kept_flops_fraction", kept_fraction.detach(), on_step=True, batch_size=batch_size)
        self.log("pruning/target_reduction", target_reduction, on_step=True, batch_size=batch_size)
        return loss

    def target_reduction(self) -> float:
        """Return the FLOPs reduction that the budget penalty pulls towards at the current step."""
        if self.budget_ramp_fraction <= 0.0 or self._trainer is None:
            return self.flops_reduction
        progress = self.trainer.global_step / max(1.0, float(self.trainer.estimated_stepping_batches))
        return self.flops_reduction * min(1.0, progress / self.budget_ramp_fraction)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_index: int) -> None:
        if self.gates is not None:
            self.gates.clamp_()

    def on_train_epoch_start(self) -> None:
        # Freezing at the start of an epoch (not the end of the previous one) makes a run
        # resumed from an end-of-epoch checkpoint take the same decision.
        if self.gates is not None and not self.frozen and self._settled():
            self.freeze()

    def on_train_epoch_end(self) -> None:
        if self.gates is None or self.frozen:
            return
        masks = self.gates.keep_masks()
        removed = self.gates.removed_blocks()
        flips = 0
        if self.last_masks is not None:
            flips = sum(int((masks[index] != self.last_masks[index]).sum()) for index in masks)
            flips += len(removed ^ (self.last_removed_blocks or set()))
        self.stable_epochs = self.stable_epochs + 1 if self.last_masks is not None and flips == 0 else 0
        self.last_masks = masks
        self.last_removed_blocks = removed
        self.score_history.append((self.current_epoch, self.gates.all_scores().detach().cpu().clone()))
        self.log("pruning/flips", float(flips), sync_dist=True)
        self.log("pruning/flops_reduction", 1.0 - self.kept_flops_fraction(), sync_dist=True)
        self._check_polarization_direction()

    def _check_polarization_direction(self) -> None:
        scores = self.gates.all_scores().detach()
        open_gradient = polarization_gradient_on_open(scores, self.polarization_t)
        if open_gradient is None:
            return
        self.log("pruning/polarization_gradient_open", open_gradient, sync_dist=True)
        if open_gradient <= 0.0 or self.warned_polarization_direction:
            return
        above_mean = float((scores > scores.mean()).float().mean())
        rank_zero_warn(polarization_direction_warning(self.polarization_t, open_gradient, above_mean))
        self.warned_polarization_direction = True

    def _settled(self) -> bool:
        max_epochs = self.trainer.max_epochs or 1
        progress = self.current_epoch / max_epochs
        if progress >= self.freeze_max_fraction:
            return True
        if progress < self.freeze_min_fraction or self.stable_epochs < self.freeze_stable_epochs:
            return False
        return abs((1.0 - self.kept_flops_fraction()) - self.flops_reduction) <= self.freeze_tolerance

    def freeze(self) -> None:
        """Fix the gates and remove the closed channels; training then continues on the smaller network.

        Under DDP the network cannot change shape inside the wrapper, so the gates only
        stop learning (learning rate zero) and extraction waits until the end of fit.
        """
        trainer = self._trainer
        self.frozen = True
        self.freeze_epoch = self.current_epoch if trainer is not None else None
        self.reduction_from_gates = 1.0 - self.kept_flops_fraction()
        scores = {int(index): score for index, score in self.gates.scores.items()}
        masks = self.gates.keep_masks()
        removed = self.gates.removed_blocks()
        if self.fit_budget_at_freeze:
            masks = fit_masks_to_budget(self.graph, scores, self.flops_reduction, self.freeze_tolerance, removed)
            removed = self._reopen_blocks_to_budget(masks, removed)
            masks = fit_masks_to_budget(self.graph, scores, self.flops_reduction, self.freeze_tolerance, removed)
        if self.round_to > 1:
            masks = round_kept_channels(
                self.graph, scores, masks, self.round_to, self.flops_reduction, self.freeze_tolerance, removed
            )
        if self.fit_budget_at_freeze or self.round_to > 1:
            with torch.no_grad():
                for index, mask in masks.items():
                    # Moves only the scores on the wrong side of the threshold, just across it.
                    score = self.gates.scores[str(index)]
                    score.copy_(torch.where(mask.to(score.device), score.clamp(min=0.51), score.clamp(max=0.49)))
        if trainer is not None and trainer.world_size > 1:
            self._stop_gate_learning(trainer)
        else:
            self.extract(trainer.optimizers if trainer is not None else [])
        reduction = 1.0 - self.kept_flops_fraction()
        if trainer is not None:
            # Frozen gates log no more reductions, so this value, fitted to the budget, is the
            # last one W&B shows. self.log is not allowed in on_train_end, where a freeze may run.
            for logger in trainer.loggers:
                logger.log_metrics({"pruning/flops_reduction": reduction}, step=trainer.global_step)
        blocks = ""
        if self.prune_blocks and self.graph.blocks:
            blocks = f", {len(removed)} of {len(self.graph.blocks)} residual blocks removed"
        rank_zero_info(
            f"[pruning] gates frozen after {_epochs_text(self.freeze_epoch)}: FLOPs reduction {100 * reduction:.1f}% "
            f"(target {100 * self.flops_reduction:.1f}%){blocks}"
        )

    def _reopen_blocks_to_budget(self, masks: dict[int, torch.Tensor], removed: set[int]) -> set[int]:
        """Reopen removed blocks whose closing overshot the budget; move their scores just above the threshold."""
        block_scores = {int(index): float(score.detach()) for index, score in self.gates.block_scores.items()}
        still_removed = reopen_blocks_to_budget(
            self.graph, masks, block_scores, removed, self.flops_reduction, self.freeze_tolerance
        )
        with torch.no_grad():
            for index in removed - still_removed:
                self.gates.block_scores[str(index)].fill_(0.51)
        return still_removed

    def extract(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Remove closed channels from the network in place and slice the optimizers' state to match."""
        if self.gates is None:
            return
        masks = self.gates.keep_masks()
        removed_blocks = self.gates.removed_blocks()
        # Collected before extraction, because the optimizers hold the dense network's parameters.
        dropped = set(self.gates.parameters()) | branch_parameters(self.net, self.graph, removed_blocks)
        self.gates.detach_from(self.net)
        extraction = extract_subnetwork(self.net, self.graph, masks)
        remove_residual_branches(self.net, self.graph, removed_blocks)
        for optimizer in optimizers:
            remap_optimizer_state(optimizer, extraction, removed=dropped)
        self.gates = None
        self.keep_masks = masks
        self.removed_blocks = removed_blocks
        self.frozen = True
        self.extracted = True
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    def _stop_gate_learning(self, trainer: L.Trainer) -> None:
        gate_parameters = set(self.gates.parameters())
        for optimizer in trainer.optimizers:
            for index, group in enumerate(optimizer.param_groups):
                if any(parameter in gate_parameters for parameter in group["params"]):
                    group["lr"] = 0.0
                    for config in trainer.lr_scheduler_configs:
                        if hasattr(config.scheduler, "base_lrs"):
                            config.scheduler.base_lrs[index] = 0.0

    def _parameter_groups(self) -> list[dict[str, Any]]:
        parameters = [parameter for parameter in self.net.parameters() if parameter.requires_grad]
        if self.decay_norm_and_bias:
            groups = [{"params": parameters}]
        else:
            groups = [
                {"params": [p for p in parameters if p.ndim > 1]},
                {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0},
            ]
        # The gate group exists even when empty (after extraction), so a checkpoint's
        # optimizer state fits the module whether it was saved before or after extraction.
        gate_parameters = list(self.gates.parameters()) if self.gates is not None else []
        groups.append({"params": gate_parameters, "lr": self.gate_lr, "weight_decay": 0.0})
        return groups

    # -- checkpoints -------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["polarization"] = {
            "input_shape": list(self.graph.input_shape) if self.graph is not None else None,
            "frozen": self.frozen,
            "extracted": self.extracted,
            "freeze_epoch": self.freeze_epoch,
            "reduction_from_gates": self.reduction_from_gates,
            "keep_masks": {str(index): mask for index, mask in (self.keep_masks or {}).items()},
            "removed_blocks": sorted(self.removed_blocks),
            "stable_epochs": self.stable_epochs,
            "last_masks": {str(index): mask for index, mask in (self.last_masks or {}).items()},
            "last_removed_blocks": None if self.last_removed_blocks is None else sorted(self.last_removed_blocks),
            "score_history": [[epoch, scores] for epoch, scores in self.score_history],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("polarization")
        if state is None:
            return
        if self.graph is None:
            if state["input_shape"] is None:
                raise ValueError("checkpoint has no pruning input shape, so its gates cannot be rebuilt")
            self.build_gates(torch.zeros(state["input_shape"], device=self.device))
        self._check_block_gates_match(checkpoint, state)
        if state["extracted"] and not self.extracted:
            # Rebuild the extracted architecture, so the checkpoint's smaller tensors fit.
            masks = {int(index): mask.bool() for index, mask in state["keep_masks"].items()}
            removed_blocks = set(state.get("removed_blocks", []))
            with torch.no_grad():
                for index, mask in masks.items():
                    self.gates.scores[str(index)].copy_(mask.float())
                for index, score in self.gates.block_scores.items():
                    score.fill_(0.0 if int(index) in removed_blocks else 1.0)
            self.extract([])
        elif self.extracted and not state["extracted"]:
            raise ValueError(
                "cannot load a checkpoint of the gated network into a module whose network is already extracted"
            )
        self.frozen = state["frozen"]
        self.freeze_epoch = state["freeze_epoch"]
        self.reduction_from_gates = state["reduction_from_gates"]
        self.stable_epochs = state["stable_epochs"]
        self.last_masks = {int(index): mask for index, mask in state["last_masks"].items()} or None
        last_removed = state.get("last_removed_blocks")
        self.last_removed_blocks = None if last_removed is None else set(last_removed)
        self.score_history = [(int(epoch), scores) for epoch, scores in state["score_history"]]

    def _check_block_gates_match(self, checkpoint: dict[str, Any], state: dict[str, Any]) -> None:
        """Raise, naming the setting to change, when the checkpoint and this module disagree on block gates."""
        block_gated = bool(state.get("removed_blocks")) or any(
            ".block_scores." in key for key in checkpoint.get("state_dict", {})
        )
        if block_gated and not self.prune_blocks:
            raise ValueError(
                "the checkpoint was trained with gates on residual blocks, but this module has prune_blocks=false; "
                "set module.prune_blocks=true to load it"
            )
        # After extraction no gate is left, so only a gated checkpoint lacks the block scores this module expects.
        if not block_gated and not state.get("extracted") and self.prune_blocks and self.graph.blocks:
            raise ValueError(
                "the checkpoint was trained without gates on residual blocks, but this module has "
                "prune_blocks=true; set module.prune_blocks=false to load it"
            )

    # -- outputs -----------------------------------------------------------------------

    def configure_callbacks(self) -> list[L.Callback]:
        # Lightning replaces the callback on every fit and test; returning the same
        # instance keeps the report of the fit for the summary after test.
        if self._report_callback is None:
            self._report_callback = PruningReportCallback()
        return [self._report_callback]

    def pruning_report(self) -> dict[str, Any]:
        """Return target and achieved reductions of the extracted network (MACs per sample and parameters)."""
        pruned_macs = self.kept_flops_fraction() * self.dense_macs
        pruned_params = sum(parameter.numel() for parameter in self.net.parameters())
        return {
            "pruning_flops_reduction_target": self.flops_reduction,
            "pruning_flops_reduction": 1.0 - pruned_macs / self.dense_macs,
            # Before fit_budget_at_freeze adjusted the gates; equal to the above when it did not.
            "pruning_flops_reduction_from_gates": self.reduction_from_gates,
            "pruning_params_reduction": 1.0 - pruned_params / self.dense_params,
            "pruning_dense_macs_per_sample": self.dense_macs,
            "pruning_macs_per_sample": pruned_macs,
            "pruning_dense_params": self.dense_params,
            "pruning_params": pruned_params,
            "pruning_freeze_epoch": self.freeze_epoch,
            **self._blocks_report(),
        }

    def _blocks_report(self) -> dict[str, int]:
        if not self.prune_blocks:
            return {}
        return {"pruning_blocks_removed": len(self.removed_blocks), "pruning_blocks": len(self.graph.blocks)}


class PruningReportCallback(L.Callback):
    """Extract the network at the end of training, save it with a channel table and plots, and summarise.

    Files go to ``<trainer.default_root_dir>/pruning/``: ``pruned_model.pt`` (load it with
    :func:`pruning.load_pruned`), ``channels.txt`` and ``channels.csv``,
    ``gate_histograms.png`` and ``kept_channels.png``. Plots are also logged to W&B
    when a ``WandbLogger`` is present.
    """

    def __init__(self) -> None:
        self.report: dict[str, Any] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: PolarizationModule) -> None:
        if pl_module.gates is None:
            return
        scores = pl_module.gates.all_scores().detach().cpu().numpy()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.log_metrics({"pruning/gate_scores": wandb.Histogram(scores)}, step=trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: PolarizationModule) -> None:
        if not pl_module.frozen:
            pl_module.freeze()
        if not pl_module.extracted:
            pl_module.extract(trainer.optimizers)
        self.report = pl_module.pruning_report()
        self._write_outputs(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: PolarizationModule) -> None:
        # A run resumed from a checkpoint of a finished fit, or one that only tests, skips
        # on_train_end; its report comes from the restored, extracted network.
        if not self.report and pl_module.extracted:
            self.report = pl_module.pruning_report()
            self._write_outputs(trainer, pl_module)

    @rank_zero_only
    def _write_outputs(self, trainer: L.Trainer, pl_module: PolarizationModule) -> None:
        folder = Path(trainer.default_root_dir) / "pruning"
        folder.mkdir(parents=True, exist_ok=True)
        rows = channel_table(pl_module.graph, pl_module.keep_masks or {}, pl_module.removed_blocks)
        table = format_channel_table(rows)
        (folder / "channels.txt").write_text(table + "\n")
        save_channel_table(rows, folder / "channels.csv")
        self.report["pruning_channels_table"] = str(folder / "channels.txt")

        images = {"pruning/kept_channels": plot_kept_channels(rows, folder / "kept_channels.png")}
        history = [(epoch, scores.numpy()) for epoch, scores in pl_module.score_history]
        if history:
            images["pruning/gate_histograms"] = plot_gate_histograms(history, folder / "gate_histograms.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for key, path in images.items():
                    logger.log_image(key=key, images=[str(path)], step=trainer.global_step)

        if pl_module.save_model:
            try:
                spec = model_spec_of(pl_module.net)
            except ValueError as error:
                log.warning("pruned model not saved: %s", error)
            else:
                report = {key: value for key, value in self.report.items() if value is not None}
                path = save_pruned(folder / "pruned_model.pt", pl_module.net, spec=spec, report=report)
                self.report["pruning_model_path"] = str(path)

        log.info("kept channels per layer (%s):\n%s", folder / "channels.txt", table)
        log.info(
            "pruning: FLOPs reduction %.1f%% (target %.1f%%), parameter reduction %.1f%%, gates frozen after %s",
            100 * self.report["pruning_flops_reduction"],
            100 * self.report["pruning_flops_reduction_target"],
            100 * self.report["pruning_params_reduction"],
            _epochs_text(self.report["pruning_freeze_epoch"]),
        )

    def summary(self) -> dict[str, Any]:
        """Return target and achieved FLOPs and parameter reductions, and where the outputs are, for the run summary."""
        return {key: value for key, value in self.report.items() if value is not None and not _is_nan(value)}

    def summary_rows(self) -> list[tuple[str, str]]:
        """Return the pruning lines of the terminal summary: reductions against the target, and the saved files."""
        report = self.report
        if "pruning_flops_reduction" not in report:
            return []
        achieved, target = report["pruning_flops_reduction"], report["pruning_flops_reduction_target"]
        dense_macs_text = f"{report['pruning_dense_macs_per_sample'] / 1e6:.3f} M MACs"
        rows = [
            ("FLOPs reduction", f"{100 * achieved:.1f} % (target {100 * target:.1f} %; dense {dense_macs_text})"),
            (
                "parameter reduction",
                f"{100 * report['pruning_params_reduction']:.1f} % (dense {report['pruning_dense_params']:,})",
            ),
            ("gates frozen after", _epochs_text(report["pruning_freeze_epoch"])),
        ]
        if report.get("pruning_blocks") == 0:
            rows.append(("residual blocks removed", "none: the network has no removable residual block"))
        elif report.get("pruning_blocks_removed") is not None:
            rows.append(
                ("residual blocks removed", f"{report['pruning_blocks_removed']} of {report['pruning_blocks']}")
            )
        if "pruning_channels_table" in report:
            rows.append(("kept channels per layer", report["pruning_channels_table"]))
        if "pruning_model_path" in report:
            rows.append(("pruned model", f"{report['pruning_model_path']} (pruning.load_pruned)"))
        return rows


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _epochs_text(epochs: int | None) -> str:
    """Return "1 epoch" or "N epochs", or "an unknown number of epochs" for a freeze outside a Trainer."""
    if epochs is None:
        return "an unknown number of epochs"
    return f"{epochs} epoch" if epochs == 1 else f"{epochs} epochs"
