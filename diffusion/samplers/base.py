"""The interface shared by every sampler, and the timestep spacings.

A sampler walks a trained diffusion model from pure noise back to data over a subset of
the ``N`` training timesteps, in the shape that diffusers' schedulers made familiar::

    sampler = DDIMSampler(make_schedule("cosine", 1000), prediction_type="epsilon")
    sampler.set_timesteps(50, spacing="trailing")
    x = torch.randn(16, 3, 32, 32)
    for t in sampler.timesteps:
        model_t = sampler.model_timesteps(x, t)  # (B,): t, or the time-shifted timesteps
        x = sampler.step(model(x, model_t), model_t, x)

or in one call, ``sampler.sample(model, (16, 3, 32, 32), num_steps=50)``.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffusion.prediction import predict_epsilon, predict_x0, validate_prediction_type
from diffusion.schedules import validate_alphabar
from diffusion.time_shift import TimeShift, select_shifted_timesteps

TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")

# A denoising network: model(x_t of shape (B, ...), timesteps of shape (B,), **kwargs) -> output of x_t's shape.
DenoisingModel = Callable[..., torch.Tensor]


def make_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str) -> torch.Tensor:
    """Choose ``num_inference_steps`` of the training timesteps, in decreasing order, int64 of shape ``(n,)``.

    With ``N`` training timesteps and ``n`` sampling steps:

    - ``"leading"``: ``0, N // n, 2 * (N // n), ...``, so the first step is at
      ``(n - 1) * (N // n)`` and can be far below ``N - 1`` (one step samples at ``t = 0``).
    - ``"trailing"``: ``round(N * k / n) - 1`` for ``k = n .. 1``, so the first step is always
      ``N - 1`` and the last is about ``N / n - 1`` (Lin et al., "Common Diffusion Noise
      Schedules and Sample Steps are Flawed", recommend it).
    - ``"linspace"``: ``n`` values evenly spaced from ``N - 1`` down to 0 and rounded, both ends
      included, so one step samples at ``N - 1``.

    The timesteps are distinct for every ``n`` from 1 to ``N``.
    """
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid spacings: {', '.join(TIMESTEP_SPACINGS)}")
    if (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, int)
        or not 1 <= num_inference_steps <= num_train_timesteps
    ):
        raise ValueError(
            f"the number of sampling steps (num_steps in the configs) must be an integer from 1 to the model's "
            f"{num_train_timesteps} training timesteps, got {num_inference_steps!r}"
        )

    steps = num_inference_steps
    if spacing == "leading":
        timesteps = np.arange(steps)[::-1] * (num_train_timesteps // steps)
    elif spacing == "trailing":
        fractions = np.arange(steps, 0, -1) / steps
        timesteps = np.round(num_train_timesteps * fractions) - 1
    else:
        timesteps = np.round(np.linspace(num_train_timesteps - 1, 0, steps))
    return torch.from_numpy(timesteps.astype(np.int64).copy())


@dataclass
class SampleOutput:
    """Result of :meth:`Sampler.sample`.

    Attributes:
        samples: the generated samples, shape ``(B, ...)`` as requested.
        num_model_evaluations: calls of the model on the whole batch (NFE).
    """

    samples: torch.Tensor
    num_model_evaluations: int


class Sampler(ABC):
    """Base class of the samplers: timestep spacing, prediction conversion, time shift and the loop.

    A subclass implements one update rule in :meth:`_update`. The base class turns the
    model output into x0 and epsilon predictions, tracks which scheduled step comes next,
    and chooses the timesteps at which the model is evaluated.

    Time shift (``time_shift``, see :mod:`diffusion.time_shift`). At every step except the
    first, and only where the scheduled timestep ``t`` is above ``time_shift.cutoff``, the
    sampler picks for each sample the timestep ``t_s`` of :meth:`shift_window` whose noise
    variance ``1 - alphabar[t_s]`` is nearest to the sample's variance. Where ``t_s`` enters
    the step is ``time_shift.placement``:

    - ``"sample"`` (the default): the model is evaluated at ``t_s`` (:meth:`model_timesteps`),
      and the update converts its output to x0 and epsilon with ``alphabar[t_s]`` and moves
      from ``alphabar[t_s]`` to ``alphabar`` of the next scheduled timestep ``s``.
    - ``"time_input"``: the model is evaluated at ``t_s``, and the update keeps ``alphabar[t]``.
    - ``"end_point"``: the model is evaluated at ``t``, and the update moves from
      ``alphabar[t]`` to ``alphabar[s + t_s - t]``. The next step starts from ``s`` as
      scheduled, so the shift changes how much noise the update removes. The last step,
      which ends on clean data, is not shifted.

    The official code differs between its samplers. Its DEIS sampler changes only the
    model's time input, like ``"time_input"``. Its DDIM sampler for ADM moves the end point
    by ``t_s - t``, like ``"end_point"``. Its PNDM and DPM-Solver samplers also move the end
    point, but choose it among the timesteps around ``s``, and DPM-Solver then evaluates the
    model at that end point. BENCHMARKS.md measures the three placements for each sampler:
    which one helps depends on the sampler and on the model.

    Args:
        alphabar: the training schedule, shape ``(N,)``, strictly decreasing in ``[0, 1)``
            (see :mod:`diffusion.schedules`). It is kept as float64 on the CPU.
        prediction_type: what the model outputs, ``"epsilon"``, ``"x0"`` or ``"v"``.
        clip_x0: if set, clamp each x0 prediction to ``[-clip_x0, clip_x0]`` (1 for images
            scaled to [-1, 1]) and recompute epsilon from the clamped x0.
        time_shift: time-shift settings, or None for plain sampling.
    """

    def __init__(
        self,
        alphabar: torch.Tensor,
        prediction_type: str = "epsilon",
        clip_x0: float | None = None,
        time_shift: TimeShift | None = None,
    ) -> None:
        alphabar = torch.as_tensor(alphabar, dtype=torch.float64).detach().cpu()
        validate_alphabar(alphabar)
        validate_prediction_type(prediction_type)
        if clip_x0 is not None and not clip_x0 > 0:
            raise ValueError(f"clip_x0 must be positive or None, got {clip_x0}")
        if time_shift is not None and not isinstance(time_shift, TimeShift):
            raise TypeError(f"time_shift must be a TimeShift or None, got {type(time_shift).__name__}")

        self.alphabar = alphabar
        self.prediction_type = prediction_type
        self.clip_x0 = clip_x0
        self.time_shift = time_shift
        self.timesteps = torch.empty(0, dtype=torch.int64)
        self._step_index: int | None = None
        self._reset_state()

    @property
    def num_train_timesteps(self) -> int:
        """Number of training timesteps ``N``."""
        return len(self.alphabar)

    @property
    def step_index(self) -> int | None:
        """Index into :attr:`timesteps` of the next step, or None before :meth:`set_timesteps`."""
        return self._step_index

    def set_timesteps(self, num_inference_steps: int, spacing: str = "trailing") -> None:
        """Choose the sampling timesteps (:attr:`timesteps`) and reset the sampler to its first step.

        ``spacing`` is ``"leading"``, ``"trailing"`` or ``"linspace"`` (see :func:`make_timesteps`).
        The default, trailing, starts at ``N - 1`` as linspace does, but spends no step at
        ``t = 0``, where the sample is already almost clean.

        Raises:
            ValueError: for an epsilon-prediction model whose timesteps include one where
                alphabar is 0, which no epsilon prediction can be sampled from. Also for a
                time-shift cutoff at or above every timestep that time-shift could act on.
        """
        timesteps = make_timesteps(self.num_train_timesteps, num_inference_steps, spacing)
        if self.prediction_type == "epsilon" and bool((self.alphabar[timesteps] == 0).any()):
            raise ValueError(
                f"an epsilon-prediction model cannot sample timestep {self.num_train_timesteps - 1}, where alphabar "
                "is 0 (a zero-terminal-SNR schedule), because x0 cannot be computed there. Use a model trained with "
                "prediction_type 'v' or 'x0', or a schedule without zero_terminal_snr"
            )
        self._check_time_shift_cutoff(timesteps, spacing)
        self.timesteps = timesteps
        self._step_index = 0
        self._reset_state()

    def _check_time_shift_cutoff(self, timesteps: torch.Tensor, spacing: str) -> None:
        """Raise ``ValueError`` when the cutoff alone keeps time-shift off every step of ``timesteps``.

        The first step is never shifted, nor, with the ``"end_point"`` placement, the last one
        (see :meth:`shift_window`). A schedule without other steps (one step) is not an error.
        """
        shift = self.time_shift
        if shift is None or shift.window == 0:
            return
        last = len(timesteps) - (2 if shift.placement == "end_point" else 1)
        candidates = [int(timestep) for timestep in timesteps[1 : last + 1]]
        if candidates and max(candidates) <= shift.cutoff:
            raise ValueError(
                f"time_shift.cutoff={shift.cutoff} is at or above every timestep that time-shift could act on "
                f"(at most {max(candidates)} with {len(timesteps)} {spacing} steps), so no step would be shifted. "
                f"Choose a cutoff below {max(candidates)}, or time_shift.window=0 to sample without time-shift"
            )

    def previous_timestep(self, index: int) -> int:
        """Return the timestep that step ``index`` moves to: the next entry of :attr:`timesteps`, or -1 after the last.

        Timestep -1 stands for clean data, alphabar 1. Taking the next entry, not
        ``t - N // n``, keeps the arithmetic right for every spacing.
        """
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def shift_window(self, index: int) -> tuple[int, int] | None:
        """Return the candidate timesteps ``(lowest, highest)`` for time shift at step ``index``, or None.

        None means no shift at this step: no ``time_shift``, a window of 0, the first step,
        a scheduled timestep at or below the cutoff, or, for the ``"end_point"`` placement,
        the last step. Otherwise the window is ``t - window // 2 .. t + window // 2``, limited
        to the training timesteps and further:

        - ``"sample"`` and ``"time_input"``: every candidate lies above the next scheduled
          timestep ``s``. With ``"sample"``, the update then always moves towards clean data.
        - ``"end_point"``: every end point ``s + t_s - t`` lies from 0 to ``t - 1``, so the
          update moves towards clean data too.

        It leaves out ``alphabar = 0`` for epsilon-prediction models.
        """
        shift = self.time_shift
        scheduled = int(self.timesteps[index])
        if shift is None or shift.window == 0 or index == 0 or scheduled <= shift.cutoff:
            return None

        half_window = shift.window // 2
        following = self.previous_timestep(index)
        if shift.placement == "end_point":
            if following < 0:
                return None
            lowest = max(scheduled - half_window, scheduled - following)
            highest = min(scheduled + half_window, 2 * scheduled - 1 - following, self.num_train_timesteps - 1)
        else:
            lowest = max(scheduled - half_window, following + 1)
            highest = min(scheduled + half_window, self.num_train_timesteps - 1)
        if self.prediction_type == "epsilon" and self.alphabar[highest] == 0:
            highest -= 1
        return lowest, highest

    def model_timesteps(self, sample: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        """Return the timesteps to evaluate the model at for the current step, int64 of shape ``(B,)``.

        Args:
            sample: the current noisy samples, shape ``(B, ...)``.
            timestep: the scheduled timestep of the current step, from :attr:`timesteps`.

        Returns:
            ``timestep`` for every sample, or each sample's time-shifted timestep where the
            step is shifted (see :meth:`shift_window`) and the placement is ``"sample"`` or
            ``"time_input"``. On ``sample``'s device.
        """
        index = self._current_index()
        scheduled = int(self.timesteps[index])
        requested = torch.as_tensor(timestep)
        if requested.numel() != 1 or int(requested) != scheduled:
            raise ValueError(
                f"model_timesteps expected the scheduled timestep {scheduled} (step {index + 1} of "
                f"{len(self.timesteps)}), got {timestep!r}; pass the entries of sampler.timesteps in order"
            )

        window = self._model_shift_window(index)
        if window is None:
            return torch.full((sample.shape[0],), scheduled, dtype=torch.int64, device=sample.device)
        return select_shifted_timesteps(sample, self.alphabar, *window)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Compute the sample at the previous (less noisy) timestep and advance to the next step.

        Args:
            model_output: the model's prediction for ``sample``, same shape, of the type
                ``prediction_type``.
            timestep: the timestep(s) the model was evaluated at. The scheduled timestep (an
                int or 0-d tensor), or the ``(B,)`` tensor from :meth:`model_timesteps`.
            sample: the current noisy samples ``x_t``, shape ``(B, ...)``.
            generator: random generator for the samplers that add noise, on ``sample``'s device.

        Returns:
            ``x`` at the next scheduled timestep (with the ``"end_point"`` placement, at each
            sample's shifted end point), or the x0 estimate after the last step; same shape and
            dtype as ``sample``.
        """
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but the sample has shape {tuple(sample.shape)}"
            )
        index = self._current_index()
        model_timesteps = self._check_model_timesteps(index, timestep, sample.shape[0])
        alphabar_t, alphabar_previous = self._step_alphabars(index, model_timesteps, sample)

        x0, epsilon = self._predict_x0_and_epsilon(model_output, sample, alphabar_t)
        previous_sample = self._update(sample, x0, epsilon, alphabar_t, alphabar_previous, generator)
        self._step_index = index + 1
        return previous_sample

    @torch.no_grad()
    def sample(
        self,
        model: DenoisingModel,
        shape: tuple[int, ...],
        num_steps: int,
        spacing: str = "trailing",
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        model_kwargs: dict[str, Any] | None = None,
    ) -> SampleOutput:
        """Generate samples from pure noise with ``num_steps`` steps, one model call each.

        Args:
            model: called as ``model(x, timesteps, **model_kwargs)`` with ``x`` of ``shape`` and
                int64 ``timesteps`` of shape ``(B,)``. Put it in eval mode first.
            shape: ``(B, C, H, W)`` or any ``(B, ...)``.
            num_steps: number of sampling steps, 1 to ``N``.
            spacing: ``"leading"``, ``"trailing"`` or ``"linspace"``.
            generator: random generator for the initial noise and the sampler's noise.
            noise: the initial noise ``x_T``, shape ``shape``, in place of a random draw.
            device: device of the samples when ``noise`` is not given.
            dtype: dtype of the samples when ``noise`` is not given.
            model_kwargs: extra keyword arguments for the model, such as class labels.
        """
        self.set_timesteps(num_steps, spacing)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape is {tuple(shape)}")

        x = noise
        evaluations = 0
        for timestep in self.timesteps:
            model_timesteps = self.model_timesteps(x, timestep)
            model_output = model(x, model_timesteps, **(model_kwargs or {}))
            evaluations += 1
            x = self.step(model_output, model_timesteps, x, generator=generator)
        return SampleOutput(samples=x, num_model_evaluations=evaluations)

    @abstractmethod
    def _update(
        self,
        sample: torch.Tensor,
        x0: torch.Tensor,
        epsilon: torch.Tensor,
        alphabar_t: torch.Tensor,
        alphabar_previous: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Return ``x`` at ``alphabar_previous`` from ``sample`` at ``alphabar_t``, both float64 ``(B,)`` on the CPU.

        ``alphabar_previous`` is 1.0 for every sample on the last step. ``x0`` and ``epsilon`` are the
        predictions for ``sample``, already clipped where ``clip_x0`` is set.
        """

    def _reset_state(self) -> None:  # noqa: B027 (optional hook, which single-step samplers leave empty)
        """Forget what earlier steps left behind; multistep samplers override it."""

    def _current_index(self) -> int:
        if self._step_index is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before sampling")
        if self._step_index >= len(self.timesteps):
            raise RuntimeError(
                f"all {len(self.timesteps)} steps are done; call set_timesteps again to sample another batch"
            )
        return self._step_index

    def _model_shift_window(self, index: int) -> tuple[int, int] | None:
        """Return :meth:`shift_window` where the shift changes the model's timestep, else None."""
        if self.time_shift is None or self.time_shift.placement == "end_point":
            return None
        return self.shift_window(index)

    def _check_model_timesteps(self, index: int, timestep: int | torch.Tensor, batch_size: int) -> torch.Tensor:
        """Return the model's timesteps as int64 ``(B,)`` on the CPU, after checking they fit step ``index``."""
        scheduled = int(self.timesteps[index])
        requested = torch.as_tensor(timestep).detach().to("cpu", torch.int64)
        if requested.ndim == 0:
            requested = requested.expand(batch_size)
        if requested.shape != (batch_size,):
            raise ValueError(
                f"timestep must be a scalar or have shape ({batch_size},), one per sample, "
                f"got shape {tuple(requested.shape)}"
            )

        window = self._model_shift_window(index)
        lowest, highest = window if window is not None else (scheduled, scheduled)
        if bool(((requested < lowest) | (requested > highest)).any()):
            raise ValueError(
                f"step {index + 1} of {len(self.timesteps)} expected timesteps in [{lowest}, {highest}] "
                f"(scheduled timestep {scheduled}), got values from {int(requested.min())} to {int(requested.max())}; "
                "call step once per entry of sampler.timesteps, in order, with the timesteps from model_timesteps"
            )
        return requested

    def _step_alphabars(
        self, index: int, model_timesteps: torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return alphabar where step ``index`` starts and where it ends, float64 ``(B,)`` each, for the placement."""
        batch_size = sample.shape[0]
        scheduled = int(self.timesteps[index])
        following = self.previous_timestep(index)
        placement = self.time_shift.placement if self.time_shift is not None else None

        if placement == "sample":
            alphabar_t = self.alphabar[model_timesteps]
        else:
            alphabar_t = self.alphabar[scheduled].expand(batch_size)

        window = self.shift_window(index) if placement == "end_point" else None
        if window is not None:
            shifted = select_shifted_timesteps(sample, self.alphabar, *window).cpu()
            alphabar_previous = self.alphabar[following + shifted - scheduled]
        elif following >= 0:
            alphabar_previous = self.alphabar[following].expand(batch_size)
        else:
            alphabar_previous = torch.ones(batch_size, dtype=torch.float64)
        return alphabar_t, alphabar_previous

    def _predict_x0_and_epsilon(
        self, model_output: torch.Tensor, sample: torch.Tensor, alphabar_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = predict_x0(model_output, sample, alphabar_t, self.prediction_type)
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            # Epsilon has to agree with the clamped x0, or the update mixes two different samples.
            return x0, predict_epsilon(x0, sample, alphabar_t, "x0")
        return x0, predict_epsilon(model_output, sample, alphabar_t, self.prediction_type)


def per_sample(values: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Return float64 ``values`` (a scalar or one per sample) in ``like``'s dtype and device, shaped ``(B, 1, ...)``."""
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.ndim == 1:
        values = values.view(-1, *([1] * (like.ndim - 1)))
    return values.to(device=like.device, dtype=like.dtype)
