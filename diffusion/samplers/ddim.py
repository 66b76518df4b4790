"""DDIM sampling (Song et al., "Denoising Diffusion Implicit Models", 2021)."""

import torch

from diffusion.samplers.base import Sampler, per_sample
from diffusion.time_shift import TimeShift


class DDIMSampler(Sampler):
    """DDIM: move the x0 and epsilon estimates to the next timestep, with noise scaled by ``eta``.

    For a step from ``alphabar_t`` to ``alphabar_s`` (``s`` the next scheduled timestep)::

        sigma  = eta * sqrt((1 - alphabar_s) / (1 - alphabar_t) * (1 - alphabar_t / alphabar_s))
        x_s    = sqrt(alphabar_s) * x0 + sqrt(1 - alphabar_s - sigma^2) * epsilon + sigma * z

    with ``z`` standard normal. ``eta = 0`` is deterministic (the same initial noise always
    gives the same sample), and ``eta = 1`` draws from the same posterior as DDPM.

    Args:
        alphabar, prediction_type, clip_x0, time_shift: as in :class:`diffusion.samplers.base.Sampler`.
        eta: scale of the added noise, 0 (deterministic) to 1 (DDPM's posterior variance).
    """

    def __init__(
        self,
        alphabar: torch.Tensor,
        prediction_type: str = "epsilon",
        clip_x0: float | None = None,
        time_shift: TimeShift | None = None,
        eta: float = 0.0,
    ) -> None:
        super().__init__(alphabar, prediction_type=prediction_type, clip_x0=clip_x0, time_shift=time_shift)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0 (0 is deterministic, 1 matches DDPM), got {eta}")
        self.eta = eta

    def _update(
        self,
        sample: torch.Tensor,
        x0: torch.Tensor,
        epsilon: torch.Tensor,
        alphabar_t: torch.Tensor,
        alphabar_previous: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        posterior_variance = (1.0 - alphabar_previous) / (1.0 - alphabar_t) * (1.0 - alphabar_t / alphabar_previous)
        sigma = self.eta * posterior_variance.clamp(min=0.0).sqrt()
        # With eta > 1, sigma^2 can exceed 1 - alphabar_s; the epsilon term then vanishes.
        direction = (1.0 - alphabar_previous - sigma**2).clamp(min=0.0).sqrt()

        previous_sample = per_sample(alphabar_previous.sqrt(), x0) * x0 + per_sample(direction, sample) * epsilon
        if not bool((sigma > 0).any()):
            return previous_sample
        noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        return previous_sample + per_sample(sigma, sample) * noise
