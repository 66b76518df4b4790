"""DDPM ancestral sampling (Ho et al., "Denoising Diffusion Probabilistic Models", 2020)."""

import torch

from diffusion.samplers.base import Sampler, per_sample


class DDPMSampler(Sampler):
    """Ancestral sampler: draw each previous sample from the Gaussian posterior ``q(x_s | x_t, x0)``.

    A step goes from ``alphabar_t`` to ``alphabar_s``, where ``s`` is the next scheduled
    timestep. Its own beta is ``beta = 1 - alphabar_t / alphabar_s``. With fewer sampling
    steps than training timesteps, this folds the betas of the skipped timesteps together,
    as Nichol & Dhariwal's respacing does. The posterior is::

        mean     = sqrt(alphabar_s) * beta / (1 - alphabar_t) * x0
                   + sqrt(1 - beta) * (1 - alphabar_s) / (1 - alphabar_t) * x_t
        variance = beta * (1 - alphabar_s) / (1 - alphabar_t)

    with the model's x0 estimate in place of x0. The variance is the posterior's ("fixed
    small" in DDPM's terms) and is 0 on the last step, which returns the mean. Arguments are
    those of :class:`diffusion.samplers.base.Sampler`.

    NOTE: which time-shift placement helps DDPM depends on the model, and why is not known.
    On a small 16x16 CIFAR-10 model (BENCHMARKS.md), the default ``"sample"`` placement made
    DDPM worse at 5 to 50 steps, and ``"end_point"`` made it better at 5 to 20 steps. On the
    digits it was the other way round. The samples' variance does not explain it: on the
    CIFAR-10 model, DDPM's samples had the variance of the noised data at the timesteps
    where time shift acts, while DDIM's exceeded it and gained from ``"sample"``. On the
    digits, the samples of every sampler had less variance than the data, and all gained
    from ``"sample"``.
    """

    def _update(
        self,
        sample: torch.Tensor,
        x0: torch.Tensor,
        epsilon: torch.Tensor,
        alphabar_t: torch.Tensor,
        alphabar_previous: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        beta = 1.0 - alphabar_t / alphabar_previous
        x0_coefficient = alphabar_previous.sqrt() * beta / (1.0 - alphabar_t)
        sample_coefficient = (1.0 - beta).sqrt() * (1.0 - alphabar_previous) / (1.0 - alphabar_t)
        # Rounding can make the variance of the last step a tiny negative number.
        variance = (beta * (1.0 - alphabar_previous) / (1.0 - alphabar_t)).clamp(min=0.0)

        mean = per_sample(x0_coefficient, sample) * x0 + per_sample(sample_coefficient, sample) * sample
        if not bool((variance > 0).any()):
            return mean
        noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        return mean + per_sample(variance.sqrt(), sample) * noise
