"""Conversions between the three things a diffusion model can predict: epsilon, x0 and v.

With ``alpha = sqrt(alphabar_t)`` and ``sigma = sqrt(1 - alphabar_t)``, a noisy sample is
``x_t = alpha * x0 + sigma * epsilon``, and the velocity (Salimans & Ho, "Progressive
Distillation for Fast Sampling of Diffusion Models", 2022) is ``v = alpha * epsilon - sigma * x0``.
Any one of the three, together with ``x_t`` and ``alphabar_t``, gives the other two, with one
exception: at ``alphabar_t = 0`` (the last timestep of a zero-terminal-SNR schedule) ``x_t`` is
pure noise, so an epsilon prediction equals ``x_t`` and carries no information about x0.

``alphabar`` arguments are a Python float, a 0-d tensor, or a tensor of shape ``(B,)`` with one
value per sample. Samples have shape ``(B, ...)``, usually ``(B, C, H, W)``.
"""

from typing import Literal

import torch

PredictionType = Literal["epsilon", "x0", "v"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "x0", "v")


def validate_prediction_type(prediction_type: str) -> None:
    """Raise ValueError unless ``prediction_type`` is ``"epsilon"``, ``"x0"`` or ``"v"``."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; valid types: {', '.join(PREDICTION_TYPES)}")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alphabar: float | torch.Tensor) -> torch.Tensor:
    """Return ``x_t = sqrt(alphabar) * x0 + sqrt(1 - alphabar) * noise``, the shape of ``x0``."""
    alpha, sigma = alpha_sigma(alphabar, x0)
    return alpha * x0 + sigma * noise


def prediction_target(
    x0: torch.Tensor, noise: torch.Tensor, alphabar: float | torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Return the training target for a model of ``prediction_type``: the noise, ``x0`` or ``v``."""
    validate_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "x0":
        return x0
    alpha, sigma = alpha_sigma(alphabar, x0)
    return alpha * noise - sigma * x0


def predict_x0(
    model_output: torch.Tensor, sample: torch.Tensor, alphabar: float | torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Return the x0 that ``model_output`` implies for the noisy ``sample`` at ``alphabar``.

    Raises:
        ValueError: for an epsilon prediction where any ``alphabar`` is 0, instead of
            dividing by zero.
    """
    validate_prediction_type(prediction_type)
    if prediction_type == "x0":
        return model_output
    alpha, sigma = alpha_sigma(alphabar, sample)
    if prediction_type == "v":
        return alpha * sample - sigma * model_output

    if bool((alpha == 0).any()):
        raise ValueError(
            "cannot compute x0 from an epsilon prediction where alphabar is 0: the sample is pure noise "
            "(the last timestep of a zero-terminal-SNR schedule), so the noise equals the sample and carries "
            "no information about x0. Use a model trained with prediction_type 'v' or 'x0' on this schedule, "
            "or a schedule without zero_terminal_snr"
        )
    return (sample - sigma * model_output) / alpha


def predict_epsilon(
    model_output: torch.Tensor, sample: torch.Tensor, alphabar: float | torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Return the noise that ``model_output`` implies for the noisy ``sample`` at ``alphabar``.

    Raises:
        ValueError: for an x0 prediction where any ``alphabar`` is 1, because a noise-free
            sample contains no noise to recover.
    """
    validate_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return model_output
    alpha, sigma = alpha_sigma(alphabar, sample)
    if prediction_type == "v":
        return sigma * sample + alpha * model_output

    if bool((sigma == 0).any()):
        raise ValueError("cannot compute the noise from an x0 prediction where alphabar is 1 (a noise-free sample)")
    return (sample - alpha * model_output) / sigma


def convert_prediction(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alphabar: float | torch.Tensor,
    source_type: str,
    target_type: str,
) -> torch.Tensor:
    """Convert a prediction of ``source_type`` into one of ``target_type`` for the same ``sample``.

    Raises:
        ValueError: where the conversion would divide by zero, as in :func:`predict_x0`
            and :func:`predict_epsilon`.
    """
    validate_prediction_type(source_type)
    validate_prediction_type(target_type)
    if source_type == target_type:
        return model_output
    if target_type == "x0":
        return predict_x0(model_output, sample, alphabar, source_type)
    if target_type == "epsilon":
        return predict_epsilon(model_output, sample, alphabar, source_type)

    x0 = predict_x0(model_output, sample, alphabar, source_type)
    epsilon = predict_epsilon(model_output, sample, alphabar, source_type)
    alpha, sigma = alpha_sigma(alphabar, sample)
    return alpha * epsilon - sigma * x0


def alpha_sigma(alphabar: float | torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``sqrt(alphabar)`` and ``sqrt(1 - alphabar)`` in ``like``'s dtype, shaped to broadcast against it.

    The square roots are taken in float64 (float32 on MPS, which has no float64), because
    ``1 - alphabar`` near ``t = 0`` is about 1e-4 and loses digits in float32.
    """
    dtype = torch.float32 if like.device.type == "mps" else torch.float64
    alphabar = torch.as_tensor(alphabar, dtype=dtype, device=like.device)
    if alphabar.ndim == 1 and len(alphabar) == like.shape[0]:
        alphabar = alphabar.view(-1, *([1] * (like.ndim - 1)))
    elif alphabar.ndim != 0:
        raise ValueError(
            f"alphabar must be a scalar or have one value per sample, shape ({like.shape[0]},), "
            f"got shape {tuple(alphabar.shape)}"
        )
    alpha = alphabar.sqrt().to(like.dtype)
    sigma = (1 - alphabar).sqrt().to(like.dtype)
    return alpha, sigma
