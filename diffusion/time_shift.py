"""Time-shift sampling: evaluate the model at the timestep that matches the sample's noise level.

Source: Li et al., "Alleviating Exposure Bias in Diffusion Models through Sampling with
Shifted Time Steps" (ICLR 2024), official code github.com/Mingxiao-Li/TS-DPM. During
sampling, the intermediate sample ``x_t`` drifts away from the training distribution of
step ``t`` (exposure bias), and a nearby timestep ``t_s`` describes it better. The rule,
applied to each sample of the batch on its own::

    t_s = argmin over tau in the window of (var(x_t) - (1 - alphabar[tau]))^2

``var(x_t)`` is the unbiased variance over the sample's ``C*H*W`` values. ``1 - alphabar[tau]``
is the noise variance of timestep ``tau``, which ignores the data's own variance, as the
official code does.

The samplers in :mod:`diffusion.samplers` apply it through their ``time_shift`` argument;
see :class:`diffusion.samplers.base.Sampler` for where ``t_s`` enters each update.
"""

from dataclasses import dataclass

import torch

# The places where the shifted timestep can enter a sampler's step (see TimeShift).
PLACEMENTS: tuple[str, ...] = ("sample", "time_input", "end_point")


@dataclass(frozen=True)
class TimeShift:
    """Settings of time-shift sampling.

    Args:
        window: width of the search window in training timesteps. The candidates for a
            scheduled timestep ``t`` are ``t - window // 2`` to ``t + window // 2``, as in the
            official code, further limited by the sampler (see
            :meth:`diffusion.samplers.base.Sampler.shift_window`). 0 disables the shift.
        cutoff: scheduled timesteps at or below ``cutoff`` are never shifted. Near ``t = 0``
            the sample's variance is mostly the data's own, which the rule ignores.
        placement: where the shifted timestep ``t_s`` enters the step (one of
            :data:`PLACEMENTS`):

            - ``"sample"`` (the default) treats the sample as if it were at ``t_s``. The model is
              evaluated at ``t_s``, and the update converts the model output with
              ``alphabar[t_s]`` and moves from ``t_s`` to the next scheduled timestep.
            - ``"time_input"`` only changes the model's time input to ``t_s``. The update keeps
              the scheduled ``alphabar[t]``.
            - ``"end_point"`` moves the update's end point by the shift. The model is evaluated
              at ``t``, and the update goes from ``t`` to ``s + (t_s - t)`` in place of the next
              scheduled timestep ``s``. The step after it starts from ``s`` as scheduled. This is
              the placement of the official DDIM (ADM) code.

    The official settings (window, cutoff) are: F-PNDM with 100 steps (5, 550); DPM-Solver-2
    with 5 steps (30, 300); DEIS with 5 steps (10, 900); DDIM with 5 steps on the cosine
    schedule for ADM on CIFAR-10 (80, 300).
    """

    window: int
    cutoff: int
    placement: str = "sample"

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"time_shift.window must be an integer >= 0 (training timesteps), got {self.window!r}")
        if isinstance(self.cutoff, bool) or not isinstance(self.cutoff, int) or self.cutoff < 0:
            raise ValueError(f"time_shift.cutoff must be an integer >= 0 (a training timestep), got {self.cutoff!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"time_shift.placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")


def select_shifted_timesteps(sample: torch.Tensor, alphabar: torch.Tensor, lowest: int, highest: int) -> torch.Tensor:
    """Pick, for each sample, the timestep in ``[lowest, highest]`` whose noise variance is nearest to its own.

    Args:
        sample: noisy samples, shape ``(B, ...)``.
        alphabar: the schedule, shape ``(N,)``.
        lowest: first candidate timestep, ``0 <= lowest <= highest``.
        highest: last candidate timestep, ``highest < N``.

    Returns:
        The chosen timesteps, int64 of shape ``(B,)`` on ``sample``'s device. Ties go to the
        smaller timestep.
    """
    if not 0 <= lowest <= highest < len(alphabar):
        raise ValueError(
            f"time-shift window [{lowest}, {highest}] must lie within the {len(alphabar)} training timesteps"
        )
    values = sample.detach().flatten(1)
    if values.shape[1] < 2:
        raise ValueError(
            f"time shift needs at least two values per sample to estimate its variance, got samples of shape "
            f"{tuple(sample.shape)}; turn time shift off for such data"
        )
    if values.dtype in (torch.float16, torch.bfloat16):
        # Half precision loses the small variance differences between neighbouring timesteps.
        values = values.float()
    # The (B,) variances are compared on the CPU in float64.
    variance = values.var(dim=1).to("cpu", torch.float64)
    noise_variance = 1.0 - alphabar[lowest : highest + 1].to("cpu", torch.float64)
    distance = (variance[:, None] - noise_variance[None, :]) ** 2
    chosen = lowest + distance.argmin(dim=1)
    return chosen.to(sample.device)
