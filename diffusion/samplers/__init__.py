"""Samplers of discrete-time diffusion models, one per module, behind :class:`Sampler`'s interface."""

from diffusion.samplers.base import TIMESTEP_SPACINGS, DenoisingModel, SampleOutput, Sampler, make_timesteps
from diffusion.samplers.ddim import DDIMSampler
from diffusion.samplers.ddpm import DDPMSampler
from diffusion.samplers.dpm_solver import DPMSolverPlusPlus2MSampler

__all__ = [
    "TIMESTEP_SPACINGS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPlusPlus2MSampler",
    "DenoisingModel",
    "SampleOutput",
    "Sampler",
    "make_timesteps",
]
