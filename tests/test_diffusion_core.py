"""Diffusion core: schedules, prediction conversions, samplers on a Gaussian toy problem, time shift.

The toy problem has data x0 ~ N(MU, SIGMA^2) in every coordinate. Its noisy marginal at
alphabar is N(sqrt(alphabar) * MU, alphabar * SIGMA^2 + 1 - alphabar). The exact denoiser
(the posterior mean of x0, epsilon or v given x_t) is linear in x_t, so every sampler can
run with a perfect model and its output can be compared with N(MU, SIGMA^2).
"""

import math
from collections.abc import Callable

import pytest
import torch

from diffusion import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPlusPlus2MSampler,
    Sampler,
    TimeShift,
    add_noise,
    convert_prediction,
    make_schedule,
    make_timesteps,
    predict_x0,
    prediction_target,
    rescale_zero_terminal_snr,
)
from diffusion.schedules import cosine_schedule, linear_schedule, scaled_linear_schedule
from diffusion.time_shift import select_shifted_timesteps

MU, SIGMA = 1.0, 0.5
NUM_TRAIN_TIMESTEPS = 1000
# 1000 x 20 values: the standard error of the sample mean is SIGMA / sqrt(20000) = 0.0035.
TOY_SHAPE = (1000, 20)

SAMPLERS: dict[str, Callable[..., Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "dpm_solver": DPMSolverPlusPlus2MSampler,
}
SCHEDULE_NAMES = ["linear", "cosine", "scaled_linear"]
SPACINGS = ["leading", "trailing", "linspace"]


def gaussian_denoiser(alphabar: torch.Tensor, prediction_type: str) -> Callable[..., torch.Tensor]:
    """Return the exact model ``model(x_t, timesteps)`` of the toy problem for ``prediction_type``."""

    def model(sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        assert timesteps.shape == (sample.shape[0],)
        level = alphabar[timesteps.cpu()].to(sample.dtype).view(-1, *([1] * (sample.ndim - 1)))
        alpha, sigma = level.sqrt(), (1 - level).sqrt()
        variance = level * SIGMA**2 + 1 - level
        centered = sample - alpha * MU
        x0 = MU + alpha * SIGMA**2 / variance * centered
        epsilon = sigma / variance * centered
        if prediction_type == "epsilon":
            return epsilon
        if prediction_type == "x0":
            return x0
        return alpha * epsilon - sigma * x0

    return model


def advance(sampler: Sampler, model: Callable[..., torch.Tensor], sample: torch.Tensor, steps: int) -> torch.Tensor:
    """Run ``steps`` steps of ``sampler`` from its current step and return the sample."""
    for _ in range(steps):
        timestep = sampler.timesteps[sampler.step_index]
        model_timesteps = sampler.model_timesteps(sample, timestep)
        sample = sampler.step(model(sample, model_timesteps), model_timesteps, sample)
    return sample


def samples_with_variances(variances: list[float]) -> torch.Tensor:
    """Return float64 samples of shape ``(len(variances), 1, 8, 8)`` with exactly these unbiased variances."""
    values = torch.randn(len(variances), 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values = (values - values.mean(dim=1, keepdim=True)) / values.std(dim=1, keepdim=True)
    scale = torch.tensor(variances, dtype=torch.float64).sqrt()[:, None]
    return (values * scale).view(-1, 1, 8, 8)


# Schedules


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_schedule_strictly_decreasing(name: str, zero_terminal_snr: bool) -> None:
    alphabar = make_schedule(name, NUM_TRAIN_TIMESTEPS, zero_terminal_snr=zero_terminal_snr)
    assert alphabar.dtype == torch.float64
    assert alphabar.shape == (NUM_TRAIN_TIMESTEPS,)
    assert bool((alphabar[1:] < alphabar[:-1]).all())
    assert 0.99 < float(alphabar[0]) < 1.0
    assert float(alphabar[-1]) >= 0.0


def test_schedule_values_match_definitions() -> None:
    linear = linear_schedule(NUM_TRAIN_TIMESTEPS)
    assert float(linear[0]) == pytest.approx(1 - 1e-4, abs=1e-15)
    assert float(linear[-1] / linear[-2]) == pytest.approx(1 - 0.02, abs=1e-12)

    scaled_linear = scaled_linear_schedule(NUM_TRAIN_TIMESTEPS)
    assert float(scaled_linear[0]) == pytest.approx(1 - 0.00085, abs=1e-15)
    assert float(scaled_linear[-1] / scaled_linear[-2]) == pytest.approx(1 - 0.012, abs=1e-12)

    # Timestep 0 of the cosine schedule ends at continuous time 1/N, and the last beta is clipped.
    cosine = cosine_schedule(NUM_TRAIN_TIMESTEPS)
    expected_first = (
        math.cos((1 / NUM_TRAIN_TIMESTEPS + 0.008) / 1.008 * math.pi / 2) / math.cos(0.008 / 1.008 * math.pi / 2)
    ) ** 2
    assert float(cosine[0]) == pytest.approx(expected_first, abs=1e-15)
    assert float(cosine[-1] / cosine[-2]) == pytest.approx(1 - 0.999, abs=1e-12)


def test_make_schedule_forwards_arguments() -> None:
    alphabar = make_schedule("linear", 10, beta_start=0.1, beta_end=0.5)
    assert torch.equal(alphabar, linear_schedule(10, beta_start=0.1, beta_end=0.5))


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_zero_snr_rescale_endpoints(name: str) -> None:
    original = make_schedule(name, NUM_TRAIN_TIMESTEPS)
    rescaled = rescale_zero_terminal_snr(original)
    assert float(rescaled[-1]) == 0.0
    assert float(rescaled[0]) == float(original[0])

    # The rescale is affine in sqrt(alphabar), not in alphabar.
    first, last = original[0].sqrt(), original[-1].sqrt()
    expected_sqrt = (original.sqrt() - last) * first / (first - last)
    assert torch.allclose(rescaled.sqrt(), expected_sqrt, rtol=0, atol=1e-12)


def test_unknown_schedule_lists_valid_names() -> None:
    with pytest.raises(
        ValueError, match="unknown noise schedule 'quadratic'; valid names: cosine, linear, scaled_linear"
    ):
        make_schedule("quadratic", NUM_TRAIN_TIMESTEPS)


def test_invalid_schedule_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="num_train_timesteps must be a positive integer, got 0"):
        make_schedule("cosine", 0)
    with pytest.raises(ValueError, match=r"every beta must be in \(0, 1\)"):
        make_schedule("linear", 10, beta_end=1.5)


# Prediction conversions


@pytest.mark.parametrize("target_type", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("source_type", ["epsilon", "x0", "v"])
def test_prediction_conversion_round_trip(source_type: str, target_type: str) -> None:
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(6, 3, 4, 4, generator=generator, dtype=torch.float64)
    alphabar = torch.tensor([0.9999, 0.9, 0.5, 0.1, 0.01, 1e-4], dtype=torch.float64)
    sample = add_noise(x0, noise, alphabar)

    source = prediction_target(x0, noise, alphabar, source_type)
    converted = convert_prediction(source, sample, alphabar, source_type, target_type)
    expected = prediction_target(x0, noise, alphabar, target_type)
    assert torch.allclose(converted, expected, rtol=0, atol=1e-8)


def test_epsilon_at_zero_alphabar_raises() -> None:
    sample = torch.randn(2, 3)
    alphabar = torch.tensor([0.5, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot compute x0 from an epsilon prediction where alphabar is 0"):
        predict_x0(sample, sample, alphabar, "epsilon")
    with pytest.raises(ValueError, match="alphabar is 0"):
        convert_prediction(sample, sample, 0.0, "epsilon", "v")


def test_v_at_zero_alphabar_gives_x0() -> None:
    # At alphabar = 0, v = -x0 exactly, so a v model needs no division.
    velocity = torch.randn(4, 3)
    x0 = predict_x0(velocity, torch.randn(4, 3), 0.0, "v")
    assert torch.isfinite(x0).all()
    assert torch.equal(x0, -velocity)


def test_unknown_prediction_type_rejected() -> None:
    with pytest.raises(ValueError, match="unknown prediction_type 'sample'; valid types: epsilon, x0, v"):
        DDIMSampler(make_schedule("cosine"), prediction_type="sample")


# Timestep spacing


def test_spacing_known_timesteps() -> None:
    assert make_timesteps(1000, 10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert make_timesteps(1000, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert make_timesteps(1000, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert make_timesteps(1000, 1, "leading").tolist() == [0]
    assert make_timesteps(1000, 1, "trailing").tolist() == [999]
    assert make_timesteps(1000, 1, "linspace").tolist() == [999]


@pytest.mark.parametrize("spacing", SPACINGS)
def test_spacing_valid_for_every_count(spacing: str) -> None:
    for steps in range(1, NUM_TRAIN_TIMESTEPS + 1):
        timesteps = make_timesteps(NUM_TRAIN_TIMESTEPS, steps, spacing)
        assert timesteps.shape == (steps,), steps
        assert bool((timesteps[1:] < timesteps[:-1]).all()), steps
        assert int(timesteps.min()) >= 0, steps
        assert int(timesteps.max()) <= NUM_TRAIN_TIMESTEPS - 1, steps


def test_invalid_timesteps_request_rejected() -> None:
    sampler = DDIMSampler(make_schedule("cosine"))
    with pytest.raises(
        ValueError, match=r"\(num_steps in the configs\) must be .* from 1 to the model's 1000 .* got 0"
    ):
        sampler.set_timesteps(0)
    with pytest.raises(ValueError, match="from 1 to the model's 1000 training timesteps, got 1001"):
        sampler.set_timesteps(1001)
    with pytest.raises(
        ValueError, match="unknown timestep spacing 'uniform'; valid spacings: leading, trailing, linspace"
    ):
        sampler.set_timesteps(10, spacing="uniform")


# Samplers on the toy problem


@pytest.mark.parametrize("prediction_type", ["epsilon", "x0", "v"])
@pytest.mark.parametrize(
    ("sampler_name", "num_steps"),
    [("ddpm", 250), ("ddim", 100), ("dpm_solver", 25)],
)
def test_sampler_recovers_gaussian(sampler_name: str, num_steps: int, prediction_type: str) -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    sampler = SAMPLERS[sampler_name](alphabar, prediction_type=prediction_type)
    model = gaussian_denoiser(alphabar, prediction_type)

    output = sampler.sample(model, TOY_SHAPE, num_steps, generator=torch.Generator().manual_seed(1))
    assert output.num_model_evaluations == num_steps
    # The step counts keep each sampler's discretisation error in the std below about 2%.
    assert abs(float(output.samples.mean()) - MU) < 0.015
    assert abs(float(output.samples.std()) - SIGMA) < 0.025


@pytest.mark.parametrize(("sampler_name", "num_steps"), [("ddpm", 400), ("ddim", 100), ("dpm_solver", 50)])
def test_zero_snr_v_model_recovers_gaussian(sampler_name: str, num_steps: int) -> None:
    alphabar = make_schedule("scaled_linear", NUM_TRAIN_TIMESTEPS, zero_terminal_snr=True)
    sampler = SAMPLERS[sampler_name](alphabar, prediction_type="v")
    model = gaussian_denoiser(alphabar, "v")

    # Trailing spacing starts at timestep 999, where alphabar is exactly 0.
    output = sampler.sample(model, TOY_SHAPE, num_steps, spacing="trailing", generator=torch.Generator().manual_seed(1))
    assert int(sampler.timesteps[0]) == NUM_TRAIN_TIMESTEPS - 1
    assert abs(float(output.samples.mean()) - MU) < 0.015
    assert abs(float(output.samples.std()) - SIGMA) < 0.025


def test_ddim_eta_one_matches_ddpm() -> None:
    # With eta = 1 DDIM draws from DDPM's posterior, so the same noise gives the same samples.
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    model = gaussian_denoiser(alphabar, "epsilon")
    noise = torch.randn(TOY_SHAPE, generator=torch.Generator().manual_seed(1))

    ddpm = DDPMSampler(alphabar).sample(model, TOY_SHAPE, 20, noise=noise, generator=torch.Generator().manual_seed(2))
    ddim = DDIMSampler(alphabar, eta=1.0).sample(
        model, TOY_SHAPE, 20, noise=noise, generator=torch.Generator().manual_seed(2)
    )
    assert torch.allclose(ddim.samples, ddpm.samples, rtol=0, atol=1e-5)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_dpm_solver_beats_ddim(schedule_name: str) -> None:
    # Both samplers are deterministic and start from the same noise, so the gap is their
    # discretisation error: first order for DDIM, second order for DPM-Solver++(2M).
    alphabar = make_schedule(schedule_name, NUM_TRAIN_TIMESTEPS)
    model = gaussian_denoiser(alphabar, "v")
    noise = torch.randn(TOY_SHAPE, generator=torch.Generator().manual_seed(2))

    ddim = DDIMSampler(alphabar, prediction_type="v").sample(model, TOY_SHAPE, 20, noise=noise).samples
    dpm_solver = (
        DPMSolverPlusPlus2MSampler(alphabar, prediction_type="v").sample(model, TOY_SHAPE, 20, noise=noise).samples
    )
    ddim_error = abs(float(ddim.std()) - SIGMA)
    dpm_solver_error = abs(float(dpm_solver.std()) - SIGMA)
    assert dpm_solver_error < ddim_error / 2


@pytest.mark.parametrize("sampler_name", ["ddim", "dpm_solver"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_step_reaches_next_timestep(sampler_name: str, spacing: str) -> None:
    # With the true x0 as the model output, a deterministic step from x_t must land exactly
    # on sqrt(alphabar_s) * x0 + sqrt(1 - alphabar_s) * noise for the next scheduled s.
    alphabar = make_schedule("linear", NUM_TRAIN_TIMESTEPS)
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 2, 3, 3, generator=generator, dtype=torch.float64)
    noise = torch.randn(4, 2, 3, 3, generator=generator, dtype=torch.float64)

    sampler = SAMPLERS[sampler_name](alphabar, prediction_type="x0")
    sampler.set_timesteps(7, spacing=spacing)
    sample = add_noise(x0, noise, float(alphabar[sampler.timesteps[0]]))
    for index, timestep in enumerate(sampler.timesteps):
        sample = sampler.step(x0, timestep, sample)
        previous = sampler.previous_timestep(index)
        expected = add_noise(x0, noise, float(alphabar[previous])) if previous >= 0 else x0
        assert torch.allclose(sample, expected, rtol=0, atol=1e-10), (index, int(timestep))


@pytest.mark.parametrize("sampler_name", ["ddim", "dpm_solver"])
def test_deterministic_sampler_repeats_output(sampler_name: str) -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    model = gaussian_denoiser(alphabar, "epsilon")
    noise = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(4))

    first = SAMPLERS[sampler_name](alphabar).sample(
        model, noise.shape, 10, noise=noise, generator=torch.Generator().manual_seed(5)
    )
    second = SAMPLERS[sampler_name](alphabar).sample(
        model, noise.shape, 10, noise=noise, generator=torch.Generator().manual_seed(6)
    )
    assert torch.equal(first.samples, second.samples)


def test_ddim_eta_one_uses_generator() -> None:
    # The counterpart of the determinism test: with eta = 1 the generator changes the output.
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    model = gaussian_denoiser(alphabar, "epsilon")
    noise = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(4))

    sampler = DDIMSampler(alphabar, eta=1.0)
    first = sampler.sample(model, noise.shape, 10, noise=noise, generator=torch.Generator().manual_seed(5))
    second = sampler.sample(model, noise.shape, 10, noise=noise, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(first.samples, second.samples)


def test_full_step_count_same_for_spacings() -> None:
    # With as many steps as training timesteps every spacing takes all of them, so one
    # 1000-step run per sampler below covers the three spacings.
    every_timestep = list(range(NUM_TRAIN_TIMESTEPS - 1, -1, -1))
    for spacing in SPACINGS:
        assert make_timesteps(NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, spacing).tolist() == every_timestep, spacing


@pytest.mark.parametrize(
    ("spacing", "num_steps"),
    [("leading", 1), ("trailing", 1), ("linspace", 1), ("trailing", NUM_TRAIN_TIMESTEPS)],
)
@pytest.mark.parametrize("sampler_name", ["ddpm", "ddim", "dpm_solver"])
def test_extreme_step_counts_work(sampler_name: str, spacing: str, num_steps: int) -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    sampler = SAMPLERS[sampler_name](alphabar, prediction_type="v")

    output = sampler.sample(gaussian_denoiser(alphabar, "v"), (4, 3), num_steps, spacing=spacing)
    assert output.num_model_evaluations == num_steps
    assert output.samples.shape == (4, 3)
    assert torch.isfinite(output.samples).all()
    assert sampler.timesteps.shape == (num_steps,)
    assert bool((sampler.timesteps[1:] < sampler.timesteps[:-1]).all())


@pytest.mark.parametrize("sampler_name", ["ddpm", "ddim", "dpm_solver"])
def test_epsilon_model_rejects_zero_snr(sampler_name: str) -> None:
    alphabar = make_schedule("scaled_linear", NUM_TRAIN_TIMESTEPS, zero_terminal_snr=True)
    sampler = SAMPLERS[sampler_name](alphabar, prediction_type="epsilon")
    with pytest.raises(ValueError, match="epsilon-prediction model cannot sample timestep 999, where alphabar is 0"):
        sampler.set_timesteps(10, spacing="trailing")

    # Leading spacing never reaches timestep 999, so the same model samples without NaN.
    output = sampler.sample(gaussian_denoiser(alphabar, "epsilon"), (4, 3), 10, spacing="leading")
    assert torch.isfinite(output.samples).all()


def test_step_rejects_out_of_order_timestep() -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    sampler = DDIMSampler(alphabar)
    sample = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        sampler.step(sample, 999, sample)

    sampler.set_timesteps(2, spacing="trailing")
    with pytest.raises(ValueError, match=r"expected timesteps in \[999, 999\].*got values from 499 to 499"):
        sampler.step(sample, 499, sample)

    sampler.step(sample, 999, sample)
    sampler.step(sample, 499, sample)
    with pytest.raises(RuntimeError, match="all 2 steps are done"):
        sampler.step(sample, 499, sample)


def test_step_rejects_mismatched_output_shape() -> None:
    sampler = DDIMSampler(make_schedule("cosine", NUM_TRAIN_TIMESTEPS))
    sampler.set_timesteps(2)
    with pytest.raises(ValueError, match=r"model_output has shape \(2, 4\) but the sample has shape \(2, 3\)"):
        sampler.step(torch.zeros(2, 4), 999, torch.zeros(2, 3))


def test_clip_x0_bounds_output() -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    sampler = DDIMSampler(alphabar, prediction_type="x0", clip_x0=1.0)

    def far_model(sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return torch.full_like(sample, 3.0)

    output = sampler.sample(far_model, (4, 3), 5, generator=torch.Generator().manual_seed(0))
    # The last step returns the x0 estimate, which the clamp keeps at 1.
    assert torch.equal(output.samples, torch.ones(4, 3))


def test_sample_passes_model_kwargs() -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    received_labels = []

    def conditional_model(sample: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        received_labels.append(labels)
        return torch.zeros_like(sample)

    labels = torch.tensor([3, 7])
    DDPMSampler(alphabar).sample(conditional_model, (2, 3), 4, model_kwargs={"labels": labels})
    assert len(received_labels) == 4
    assert all(torch.equal(received, labels) for received in received_labels)


# Time shift


def test_time_shift_picks_window_argmin() -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    sampler = DDIMSampler(alphabar, prediction_type="v", time_shift=TimeShift(window=40, cutoff=100))
    sampler.set_timesteps(10, spacing="trailing")
    model = gaussian_denoiser(alphabar, "v")
    advance(sampler, model, torch.randn(5, 1, 8, 8), steps=1)

    # Step 2 is scheduled at 899 and moves to 799: the window is 899 - 20 .. 899 + 20.
    assert int(sampler.timesteps[1]) == 899
    assert sampler.shift_window(1) == (879, 919)

    # Variances of timesteps 885 and 905 (inside), 950 (above) and 700 (below the window),
    # and of a sample between 890 and 891.
    targets = [885, 905, 950, 700]
    variances = [1 - float(alphabar[t]) for t in targets]
    variances.append(1 - float(alphabar[890] + alphabar[891]) / 2 + 1e-9)
    sample = samples_with_variances(variances)

    chosen = sampler.model_timesteps(sample, 899)
    candidates = torch.arange(879, 920)
    sample_variance = sample.flatten(1).var(dim=1)
    brute_force = candidates[((sample_variance[:, None] - (1 - alphabar[candidates])[None, :]) ** 2).argmin(dim=1)]
    assert chosen.tolist() == brute_force.tolist()
    assert chosen.tolist()[:4] == [885, 905, 919, 879]
    assert chosen.tolist()[4] in (890, 891)


def test_time_shift_skips_first_step() -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    sampler = DDIMSampler(alphabar, prediction_type="v", time_shift=TimeShift(window=40, cutoff=100))
    sampler.set_timesteps(10, spacing="leading")
    # Timestep 900 would shift to 910 from step 2 on, but not on the first step.
    sample = samples_with_variances([1 - float(alphabar[910])] * 3)
    assert sampler.shift_window(0) is None
    assert sampler.model_timesteps(sample, 900).tolist() == [900, 900, 900]


def test_time_shift_skips_cutoff_and_below() -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    sampler = DDIMSampler(alphabar, prediction_type="v", time_shift=TimeShift(window=40, cutoff=499))
    sampler.set_timesteps(10, spacing="trailing")
    model = gaussian_denoiser(alphabar, "v")
    sample = advance(sampler, model, torch.randn(3, 1, 8, 8), steps=1)

    for index, timestep in enumerate(sampler.timesteps.tolist()[1:], start=1):
        assert sampler.step_index == index
        # Each sample's variance points 10 timesteps above the scheduled one.
        offset_sample = samples_with_variances([1 - float(alphabar[timestep + 10])] * 3)
        chosen = sampler.model_timesteps(offset_sample, timestep).tolist()
        if timestep > 499:
            assert chosen == [timestep + 10] * 3, timestep
        else:
            assert sampler.shift_window(index) is None, timestep
            assert chosen == [timestep] * 3, timestep
        sample = advance(sampler, model, sample, steps=1)


def test_time_shift_window_limits() -> None:
    alphabar = make_schedule("scaled_linear", NUM_TRAIN_TIMESTEPS, zero_terminal_snr=True)
    shift = TimeShift(window=400, cutoff=0)

    # The window stays above the next scheduled timestep (799) and inside the schedule.
    v_sampler = DDIMSampler(alphabar, prediction_type="v", time_shift=shift)
    v_sampler.set_timesteps(10, spacing="trailing")
    assert v_sampler.shift_window(1) == (800, 999)

    # An epsilon model cannot use timestep 999, where alphabar is 0.
    epsilon_sampler = DDIMSampler(alphabar, prediction_type="epsilon", time_shift=shift)
    epsilon_sampler.set_timesteps(10, spacing="leading")
    assert epsilon_sampler.shift_window(1) == (701, 998)


def test_time_shift_update_uses_shifted_alphabar() -> None:
    # A sample that really lies at timestep 910, with the true x0 as the model output. The
    # update that reads it at 910 lands exactly on the next scheduled timestep, 799.
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    generator = torch.Generator().manual_seed(7)
    x0 = torch.randn(3, 1, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(3, 1, 8, 8, generator=generator, dtype=torch.float64)
    sample = add_noise(x0, noise, float(alphabar[910]))
    expected = add_noise(x0, noise, float(alphabar[799]))
    shifted_timesteps = torch.full((3,), 910)

    results = {}
    for placement in ("sample", "time_input"):
        shift = TimeShift(window=40, cutoff=100, placement=placement)
        sampler = DDIMSampler(alphabar, prediction_type="x0", time_shift=shift)
        sampler.set_timesteps(10, spacing="trailing")
        advance(sampler, gaussian_denoiser(alphabar, "x0"), torch.randn(3, 1, 8, 8), steps=1)
        results[placement] = sampler.step(x0, shifted_timesteps, sample)

    assert torch.allclose(results["sample"], expected, rtol=0, atol=1e-10)
    assert not torch.allclose(results["time_input"], expected, rtol=0, atol=1e-3)


def test_time_shift_end_point_moves_update_target() -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    shift = TimeShift(window=40, cutoff=100, placement="end_point")
    sampler = DDIMSampler(alphabar, prediction_type="x0", time_shift=shift)
    sampler.set_timesteps(10, spacing="trailing")
    advance(sampler, gaussian_denoiser(alphabar, "x0"), torch.randn(4, 1, 8, 8), steps=1)

    # Step 2 goes from 899 to 799. The variances point at 885 and 905 (inside the window),
    # 950 (above: 919 is chosen) and 700 (below: 879), so the end points are 799 + t_s - 899.
    sample = samples_with_variances([1 - float(alphabar[t]) for t in (885, 905, 950, 700)])
    assert sampler.model_timesteps(sample, 899).tolist() == [899] * 4
    x0 = torch.randn(sample.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    result = sampler.step(x0, 899, sample)

    alphabar_t = float(alphabar[899])
    epsilon = (sample - alphabar_t**0.5 * x0) / (1 - alphabar_t) ** 0.5
    alphabar_end = alphabar[torch.tensor([785, 805, 819, 779])].view(-1, 1, 1, 1)
    expected = alphabar_end.sqrt() * x0 + (1 - alphabar_end).sqrt() * epsilon
    assert torch.allclose(result, expected, rtol=0, atol=1e-10)


def test_time_shift_end_point_window_limits() -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    sampler = DDIMSampler(alphabar, prediction_type="v", time_shift=TimeShift(400, 0, placement="end_point"))

    # Step 899 -> 799: every end point 799 + t_s - 899 lies from 0 to 898.
    sampler.set_timesteps(10, spacing="trailing")
    assert sampler.shift_window(1) == (699, 998)
    # Step 500 -> 499 of a 1000-step schedule: the end point can only move down.
    sampler.set_timesteps(NUM_TRAIN_TIMESTEPS, spacing="trailing")
    assert int(sampler.timesteps[499]) == 500
    assert sampler.shift_window(499) == (300, 500)
    # The last step always ends on clean data.
    assert sampler.shift_window(NUM_TRAIN_TIMESTEPS - 1) is None


@pytest.mark.parametrize("sampler_name", ["ddpm", "ddim", "dpm_solver"])
def test_time_shift_end_point_sampling_runs(sampler_name: str) -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    exact_model = gaussian_denoiser(alphabar, "epsilon")
    seen_timesteps = []

    def recording_model(sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        seen_timesteps.append(timesteps.clone())
        return exact_model(sample, timesteps)

    outputs = {}
    for placement in ("end_point", None):
        shift = TimeShift(window=80, cutoff=300, placement=placement) if placement else None
        sampler = SAMPLERS[sampler_name](alphabar, prediction_type="epsilon", time_shift=shift)
        generator = torch.Generator().manual_seed(8)
        outputs[placement] = sampler.sample(recording_model, (16, 1, 8, 8), 10, generator=generator).samples

    # The model is always evaluated at the scheduled timesteps, and only the updates' end points move.
    scheduled = sampler.timesteps.tolist()
    for timesteps, timestep in zip(seen_timesteps, scheduled * 2, strict=True):
        assert timesteps.tolist() == [timestep] * 16
    assert torch.isfinite(outputs["end_point"]).all()
    assert not torch.allclose(outputs["end_point"], outputs[None], rtol=0, atol=1e-3)


def test_time_shift_rejects_timestep_outside_window() -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    sampler = DDIMSampler(alphabar, prediction_type="v", time_shift=TimeShift(window=40, cutoff=100))
    sampler.set_timesteps(10, spacing="trailing")
    sample = advance(sampler, gaussian_denoiser(alphabar, "v"), torch.randn(2, 3), steps=1)
    with pytest.raises(ValueError, match=r"expected timesteps in \[879, 919\]"):
        sampler.step(sample, torch.tensor([899, 930]), sample)


@pytest.mark.parametrize("sampler_name", ["ddpm", "ddim", "dpm_solver"])
def test_time_shift_sampling_runs(sampler_name: str) -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    shift = TimeShift(window=80, cutoff=300)
    sampler = SAMPLERS[sampler_name](alphabar, prediction_type="epsilon", time_shift=shift)
    exact_model = gaussian_denoiser(alphabar, "epsilon")
    seen_timesteps = []

    def recording_model(sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        seen_timesteps.append(timesteps.clone())
        return exact_model(sample, timesteps)

    output = sampler.sample(recording_model, (16, 1, 8, 8), 10, generator=torch.Generator().manual_seed(8))
    assert output.num_model_evaluations == 10
    assert torch.isfinite(output.samples).all()

    scheduled = sampler.timesteps.tolist()
    assert seen_timesteps[0].tolist() == [scheduled[0]] * 16
    shifted_steps = 0
    for timesteps, timestep in zip(seen_timesteps, scheduled, strict=True):
        if timestep <= 300:
            assert timesteps.tolist() == [timestep] * 16, timestep
        shifted_steps += int(bool((timesteps != timestep).any()))
    # The toy data's own variance (0.25) makes every sample look noisier than its timestep.
    assert shifted_steps > 0


def test_time_shift_rejects_one_value_samples() -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    with pytest.raises(ValueError, match="at least two values per sample"):
        select_shifted_timesteps(torch.randn(3, 1), alphabar, 879, 919)


def test_time_shift_rejects_invalid_settings() -> None:
    with pytest.raises(ValueError, match="time_shift.window must be an integer >= 0"):
        TimeShift(window=-2, cutoff=300)
    with pytest.raises(ValueError, match="time_shift.cutoff must be an integer >= 0"):
        TimeShift(window=10, cutoff=-1)
    with pytest.raises(ValueError, match="time_shift.placement must be one of sample, time_input, end_point"):
        TimeShift(window=10, cutoff=300, placement="target")


def _shifted_steps(sampler: DDIMSampler) -> int:
    return sum(sampler.shift_window(index) is not None for index in range(len(sampler.timesteps)))


def test_cutoff_above_schedule_rejected() -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    # Ten trailing steps: 999, 899, ..., 99. The first is never shifted, so 899 is the highest candidate.
    for cutoff in (5000, 998, 899):
        sampler = DDIMSampler(alphabar, time_shift=TimeShift(window=40, cutoff=cutoff))
        with pytest.raises(ValueError, match=rf"time_shift.cutoff={cutoff} .* \(at most 899 with 10 trailing steps\)"):
            sampler.set_timesteps(10)

    sampler = DDIMSampler(alphabar, time_shift=TimeShift(window=40, cutoff=898))
    sampler.set_timesteps(10)
    assert _shifted_steps(sampler) == 1


def test_cutoff_ignored_without_shiftable_steps() -> None:
    alphabar = make_schedule("cosine", NUM_TRAIN_TIMESTEPS)
    # One step has nothing to shift, end_point never shifts the last of two steps, and window 0 turns it off.
    for steps, shift in [
        (1, TimeShift(window=40, cutoff=300)),
        (2, TimeShift(window=40, cutoff=300, placement="end_point")),
        (10, TimeShift(window=0, cutoff=5000)),
    ]:
        sampler = DDIMSampler(alphabar, time_shift=shift)
        sampler.set_timesteps(steps)
        assert _shifted_steps(sampler) == 0
