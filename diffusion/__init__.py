"""Diffusion core: noise schedules, prediction targets, samplers and time-shift sampling.

- :mod:`diffusion.schedules`: alphabar arrays by name, and the zero-terminal-SNR rescale.
- :mod:`diffusion.prediction`: conversions between epsilon, x0 and v predictions.
- :mod:`diffusion.samplers`: DDPM, DDIM and DPM-Solver++(2M) with leading, trailing and
  linspace timestep spacing.
- :mod:`diffusion.time_shift`: time-shift sampling (Li et al., ICLR 2024), an option of
  every sampler.
- :mod:`diffusion.rectified_flow`, :mod:`diffusion.reflow_pairs` and :mod:`diffusion.slimflow`:
  rectified flow with Euler and RK45 sampling, reflow pair shards, and SlimFlow's
  Annealing Reflow and Flow-Guided Distillation objectives.
- :mod:`diffusion.oms` and :mod:`diffusion.oms_metrics`: One More Step (Hu et al., CVPR
  2024), a small network and one step from pure noise to a base sampler's first timestep,
  and the brightness measurements that show what it changes.
"""

from diffusion.prediction import (
    PREDICTION_TYPES,
    add_noise,
    convert_prediction,
    predict_epsilon,
    predict_x0,
    prediction_target,
)
from diffusion.samplers import (
    TIMESTEP_SPACINGS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPlusPlus2MSampler,
    SampleOutput,
    Sampler,
    make_timesteps,
)
from diffusion.schedules import list_schedules, make_schedule, rescale_zero_terminal_snr
from diffusion.time_shift import TimeShift

__all__ = [
    "PREDICTION_TYPES",
    "TIMESTEP_SPACINGS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPlusPlus2MSampler",
    "SampleOutput",
    "Sampler",
    "TimeShift",
    "add_noise",
    "convert_prediction",
    "list_schedules",
    "make_schedule",
    "make_timesteps",
    "predict_epsilon",
    "predict_x0",
    "prediction_target",
    "rescale_zero_terminal_snr",
]
