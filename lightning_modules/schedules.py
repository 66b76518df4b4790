"""Learning-rate schedules with linear warm-up, stepped once per optimizer step.

Stepping per optimizer step (not per epoch) makes warm-up smooth at any batch size,
and the scheduler's state (its step count) is saved in Lightning checkpoints, so a
resumed run continues the schedule where it stopped.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float) -> float:
    """Return the learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_factor``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_multistep_factor(step: int, warmup_steps: int, milestone_steps: Sequence[int], gamma: float) -> float:
    """Return the learning-rate multiplier: linear warm-up to 1, then times ``gamma`` at each milestone passed."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    passed = sum(step >= milestone for milestone in milestone_steps)
    return gamma**passed


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    min_lr_factor: float = 0.0,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    milestone_fractions: Sequence[float] = (),
) -> LambdaLR | None:
    """Build a per-step schedule: ``"cosine"``, ``"multistep"`` or ``"constant"``.

    A multistep schedule takes its milestones either in epochs (``milestones``) or as
    fractions of the whole run (``milestone_fractions``, each in (0, 1]), which stay right
    when the number of epochs changes. Returns None for ``"none"``, which leaves the
    optimizer's learning rate untouched.
    """
    warmup_steps = round(warmup_epochs * steps_per_epoch)

    if name == "none":
        return None
    if name == "constant":
        return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))
    if name == "cosine":
        return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_lr_factor))
    if name == "multistep":
        milestone_steps = multistep_milestone_steps(milestones, milestone_fractions, steps_per_epoch, total_steps)
        return LambdaLR(optimizer, lambda step: warmup_multistep_factor(step, warmup_steps, milestone_steps, gamma))
    raise ValueError(
        f"unknown learning-rate schedule {name!r}; set module.scheduler.name to one of "
        "cosine, multistep, constant, none"
    )


def check_scheduler_options(options: Mapping[str, Any], config_key: str) -> None:
    """Raise now if a multistep schedule's milestones in ``options`` are invalid.

    ``build_scheduler`` would raise too, but only when training starts, which in a
    pipeline can be after earlier stages have run.
    """
    if options.get("name") == "multistep":
        check_milestones(options.get("milestones") or [], options.get("milestone_fractions") or [], config_key)


def check_milestones(milestones: Sequence[float], milestone_fractions: Sequence[float], config_key: str) -> None:
    """Raise if both kinds of milestones are set, or a fraction lies outside (0, 1]."""
    if milestones and milestone_fractions:
        raise ValueError(
            f"{config_key} sets milestones {list(milestones)} (epochs) and milestone_fractions "
            f"{list(milestone_fractions)}; keep one, for example {config_key}.milestone_fractions=[]"
        )
    invalid = [fraction for fraction in milestone_fractions if not 0.0 < fraction <= 1.0]
    if invalid:
        raise ValueError(f"{config_key}.milestone_fractions must lie in (0, 1], got {invalid}")


def multistep_milestone_steps(
    milestones: Sequence[float], milestone_fractions: Sequence[float], steps_per_epoch: int, total_steps: int
) -> list[int]:
    """Return the optimizer steps of the milestones, given in epochs or as fractions of ``total_steps``."""
    check_milestones(milestones, milestone_fractions, "module.scheduler")
    if milestone_fractions:
        return [round(fraction * total_steps) for fraction in milestone_fractions]
    return [round(epoch * steps_per_epoch) for epoch in milestones]
