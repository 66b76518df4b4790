"""The UNet, DDPM training with EMA, and sample.py on a checkpoint, all on the CPU."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from omegaconf import open_dict

from lightning_modules.diffusion import (
    CHECKPOINT_KEY,
    EMA,
    DDPMModule,
    SamplerSettings,
    generate_samples,
    load_denoiser,
)
from lightning_modules.training import train
from models import create_model
from models.unet import group_norm
from tests.conftest import CIFAR10_ARCHIVE, ROOT, ComposeConfig, compose_sample_config

# Parameter counts of the CIFAR-10 UNets as SlimFlow (Zhu et al., ECCV 2024) reports them.
SLIMFLOW_PARAMETERS = {
    "unet_slimflow_27m": 27.9e6,
    "unet_slimflow_15m": 15.7e6,
    "unet_slimflow_7m": 7.0e6,
    "unet_slimflow_3m": 3.4e6,
}

# Small enough that one run of the digits experiment takes seconds.
QUICK = (
    "trainer.accelerator=cpu",
    "logger=none",
    "module.sampling.num_samples=4",
    "module.sampling.sampler.num_steps=3",
)


@pytest.mark.parametrize("name", sorted(SLIMFLOW_PARAMETERS))
def test_slimflow_unet_parameter_count(name: str) -> None:
    net = create_model(name, in_channels=3, num_classes=10)
    count = sum(parameter.numel() for parameter in net.parameters())
    expected = SLIMFLOW_PARAMETERS[name]
    assert abs(count - expected) / expected <= 0.05, f"{name}: {count:,} parameters, SlimFlow's is {expected:,.0f}"


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize(
    ("channels", "size", "multipliers"), [(1, 8, [1, 2, 2]), (3, 32, [1, 2, 2, 2]), (3, 16, [1, 2])]
)
def test_unet_output_shape(channels: int, size: int, multipliers: list[int], conditional: bool) -> None:
    net = create_model(
        "unet",
        in_channels=channels,
        num_classes=10,
        class_conditional=conditional,
        base_channels=16,
        channel_multipliers=multipliers,
        num_res_blocks=1,
        attention_levels=[1],
    )
    x = torch.randn(3, channels, size, size)
    timesteps = torch.tensor([0, 500, 999])
    labels = torch.tensor([0, 9, 10]) if conditional else None

    output = net(x, timesteps, class_labels=labels)

    assert output.shape == x.shape
    assert torch.isfinite(output).all()


def randomised_unet(base_channels: int, **options) -> nn.Module:
    """A UNet whose zero-initialised layers are randomised, so that every block's output reaches the result."""
    torch.manual_seed(0)
    net = create_model("unet", 1, 10, base_channels=base_channels, channel_multipliers=[1, 2], **options)
    for parameter in net.parameters():
        if parameter.ndim > 1 and not parameter.any():
            nn.init.normal_(parameter, std=0.1)
    return net.eval()


def relative_change(first: torch.Tensor, second: torch.Tensor) -> float:
    return float((first - second).abs().max() / first.abs().max())


# Widths 16 and 32 give GroupNorm groups of one channel, which once removed the embedding entirely.
@pytest.mark.parametrize("base_channels", [16, 32, 64])
def test_unet_timestep_changes_output(base_channels: int) -> None:
    net = randomised_unet(base_channels)
    x = torch.randn(2, 1, 8, 8)

    with torch.no_grad():
        early = net(x, torch.tensor([100, 100]))
        late = net(x, torch.tensor([900, 900]))

    assert relative_change(early, late) > 1e-2


@pytest.mark.parametrize("base_channels", [16, 64])
def test_unet_class_labels_change_output(base_channels: int) -> None:
    net = randomised_unet(base_channels, class_conditional=True)
    x = torch.randn(2, 1, 8, 8)
    timesteps = torch.tensor([100, 100])

    with torch.no_grad():
        digit_zero = net(x, timesteps, class_labels=torch.tensor([0, 0]))
        digit_one = net(x, timesteps, class_labels=torch.tensor([1, 1]))
        null_class = net(x, timesteps)
        explicit_null_class = net(x, timesteps, class_labels=torch.tensor([10, 10]))

    assert relative_change(digit_zero, digit_one) > 1e-2
    assert torch.allclose(null_class, explicit_null_class)


def test_unet_rejects_indivisible_size() -> None:
    net = create_model("unet", 3, 10, base_channels=16, channel_multipliers=[1, 2, 2])
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 3, 10, 10), torch.tensor([0]))


def test_unconditional_unet_rejects_labels() -> None:
    net = create_model("unet", 1, 10, base_channels=16, channel_multipliers=[1, 2])
    with pytest.raises(ValueError, match="class_conditional=true"):
        net(torch.randn(1, 1, 8, 8), torch.tensor([0]), class_labels=torch.tensor([3]))


def test_ema_update_arithmetic() -> None:
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = EMA(model, decay=0.9, warmup=False)

    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -2.0]]))
    ema.update(model)
    # 0.9 * old + 0.1 * new
    assert torch.allclose(ema.model.weight, torch.tensor([[1.2, 1.6]]))

    ema.update(model)
    assert torch.allclose(ema.model.weight, torch.tensor([[0.9 * 1.2 + 0.3, 0.9 * 1.6 - 0.2]]))
    assert int(ema.num_updates) == 2
    assert not ema.model.weight.requires_grad


def test_ema_warmup_ramps_decay() -> None:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.999, warmup=True)

    assert ema.current_decay() == pytest.approx(0.1)
    with torch.no_grad():
        model.weight.fill_(10.0)
    ema.update(model)
    # The first update uses decay (1 + 0) / (10 + 0) = 0.1, so it moves 90% of the way.
    assert float(ema.model.weight) == pytest.approx(9.0)
    assert ema.current_decay() == pytest.approx(2 / 11)

    ema.num_updates.fill_(100_000)
    assert ema.current_decay() == pytest.approx(0.999)


def test_optimizer_excludes_ema_weights() -> None:
    from functools import partial

    net = create_model("unet", 1, 10, base_channels=16, channel_multipliers=[1, 2])
    module = DDPMModule(net, partial(torch.optim.AdamW, lr=1e-3), {"name": "none"}, num_classes=10)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10, num_training_batches=5, accumulate_grad_batches=1)

    optimizer = module.configure_optimizers()["optimizer"]

    optimized = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    assert optimized == {id(parameter) for parameter in module.net.parameters()}
    assert optimized.isdisjoint(id(parameter) for parameter in module.ema.parameters())


class NoiseRecordingSampler:
    """A fake sampler that returns its initial noise and records the first draw of its step generator."""

    def __init__(self) -> None:
        self.step_draws: list[torch.Tensor] = []

    def sample(self, net: nn.Module, shape: tuple[int, ...], *, generator: torch.Generator, noise: torch.Tensor, **_):
        self.step_draws.append(torch.randn(shape, generator=generator))
        return SimpleNamespace(samples=noise, num_model_evaluations=1)


def test_step_noise_independent_of_seeds() -> None:
    # With a step seed of seed + 1 + start, DDPM's step noise under seed 0 replayed the initial noise of seed 1.
    settings = SamplerSettings(name="ddpm", num_steps=2)
    samplers = [NoiseRecordingSampler() for _ in range(3)]
    initial = [
        generate_samples(nn.Identity(), sampler, settings, (1, 4, 4), 4, 4, seed, "cpu")[0]
        for seed, sampler in enumerate(samplers)
    ]

    for sampler in samplers:
        for initial_noise in initial:
            assert not torch.allclose(sampler.step_draws[0], initial_noise)
    assert not torch.allclose(samplers[0].step_draws[0], samplers[1].step_draws[0])


def test_ddpm_digits_runs_one_batch(compose_config: ComposeConfig, tmp_path: Path) -> None:
    summary = train(compose_config("experiment=ddpm_digits", "trainer.fast_dev_run=true", *QUICK))

    assert np.isfinite(summary["test/loss"])
    assert summary["flops_per_sample"] > 0
    rows = dict(summary["technique_rows"])
    assert "per network evaluation" in rows["cost counted"]
    assert "3 network evaluations per image" in rows["sampling cost"]
    assert "one network evaluation" in summary["estimated_energy_counts"]
    assert (tmp_path / "samples" / "epoch_0001.png").is_file()


def test_ddpm_cifar10_cpu_runs_one_batch(compose_config: ComposeConfig, tmp_path: Path) -> None:
    if not CIFAR10_ARCHIVE.exists():
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR10_ARCHIVE}")
    summary = train(
        compose_config("experiment=ddpm_cifar10_cpu", "trainer.fast_dev_run=true", "data.batch_size=16", *QUICK)
    )

    assert np.isfinite(summary["test/loss"])
    assert summary["params"] > 1e6
    assert (tmp_path / "samples" / "epoch_0001.png").is_file()


@pytest.fixture
def tiny_checkpoint(compose_config: ComposeConfig, tmp_path: Path) -> Path:
    """Train a class-conditional digits UNet for two batches; return the run folder with checkpoints/last.ckpt."""
    cfg = compose_config(
        "experiment=ddpm_digits",
        "model.class_conditional=true",
        *QUICK,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "test=false",
        "module.sampling.every_n_epochs=0",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    train(cfg)
    return tmp_path / "run"


def test_checkpoint_records_norm_rule(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = tiny_checkpoint / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint[CHECKPOINT_KEY]["model_spec"]["min_group_channels"] == 4
    assert load_denoiser(path).net.min_group_channels == 4

    # A checkpoint from before the option does not record it, and its UNet had the old rule.
    del checkpoint[CHECKPOINT_KEY]["model_spec"]["min_group_channels"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    assert load_denoiser(tmp_path / "old.ckpt").net.min_group_channels == 1


def test_resume_rejects_other_norm_rule(tiny_checkpoint: Path) -> None:
    checkpoint = torch.load(tiny_checkpoint / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    spec = checkpoint[CHECKPOINT_KEY]["model_spec"]

    def module_with(min_group_channels: int) -> DDPMModule:
        net_spec = {key: value for key, value in spec.items() if key not in ("name", "in_channels", "num_classes")}
        net_spec["min_group_channels"] = min_group_channels
        net = create_model(spec["name"], spec["in_channels"], spec["num_classes"], **net_spec)
        return DDPMModule(net, torch.optim.Adam, {"name": "none"}, num_classes=10)

    module_with(4).on_load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="set model.min_group_channels=4"):
        module_with(1).on_load_checkpoint(checkpoint)

    # Without the entry the checkpoint predates the option, so it needs the old rule.
    del spec["min_group_channels"]
    module_with(1).on_load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="set model.min_group_channels=1"):
        module_with(4).on_load_checkpoint(checkpoint)


@pytest.mark.parametrize("channels", [16, 32, 64, 96, 128, 256])
def test_group_norm_keeps_four_channels_per_group(channels: int) -> None:
    norm = group_norm(channels)
    assert channels % norm.num_groups == 0
    assert channels // norm.num_groups >= 4
    assert norm.num_groups <= 32


def test_group_norm_rule_one_is_gcd() -> None:
    for channels in (8, 16, 24, 32, 48, 96, 128):
        assert group_norm(channels, min_group_channels=1).num_groups == math.gcd(32, channels)
    assert group_norm(128).num_groups == 32  # DDPM's width keeps DDPM's 32 groups


def test_unet_output_mean_follows_input_mean() -> None:
    """A brighter input must be able to change the prediction's mean, which one-channel groups all but forbid."""
    responses = {}
    for min_group_channels in (1, 4):
        torch.manual_seed(0)
        net = create_model(
            "unet",
            3,
            10,
            base_channels=32,
            channel_multipliers=[1, 2],
            num_res_blocks=1,
            attention_levels=[],
            dropout=0.0,
            resample="conv",
            min_group_channels=min_group_channels,
        ).eval()
        # The zero-initialised convolutions would make every output 0, whatever the input.
        for module in net.modules():
            if isinstance(module, nn.Conv2d) and not module.weight.any():
                nn.init.normal_(module.weight, std=0.05)
        images, timesteps = torch.randn(8, 3, 16, 16), torch.full((8,), 500)
        with torch.no_grad():
            change = net(images + 1.0, timesteps) - net(images, timesteps)
        responses[min_group_channels] = change.mean(dim=(2, 3)).abs().mean().item()

    assert responses[4] > 5 * responses[1]


def test_sample_script_end_to_end(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import sample

    command = [
        sys.executable,
        str(ROOT / "sample.py"),
        f"ckpt_path={tiny_checkpoint}",
        f"output_dir={tmp_path / 'script'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "sampler=ddim",
        "eta=0.0",
        "num_steps=4",
        "num_samples=6",
        "batch_size=4",
        "seed=0",
    ]
    # The same thread count as this process, so that both compute the same convolutions.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "4 per image" in output
    assert "FLOPs per image" in output
    assert "sampler wall time" in output
    assert (tmp_path / "script" / "samples.png").is_file()

    arrays = np.load(tmp_path / "script" / "samples.npz")
    images = arrays["images"]
    assert images.shape == (6, 8, 8, 1)
    assert images.dtype == np.uint8
    # Without class_label, a class-conditional model samples the classes in turn.
    assert arrays["labels"].tolist() == [0, 1, 2, 3, 4, 5]
    settings = json.loads(str(arrays["settings"]))
    assert settings["num_steps"] == 4
    assert settings["network_evaluations_per_image"] == 4
    assert settings["flops_per_image"] == 4 * settings["flops_per_network_evaluation"]

    # DDIM with eta 0 and the same seed gives the script's images again in this process.
    # Another batch size gives them too, because the initial noise is drawn once for all
    # images, but it may change the rounding of the convolutions, so that allows 1 grey level.
    common = (f"ckpt_path={tiny_checkpoint}", "sampler=ddim", "eta=0.0", "num_steps=4", "num_samples=6", "seed=0")
    sample.run_sampling(compose_sample_config(*common, "batch_size=4", f"output_dir={tmp_path / 'same'}"))
    sample.run_sampling(compose_sample_config(*common, "batch_size=6", f"output_dir={tmp_path / 'batch6'}"))
    other_seed = (*common[:-1], "seed=1", "batch_size=4", f"output_dir={tmp_path / 'other'}")
    sample.run_sampling(compose_sample_config(*other_seed))

    assert np.array_equal(images, np.load(tmp_path / "same" / "samples.npz")["images"])
    batch6_images = np.load(tmp_path / "batch6" / "samples.npz")["images"]
    assert np.abs(images.astype(np.int16) - batch6_images.astype(np.int16)).max() <= 1
    assert not np.array_equal(images, np.load(tmp_path / "other" / "samples.npz")["images"])


def test_sample_rejects_other_checkpoint(tmp_path: Path) -> None:
    import sample

    checkpoint = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": {}, "epoch": 0}, checkpoint)
    cfg = compose_sample_config(f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'out'}")

    with pytest.raises(ValueError, match="not written by DDPMModule"):
        sample.run_sampling(cfg)
    with pytest.raises(ValueError, match="add sampler=flow for a SlimFlow flow.pt"):
        sample.run_sampling(cfg)


def test_sample_names_missing_checkpoint(tmp_path: Path) -> None:
    import sample

    for missing in ((), ("ckpt_path=null",)):
        with pytest.raises(ValueError, match="sample.py needs ckpt_path="):
            sample.run_sampling(compose_sample_config(*missing, f"output_dir={tmp_path / 'out'}"))


def test_sample_lists_stages_of_pipeline_folder(tmp_path: Path) -> None:
    import sample

    for stage in ("teacher", "distillation"):
        (tmp_path / "run" / "stages" / stage).mkdir(parents=True)
        (tmp_path / "run" / "stages" / stage / "flow.pt").write_bytes(b"")
    cfg = compose_sample_config(f"ckpt_path={tmp_path / 'run'}", "sampler=flow", f"output_dir={tmp_path / 'out'}")

    with pytest.raises(ValueError, match="SlimFlow pipeline folder.*stages/distillation/flow.pt"):
        sample.run_sampling(cfg)


def test_evaluations_print_without_trailing_zero() -> None:
    import sample

    assert sample.describe_evaluations({"network_evaluations_per_image": 1.0}) == "1 per image"
    assert sample.describe_evaluations({"network_evaluations_per_image": 329.5}) == "329.5 per image"


def test_time_shift_settings_checked_when_off() -> None:
    settings = SamplerSettings(name="ddim", num_steps=5, time_shift={"window": 0, "cutoff": 0, "placement": "middle"})
    with pytest.raises(ValueError, match="time_shift.placement must be one of"):
        settings.make_time_shift()
    assert SamplerSettings(name="ddim", num_steps=5).make_time_shift() is None
