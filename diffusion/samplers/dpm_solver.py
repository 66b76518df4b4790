"""DPM-Solver++(2M) (Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", 2022): a second-order multistep solver of the probability-flow ODE."""

import torch

from diffusion.samplers.base import Sampler, per_sample


class DPMSolverPlusPlus2MSampler(Sampler):
    """DPM-Solver++(2M): deterministic, second order, one model call per step.

    In terms of ``alpha = sqrt(alphabar)``, ``sigma = sqrt(1 - alphabar)`` and the log-SNR
    ``lambda = log(alpha / sigma)``, a step from ``t`` to the next scheduled timestep ``s``,
    with ``h = lambda_s - lambda_t``, is::

        x_s = sigma_s / sigma_t * x_t + alpha_s * (1 - exp(-h)) * D
        D   = x0_t + h / (2 * h_last) * (x0_t - x0_last)

    ``x0_last`` is the x0 estimate of the previous step and ``h_last = lambda_t - lambda_last``.
    The first step, and any sample whose ``h_last`` is 0 or infinite, has no usable previous
    estimate and uses ``D = x0_t`` (first order, the same update as DDIM with ``eta = 0``).
    The last step goes to clean data, where ``h`` is infinite, and is first order too, so
    ``x0_t`` is returned. Arguments are those of :class:`diffusion.samplers.base.Sampler`.

    With time shift in the ``"sample"`` placement, ``lambda_t`` is that of each sample's
    shifted timestep, and the previous step's shifted timestep gives ``lambda_last``. In the
    ``"end_point"`` placement, ``lambda_s`` is that of each sample's shifted end point, and the
    next step starts from the scheduled ``lambda_s``.
    """

    def _reset_state(self) -> None:
        self._last_x0: torch.Tensor | None = None
        self._last_log_snr: torch.Tensor | None = None

    def _update(
        self,
        sample: torch.Tensor,
        x0: torch.Tensor,
        epsilon: torch.Tensor,
        alphabar_t: torch.Tensor,
        alphabar_previous: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        alphabar_s = alphabar_previous
        alpha_t, sigma_t = alphabar_t.sqrt(), (1.0 - alphabar_t).sqrt()
        alpha_s, sigma_s = alphabar_s.sqrt(), (1.0 - alphabar_s).sqrt()
        # log(0) is -inf at alphabar 0 and +inf at alphabar 1, which the ratios below allow for.
        log_snr_t = alpha_t.log() - sigma_t.log()
        log_snr_s = alpha_s.log() - sigma_s.log()

        # The coefficients are written as ratios of alpha and sigma, not through exp(-h),
        # so they stay finite when h is infinite on the first and last steps.
        sample_coefficient = sigma_s / sigma_t
        x0_coefficient = alpha_s - sigma_s * alpha_t / sigma_t

        data_estimate = x0
        if self._last_x0 is not None and bool((alphabar_s < 1.0).all()):
            h = log_snr_s - log_snr_t
            h_last = log_snr_t - self._last_log_snr
            usable = (h_last != 0) & torch.isfinite(h_last)
            ratio = torch.where(usable, h / (2.0 * h_last), torch.zeros_like(h))
            data_estimate = x0 + per_sample(ratio, x0) * (x0 - self._last_x0)

        self._last_x0 = x0
        self._last_log_snr = log_snr_t
        return per_sample(sample_coefficient, sample) * sample + per_sample(x0_coefficient, sample) * data_estimate
