"""One More Step: the handover step, the sign convention, guidance, training, and sampling in front of base models."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from omegaconf import open_dict

from diffusion import make_schedule, make_timesteps, prediction_target
from diffusion.oms import (
    OMS_CHECKPOINT_KEY,
    BrightnessBins,
    OMSHandover,
    OMSNetwork,
    build_oms_network,
    guided_x0,
    handover_sample,
    image_brightness,
    load_oms,
    oms_loss,
    oms_v_target,
    oms_x0_from_v,
)
from diffusion.oms_metrics import compare_brightness, per_bin_brightness_error
from lightning_modules.diffusion import SamplerSettings, build_sampler, generate_samples
from lightning_modules.oms import OMSModule
from lightning_modules.training import train
from models import create_model
from tests.conftest import ComposeConfig, compose_sample_config

# Small enough that one run of an experiment takes seconds.
QUICK = ("trainer.accelerator=cpu", "logger=none")
SHORT_RUN = (*QUICK, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1")


def weights_checksum(net: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def randomize_weights(network: OMSNetwork, seed: int = 0) -> OMSNetwork:
    """Add random values to every weight, so that the zero-initialised layers pass on the noise and the condition."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return network


# ---------------------------------------------------------------------------------------
# The handover step and the sign convention


@pytest.mark.parametrize("alphabar", [0.0047, 0.3, 0.9])
def test_handover_mean_and_std(alphabar: float) -> None:
    generator = torch.Generator().manual_seed(0)
    x0_hat = torch.linspace(-1.0, 1.0, 12).view(1, 3, 2, 2)
    noise = torch.randn((200_000, 3, 2, 2), generator=generator, dtype=torch.float64)

    x_t1 = handover_sample(x0_hat.double().expand_as(noise), noise, alphabar)

    expected_mean = math.sqrt(alphabar) * x0_hat.double()
    expected_std = math.sqrt(1.0 - alphabar)
    assert torch.allclose(x_t1.mean(dim=0, keepdim=True), expected_mean, atol=0.01)
    assert torch.allclose(x_t1.std(dim=0), torch.full((3, 2, 2), expected_std, dtype=torch.float64), atol=0.01)
    # Scaling the noise by the variance instead would give this standard deviation; it must be rejected.
    if alphabar > 0.1:
        assert abs(float(x_t1.std(dim=0).mean()) - (1.0 - alphabar)) > 0.05


def test_handover_per_sample_alphabar() -> None:
    x0_hat = torch.ones(2, 1, 2, 2)
    noise = torch.zeros(2, 1, 2, 2)

    x_t1 = handover_sample(x0_hat, noise, torch.tensor([0.25, 0.64]))

    assert torch.allclose(x_t1[0], torch.full((1, 2, 2), 0.5))
    assert torch.allclose(x_t1[1], torch.full((1, 2, 2), 0.8))


def test_handover_rejects_alphabar_of_one() -> None:
    with pytest.raises(ValueError, match="alphabar_first must be in"):
        handover_sample(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 1.0)


def test_sign_convention_v_is_minus_x0() -> None:
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn((4, 3, 4, 4), generator=generator)
    noise = torch.randn((4, 3, 4, 4), generator=generator)

    assert torch.equal(oms_v_target(x0), -x0)
    assert torch.equal(oms_x0_from_v(x0), -x0)
    # The diffusion core's v target at alphabar 0 agrees, whatever the noise.
    assert torch.allclose(prediction_target(x0, noise, 0.0, "v"), -x0)


class ConstantOutput(nn.Module):
    """Stand-in network that returns a fixed v for any input."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output
        self.num_conditions = 0
        self.null_condition = 0

    def forward(self, noise: torch.Tensor, conditions: torch.Tensor | None = None) -> torch.Tensor:
        return self.output


def test_loss_is_zero_for_v_equal_minus_x0() -> None:
    x0 = torch.rand((4, 1, 4, 4)) * 2 - 1

    assert oms_loss(ConstantOutput(-x0), x0).item() == pytest.approx(0.0, abs=1e-12)
    # The opposite sign gives x0_hat = -x0 and an error of (2 x0)^2.
    assert oms_loss(ConstantOutput(x0), x0).item() == pytest.approx(float((4 * x0**2).mean()), rel=1e-5)


# ---------------------------------------------------------------------------------------
# The network and guidance


def test_network_has_no_time_input() -> None:
    network = OMSNetwork(in_channels=1, base_channels=8, channel_multipliers=(1, 2), num_conditions=3)

    names = [name for name, _ in network.named_parameters()]
    assert not any("time" in name for name in names)
    with pytest.raises(TypeError):
        network(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.int64), torch.zeros(1))


def test_network_output_shape_and_initial_zero() -> None:
    network = OMSNetwork(in_channels=3, base_channels=8, channel_multipliers=(1, 2, 2), num_conditions=0)

    output = network(torch.randn(2, 3, 16, 16))

    assert output.shape == (2, 3, 16, 16)
    # The zero output layer makes an untrained module predict x0_hat = 0.
    assert torch.equal(output, torch.zeros_like(output))


def test_network_rejects_invalid_condition() -> None:
    network = OMSNetwork(in_channels=1, base_channels=8, channel_multipliers=(1,), num_conditions=2)

    with pytest.raises(ValueError, match="conditions must be in 0..2"):
        network(torch.zeros(1, 1, 4, 4), torch.tensor([3]))


def test_guidance_one_equals_conditional() -> None:
    network = randomize_weights(
        OMSNetwork(in_channels=1, base_channels=8, channel_multipliers=(1, 2), num_conditions=3)
    )
    noise = torch.randn((6, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    conditions = torch.tensor([0, 1, 2, 0, 1, 2])
    conditional = oms_x0_from_v(network(noise, conditions))
    unconditional = oms_x0_from_v(network(noise, None))
    assert not torch.allclose(conditional, unconditional)

    assert torch.allclose(guided_x0(network, noise, conditions, guidance=1.0), conditional, atol=1e-6)
    assert torch.allclose(guided_x0(network, noise, conditions, guidance=0.0), unconditional, atol=1e-6)
    expected = unconditional + 2.0 * (conditional - unconditional)
    assert torch.allclose(guided_x0(network, noise, conditions, guidance=2.0), expected, atol=1e-6)


def test_trained_oms_predicts_conditional_mean() -> None:
    """From pure noise the MSE optimum is the conditional mean, so a trained module must predict it."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    # Two classes of 4x4 grey images: a dark left half (class 0) or a bright right half (class 1), plus noise.
    means = torch.full((2, 1, 4, 4), -0.6)
    means[0, :, :, :2] = -0.9
    means[1, :, :, 2:] = 0.7
    labels = torch.arange(512) % 2
    data = (means[labels] + 0.2 * torch.randn((512, 1, 4, 4), generator=generator)).clamp(-1, 1)

    network = OMSNetwork(in_channels=1, base_channels=8, channel_multipliers=(1, 2), num_conditions=2)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    for _ in range(600):
        indices = torch.randint(0, len(data), (64,), generator=generator)
        loss = oms_loss(network, data[indices], labels[indices], condition_dropout=0.2, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    network.eval()
    noise = torch.randn((256, 1, 4, 4), generator=generator)
    with torch.no_grad():
        for label in (0, 1):
            conditions = torch.full((256,), label, dtype=torch.int64)
            prediction = guided_x0(network, noise, conditions).mean(dim=0)
            target = data[labels == label].mean(dim=0)
            assert (prediction - target).abs().mean() < 0.08, f"class {label}"
        unconditional = guided_x0(network, noise, None).mean(dim=0)
        assert (unconditional - data.mean(dim=0)).abs().mean() < 0.1


# ---------------------------------------------------------------------------------------
# Brightness bins and measurements


def test_quantile_bins_hold_equal_shares() -> None:
    brightness = torch.rand(10_000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    bins = BrightnessBins.from_quantiles(brightness, 4)

    counts = torch.bincount(bins.assign(brightness), minlength=4)
    assert bins.num_bins == 4
    assert torch.all((counts - 2500).abs() <= 1)
    assert bins.bin_means == pytest.approx([0.125, 0.375, 0.625, 0.875], abs=0.01)


def test_fixed_bins_assign_by_edges() -> None:
    bins = BrightnessBins.with_means([0.3, 0.6], torch.tensor([0.1, 0.2, 0.4, 0.7, 0.9]))

    assert bins.assign(torch.tensor([0.0, 0.3, 0.59, 0.6, 1.0])).tolist() == [0, 1, 1, 2, 2]
    assert bins.bin_means == pytest.approx([0.15, 0.4, 0.8])
    with pytest.raises(ValueError, match="contains no training image"):
        BrightnessBins.with_means([0.3, 0.6], torch.tensor([0.1, 0.9]))


def test_image_brightness_scale() -> None:
    images = torch.stack([torch.full((3, 2, 2), -1.0), torch.full((3, 2, 2), 1.0), torch.zeros(3, 2, 2)])

    assert image_brightness(images).tolist() == [0.0, 1.0, 0.5]


def test_compare_brightness_shift_and_tails() -> None:
    data = np.random.default_rng(0).uniform(0.2, 0.8, 20_000)

    itself = compare_brightness(data, data)
    shifted = compare_brightness(data + 0.1, data)
    narrow = compare_brightness(np.full(100, 0.5), data)

    assert itself.wasserstein_1 == pytest.approx(0.0)
    assert itself.dark_fraction == pytest.approx(0.05, abs=0.001)
    assert itself.bright_fraction == pytest.approx(0.05, abs=0.001)
    assert shifted.wasserstein_1 == pytest.approx(0.1, abs=1e-9)
    assert shifted.dark_fraction == 0.0
    # Uniform on [0.2, 0.8] is 0.15 from 0.5 on average.
    assert narrow.wasserstein_1 == pytest.approx(0.15, abs=0.005)
    assert narrow.dark_fraction == 0.0
    assert narrow.bright_fraction == 0.0


def test_per_bin_brightness_error() -> None:
    result = per_bin_brightness_error([0.1, 0.3, 0.6, 0.8], [0, 0, 1, 1], [0.25, 0.65])

    assert result["generated_mean"] == pytest.approx([0.2, 0.7])
    assert result["signed_error"] == pytest.approx([-0.05, 0.05])
    assert result["mean_absolute_error"] == pytest.approx(0.05)


# ---------------------------------------------------------------------------------------
# Sampling in front of the diffusion core's samplers


SAMPLER_CASES = [
    SamplerSettings(name="ddim", num_steps=5, spacing="trailing"),
    SamplerSettings(name="ddim", num_steps=10, spacing="leading"),
    SamplerSettings(name="ddpm", num_steps=4, spacing="linspace"),
    SamplerSettings(name="dpm_solver", num_steps=6, spacing="leading", time_shift={"window": 40, "cutoff": 100}),
]


@pytest.mark.parametrize("settings", SAMPLER_CASES, ids=lambda settings: settings.describe())
def test_handover_uses_first_timestep_of_sampler(settings: SamplerSettings) -> None:
    alphabar = make_schedule("scaled_linear", 1000)
    base = create_model("unet", 1, 10, base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1)
    base.eval()
    sampler = build_sampler(settings, alphabar, "epsilon")
    calls = []

    def record(noise: torch.Tensor, alphabar_first: float, indices: slice) -> torch.Tensor:
        calls.append((alphabar_first, indices, noise.shape[0]))
        return noise

    generate_samples(base, sampler, settings, (1, 8, 8), 5, 3, 0, "cpu", initial_sample=record)

    first = int(make_timesteps(1000, settings.num_steps, settings.spacing)[0])
    assert [call[1] for call in calls] == [slice(0, 3), slice(3, 5)]
    assert [call[2] for call in calls] == [3, 2]
    assert all(call[0] == pytest.approx(float(alphabar[first])) for call in calls)


def test_oms_handover_changes_start_sample() -> None:
    network = randomize_weights(
        OMSNetwork(in_channels=1, base_channels=8, channel_multipliers=(1, 2), num_conditions=2)
    )
    noise = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(4))
    conditions = torch.tensor([0, 1, 0, 1, 1, 1])
    handover = OMSHandover(network, conditions, guidance=1.5)

    x_t1 = handover(noise, 0.25, slice(2, 6))

    x0_hat = guided_x0(network, noise, conditions[2:6], 1.5)
    assert torch.allclose(x_t1, 0.5 * x0_hat + math.sqrt(0.75) * noise, atol=1e-6)
    with pytest.raises(ValueError, match="OMS module is unconditional"):
        OMSHandover(OMSNetwork(in_channels=1, base_channels=8, channel_multipliers=(1,)), conditions)


# ---------------------------------------------------------------------------------------
# Training with train.py, and sample.py with OMS


def test_oms_digits_runs_one_batch(compose_config: ComposeConfig, tmp_path: Path) -> None:
    summary = train(compose_config("experiment=oms_digits", "trainer.fast_dev_run=true", *QUICK))

    assert np.isfinite(summary["test/loss"])
    assert summary["flops_per_sample"] > 0
    assert (tmp_path / "samples" / "oms_epoch_0001.png").is_file()
    # The OMS network has no registry name; the summary names it by its config choice.
    assert summary["model"] == "oms"


def test_oms_module_rejects_wrong_condition_count() -> None:
    network = build_oms_network(in_channels=1, num_classes=10, condition="class")

    with pytest.raises(ValueError, match="needs an OMS network with 5 conditions"):
        OMSModule(
            network, optimizer=torch.optim.AdamW, scheduler={"name": "none"}, num_classes=10, condition="brightness"
        )


@pytest.fixture
def oms_brightness_run(compose_config: ComposeConfig, tmp_path: Path) -> Path:
    """Train a digits OMS module on 3 brightness bins for two batches; return its run folder."""
    cfg = compose_config(
        "experiment=oms_digits",
        "module.condition=brightness",
        "module.brightness_bins.num_bins=3",
        *SHORT_RUN,
        "test=false",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "oms")
    train(cfg)
    return tmp_path / "oms"


def train_base(compose_config: ComposeConfig, folder: Path, width: int) -> Path:
    cfg = compose_config(
        "experiment=ddpm_scaled_linear_digits",
        f"model.base_channels={width}",
        *SHORT_RUN,
        "test=false",
        "module.sampling.every_n_epochs=0",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(folder)
    train(cfg)
    return folder


def test_legacy_oms_checkpoint_gets_old_rule(oms_brightness_run: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(oms_brightness_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert load_oms(oms_brightness_run / "checkpoints" / "last.ckpt").network.min_group_channels == 4

    del checkpoint[OMS_CHECKPOINT_KEY]["network"]["min_group_channels"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    assert load_oms(tmp_path / "old.ckpt").network.min_group_channels == 1


def test_oms_checkpoint_loads(oms_brightness_run: Path) -> None:
    loaded = load_oms(oms_brightness_run / "checkpoints" / "last.ckpt")

    assert loaded.condition == "brightness"
    assert loaded.image_shape == (1, 8, 8)
    assert loaded.network.num_conditions == 3
    assert loaded.brightness_bins is not None and loaded.brightness_bins.num_bins == 3
    assert loaded.metadata["noise_schedule"]["name"] == "scaled_linear"
    with pytest.raises(ValueError, match="not an OMS checkpoint"):
        torch.save({"state_dict": {}}, oms_brightness_run / "other.ckpt")
        load_oms(oms_brightness_run / "other.ckpt")


def test_base_weights_unchanged_by_oms(
    compose_config: ComposeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # OMS training needs only the data and the schedule: it reads no checkpoint at all.
    loaded_files = []
    original_load = torch.load

    def recording_load(file, *args, **kwargs):
        loaded_files.append(str(file))
        return original_load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    cfg = compose_config("experiment=oms_digits", *SHORT_RUN, "test=false")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "oms")
    train(cfg)
    assert loaded_files == []
    monkeypatch.setattr(torch, "load", original_load)

    # Sampling runs the base network behind the OMS step and leaves its weights as they were.
    base = create_model("unet", 1, 10, base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1)
    before = weights_checksum(base)
    loaded = load_oms(tmp_path / "oms" / "checkpoints" / "last.ckpt")
    settings = SamplerSettings(name="ddim", num_steps=4)
    sampler = build_sampler(settings, make_schedule("scaled_linear", 1000), "epsilon")
    handover = OMSHandover(loaded.network, torch.arange(6) % 10, guidance=2.0)
    generate_samples(base, sampler, settings, (1, 8, 8), 6, 4, 0, "cpu", initial_sample=handover)

    assert weights_checksum(base) == before
    assert all(parameter.grad is None for parameter in base.parameters())


def test_oms_handover_follows_brightness_bins(compose_config: ComposeConfig, tmp_path: Path) -> None:
    # Ten epochs (about 100 steps, seconds on a CPU) are enough for the bins to order the x0 estimates.
    cfg = compose_config(
        "experiment=oms_digits",
        "module.condition=brightness",
        "module.brightness_bins.num_bins=3",
        *QUICK,
        "trainer.max_epochs=10",
        "trainer.limit_val_batches=1",
        "test=false",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "oms")
    train(cfg)
    loaded = load_oms(tmp_path / "oms" / "checkpoints" / "last.ckpt")
    noise = torch.randn((64, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    bins = torch.arange(3)

    x0_brightness = [image_brightness(guided_x0(loaded.network, noise, torch.full((64,), b), 1.0)).mean() for b in bins]
    assert x0_brightness[0] < x0_brightness[1] < x0_brightness[2]

    # The same module hands over to two base samplers with different first timesteps.
    # In both, a brighter bin must give a brighter starting sample.
    alphabar = make_schedule("scaled_linear", 1000)
    for name, steps, spacing in (("ddim", 4, "trailing"), ("dpm_solver", 5, "leading")):
        sampler = build_sampler(SamplerSettings(name=name, num_steps=steps, spacing=spacing), alphabar, "epsilon")
        sampler.set_timesteps(steps, spacing)
        alphabar_first = float(alphabar[sampler.timesteps[0]])
        starts = [
            OMSHandover(loaded.network, torch.full((64,), b), guidance=2.0)(noise, alphabar_first, slice(0, 64)).mean()
            for b in bins
        ]
        assert starts[0] < starts[1] < starts[2], (name, starts)


def test_one_oms_drives_two_base_models(
    compose_config: ComposeConfig, oms_brightness_run: Path, tmp_path: Path
) -> None:
    import sample

    small = train_base(compose_config, tmp_path / "base8", 8)
    large = train_base(compose_config, tmp_path / "base16", 16)
    small_file = small / "checkpoints" / "last.ckpt"
    large_file = large / "checkpoints" / "last.ckpt"
    digests = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in (small_file, large_file)}
    common = ("num_samples=6", "batch_size=4", "seed=0", "device=cpu", f"oms.ckpt_path={oms_brightness_run}")
    runs = {
        "small": (f"ckpt_path={small}", "sampler=ddim", "num_steps=4", "spacing=trailing"),
        "large": (
            f"ckpt_path={large}",
            "sampler=dpm_solver",
            "num_steps=5",
            "spacing=leading",
            "time_shift.window=20",
            "time_shift.cutoff=100",
        ),
    }

    for name, overrides in runs.items():
        with_oms = sample.run_sampling(
            compose_sample_config(
                *overrides, *common, "oms.condition=2", "oms.guidance=2", f"output_dir={tmp_path / name}"
            )
        )
        without = sample.run_sampling(
            compose_sample_config(*overrides, *common[:-1], f"output_dir={tmp_path / (name + '_plain')}")
        )

        assert with_oms["oms"]["condition_kind"] == "brightness"
        assert with_oms["oms"]["network_evaluations_per_image"] == 2
        # The headline cost counts the guided OMS step's two evaluations and their FLOPs.
        assert with_oms["network_evaluations_per_image"] == without["network_evaluations_per_image"] + 2
        assert with_oms["base_network_evaluations_per_image"] == without["network_evaluations_per_image"]
        assert with_oms["flops_per_image"] == without["flops_per_image"] + with_oms["oms"]["flops_per_image"]
        assert "of the OMS module" in sample.format_report(with_oms)
        assert without["oms"] is None
        arrays = np.load(tmp_path / name / "samples.npz")
        settings = json.loads(str(arrays["settings"]))
        assert str(settings["oms"]["checkpoint"]).startswith(str(oms_brightness_run))
        assert settings["oms"]["condition"] == 2
        assert settings["oms"]["guidance"] == 2.0
        assert "One More Step" in sample.format_report(with_oms)
        plain = np.load(tmp_path / (name + "_plain") / "samples.npz")["images"]
        assert arrays["images"].shape == plain.shape == (6, 8, 8, 1)
        assert not np.array_equal(arrays["images"], plain), name

    # Sampling never writes the base checkpoints.
    assert all(hashlib.sha256(path.read_bytes()).hexdigest() == digest for path, digest in digests.items())


def test_sample_rejects_invalid_oms_condition(
    compose_config: ComposeConfig, oms_brightness_run: Path, tmp_path: Path
) -> None:
    import sample

    base = train_base(compose_config, tmp_path / "base", 8)
    common = (f"ckpt_path={base}", "num_samples=2", "device=cpu", f"output_dir={tmp_path / 'out'}")

    with pytest.raises(ValueError, match="integer from 0 to 2"):
        sample.run_sampling(compose_sample_config(*common, f"oms.ckpt_path={oms_brightness_run}", "oms.condition=3"))
    with pytest.raises(ValueError, match="without oms.ckpt_path"):
        sample.run_sampling(compose_sample_config(*common, "oms.condition=1"))
