"""Learning-rate schedules: warm-up, cosine and multistep factors at known steps."""

import math

import pytest
import torch

from lightning_modules.schedules import build_scheduler, warmup_cosine_factor, warmup_multistep_factor


def test_warmup_rises_linearly() -> None:
    factors = [warmup_cosine_factor(step, warmup_steps=4, total_steps=20, min_factor=0.0) for step in range(4)]
    assert factors == [0.25, 0.5, 0.75, 1.0]


def test_cosine_ends_at_min_factor() -> None:
    assert warmup_cosine_factor(20, warmup_steps=4, total_steps=20, min_factor=0.1) == pytest.approx(0.1)


def test_cosine_halfway_is_midpoint() -> None:
    factor = warmup_cosine_factor(12, warmup_steps=4, total_steps=20, min_factor=0.0)
    assert factor == pytest.approx(0.5)


def test_multistep_divides_at_milestones() -> None:
    factors = [warmup_multistep_factor(step, 0, milestone_steps=[10, 15], gamma=0.1) for step in (9, 10, 14, 15)]
    assert factors == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_multistep_milestones_are_epochs() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_scheduler(optimizer, "multistep", total_steps=100, steps_per_epoch=10, milestones=[5])
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    assert math.isclose(optimizer.param_groups[0]["lr"], 0.1)


def test_multistep_milestone_fractions_of_run() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_scheduler(
        optimizer, "multistep", total_steps=200, steps_per_epoch=10, milestone_fractions=[0.5, 0.75], gamma=0.5
    )
    rates = []
    for _ in range(200):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[99] == 1.0
    assert rates[100] == 0.5
    assert rates[149] == 0.5
    assert rates[150] == 0.25


def test_multistep_rejects_both_milestone_kinds() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match="keep one"):
        build_scheduler(
            optimizer, "multistep", total_steps=100, steps_per_epoch=10, milestones=[5], milestone_fractions=[0.5]
        )


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.2])
def test_multistep_rejects_fraction_outside_run(fraction: float) -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match=r"milestone_fractions must lie in \(0, 1\]"):
        build_scheduler(optimizer, "multistep", total_steps=100, steps_per_epoch=10, milestone_fractions=[fraction])


def test_unknown_schedule_names_choices() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match="cosine, multistep, constant, none"):
        build_scheduler(optimizer, "linear", total_steps=10, steps_per_epoch=1)
