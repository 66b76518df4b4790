"""Noise schedules of discrete-time diffusion models, as alphabar arrays.

A schedule over ``N`` training timesteps is a float64 tensor ``alphabar`` of shape ``(N,)``.
Timestep ``t`` (0-based) noises data as ``x_t = sqrt(alphabar[t]) * x0 + sqrt(1 - alphabar[t]) * noise``,
so ``alphabar`` falls strictly from just below 1 at ``t = 0`` towards 0 at ``t = N - 1``.
The signal-to-noise ratio is ``alphabar / (1 - alphabar)``.

Schedules by name (:func:`make_schedule`):

- ``"linear"``: betas linear from 1e-4 to 0.02, as in DDPM (Ho et al., "Denoising Diffusion
  Probabilistic Models", 2020).
- ``"cosine"``: ``alphabar(t) = cos^2((t / N + s) / (1 + s) * pi / 2)``, normalised to 1 at
  ``t = 0``, with betas clipped at 0.999 (Nichol & Dhariwal, "Improved Denoising Diffusion
  Probabilistic Models", 2021).
- ``"scaled_linear"``: square roots of the betas linear from sqrt(0.00085) to sqrt(0.012),
  as in Stable Diffusion.

Any of them can be rescaled to zero terminal SNR (:func:`rescale_zero_terminal_snr`).
"""

import math
from collections.abc import Callable

import torch

ScheduleFactory = Callable[..., torch.Tensor]


def alphabar_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """Return the cumulative product of ``1 - betas`` in float64, shape ``(N,)``."""
    betas = betas.to(torch.float64)
    if betas.ndim != 1 or len(betas) == 0:
        raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(f"every beta must be in (0, 1), got values from {betas.min().item()} to {betas.max().item()}")
    return torch.cumprod(1.0 - betas, dim=0)


def linear_schedule(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Return alphabar for betas linear from ``beta_start`` to ``beta_end``, shape ``(num_train_timesteps,)``.

    The defaults are DDPM's values for 1000 timesteps. They are used as given for any
    ``num_train_timesteps``, so with far fewer timesteps the last alphabar stays well above 0.
    """
    _check_num_train_timesteps(num_train_timesteps)
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return alphabar_from_betas(betas)


def scaled_linear_schedule(
    num_train_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Return alphabar for betas whose square roots are linear from sqrt(beta_start) to sqrt(beta_end).

    The defaults are Stable Diffusion's values for 1000 timesteps.
    """
    _check_num_train_timesteps(num_train_timesteps)
    sqrt_betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps, dtype=torch.float64)
    return alphabar_from_betas(sqrt_betas**2)


def cosine_schedule(num_train_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Return the cosine schedule's alphabar, shape ``(num_train_timesteps,)``.

    Timestep ``i`` ends at continuous time ``(i + 1) / N``, so ``alphabar[0]`` is already below 1.
    Each beta ``1 - f((i + 1) / N) / f(i / N)`` is clipped at ``max_beta``, because the
    last one would otherwise be 1 and make ``alphabar[N - 1]`` exactly 0. The ``offset``
    keeps the first betas from being too small to learn from.
    """
    _check_num_train_timesteps(num_train_timesteps)
    if not 0 < max_beta < 1:
        raise ValueError(f"max_beta must be in (0, 1), got {max_beta}")

    def continuous_alphabar(time: torch.Tensor) -> torch.Tensor:
        return torch.cos((time + offset) / (1 + offset) * math.pi / 2) ** 2

    times = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    levels = continuous_alphabar(times)
    betas = (1.0 - levels[1:] / levels[:-1]).clamp(max=max_beta)
    return alphabar_from_betas(betas)


def rescale_zero_terminal_snr(alphabar: torch.Tensor) -> torch.Tensor:
    """Rescale a schedule so that its last timestep is pure noise (alphabar exactly 0).

    Shifts and scales ``sqrt(alphabar)`` linearly so that the last value becomes 0 and
    the first keeps its value (Lin et al., "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", 2024). Without it, the largest timestep of the linear and
    scaled-linear schedules leaves some signal in ``x_T``, which a model learns to rely on
    but never gets when sampling starts from pure noise.

    Only v- and x0-prediction models can be trained and sampled on the result, because an
    epsilon prediction cannot give x0 where alphabar is 0.
    """
    alphabar = alphabar.to(torch.float64)
    validate_alphabar(alphabar)
    if len(alphabar) < 2:
        raise ValueError("a zero-terminal-SNR schedule needs at least 2 timesteps, got 1")

    sqrt_alphabar = alphabar.sqrt()
    first, last = sqrt_alphabar[0].clone(), sqrt_alphabar[-1].clone()
    rescaled = ((sqrt_alphabar - last) * first / (first - last)) ** 2
    # Squaring the square root can move the first value by one ulp, and it must be unchanged.
    rescaled[0] = alphabar[0]
    return rescaled


_SCHEDULES: dict[str, ScheduleFactory] = {
    "linear": linear_schedule,
    "scaled_linear": scaled_linear_schedule,
    "cosine": cosine_schedule,
}


def list_schedules() -> list[str]:
    """Return the names that :func:`make_schedule` accepts."""
    return sorted(_SCHEDULES)


def make_schedule(
    name: str, num_train_timesteps: int = 1000, zero_terminal_snr: bool = False, **kwargs: float
) -> torch.Tensor:
    """Create a schedule's alphabar by name, shape ``(num_train_timesteps,)``, float64.

    Args:
        name: ``"linear"``, ``"scaled_linear"`` or ``"cosine"``.
        num_train_timesteps: number of training timesteps ``N``.
        zero_terminal_snr: rescale the schedule so that ``alphabar[N - 1]`` is exactly 0.
        **kwargs: passed to the schedule function, for example ``beta_end`` or ``offset``.
    """
    if name not in _SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; valid names: {', '.join(list_schedules())}")
    alphabar = _SCHEDULES[name](num_train_timesteps, **kwargs)
    if zero_terminal_snr:
        alphabar = rescale_zero_terminal_snr(alphabar)
    return alphabar


def _check_num_train_timesteps(num_train_timesteps: int) -> None:
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")


def validate_alphabar(alphabar: torch.Tensor) -> None:
    """Raise ValueError unless ``alphabar`` is 1-D, in [0, 1) and strictly decreasing."""
    if alphabar.ndim != 1 or len(alphabar) == 0:
        raise ValueError(f"alphabar must be a non-empty 1-D tensor, got shape {tuple(alphabar.shape)}")
    if not bool(((alphabar >= 0) & (alphabar < 1)).all()):
        raise ValueError(
            f"every alphabar must be in [0, 1), got values from {alphabar.min().item()} to {alphabar.max().item()}"
        )
    if len(alphabar) > 1 and not bool((alphabar[1:] < alphabar[:-1]).all()):
        raise ValueError("alphabar must decrease strictly with the timestep")
