"""One More Step on CIFAR-10 (JPEG copy): brightness of a flawed-schedule DDPM's samples with and without OMS.

The base model is a UNet trained with Stable Diffusion's scaled-linear schedule (1000
steps, terminal alphabar 0.0047) and epsilon prediction, on CIFAR-10 images area-downsampled
to ``--image-size`` pixels. Two OMS modules train on the same images and the base schedule
only: an unconditional one, and one conditioned on quantile bins of mean brightness (with
condition dropout for classifier-free guidance). The base weights are checksummed before
OMS training and after all sampling.

For each base sampler (``--samplers``), the same initial noise is sampled twice, by the base
sampler alone and by the unconditional OMS step followed by the same sampler, and both are
compared with the data:

- brightness: fraction of samples in the data's darkest and brightest 5% of per-image mean
  brightness, and the Wasserstein-1 distance between the brightness distributions;
- Frechet distance in the feature space of a CIFAR-10 ResNet-20 (``--feature-checkpoint``),
  with the samples and the reference images (the test split, downsampled the same way)
  upsampled bilinearly to 32x32;
- low-frequency control: the brightness OMS asked for each bin, the mean generated
  brightness per bin against the data's mean brightness in that bin, next to the base
  sampler's single mean brightness against the same targets;
- the conditioned OMS as a fix of the brightness distribution: the control samples request
  every quantile bin equally often, as often as the data falls in it. They are pooled and
  compared with the data as above (arms ``base+OMS, bins, guidance g``). Their initial noise differs
  from the other two arms', and there are ``--control-samples`` times the number of bins.

The CPU run behind the numbers in BENCHMARKS.md (about 40 minutes on one busy core):

    OMP_NUM_THREADS=1 python scripts/benchmark_oms.py --threads 1 --train-subset 10000 \\
        --image-size 16 --base-width 16 --base-steps 800 --base-lr 1e-3 --oms-width 8 \\
        --oms-steps 500 --oms-batch-size 64 --num-samples 400 --control-samples 80 \\
        --guidance 1 2 --batch-size 200 --feature-checkpoint <ResNet-20 run folder> \\
        --output logs/benchmark_oms

The base checkpoint is cached in ``--output`` and reused when the same settings run again.
"""

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["LEANLIGHT_ROOT"] = str(ROOT)

from diffusion import add_noise, make_schedule, prediction_target  # noqa: E402
from diffusion.frechet import (  # noqa: E402
    feature_statistics,
    frechet_distance,
    load_feature_network,
)
from diffusion.oms import (  # noqa: E402
    BrightnessBins,
    OMSHandover,
    OMSNetwork,
    image_brightness,
    oms_loss,
)
from diffusion.oms_metrics import compare_brightness, per_bin_brightness_error  # noqa: E402
from lightning_modules.data import CIFAR10DataModule  # noqa: E402
from lightning_modules.diffusion import EMA, SamplerSettings, build_sampler, generate_samples, to_uint8  # noqa: E402
from models import create_model  # noqa: E402
from models.unet import MIN_GROUP_CHANNELS  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
BASE_SCHEDULE = {"name": "scaled_linear", "num_train_timesteps": 1000, "zero_terminal_snr": False}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 archive or folder")
    parser.add_argument("--output", default=str(ROOT / "logs" / "benchmark_oms"), help="folder for results and caches")
    parser.add_argument("--image-size", type=int, default=16, help="side of the area-downsampled images, in pixels")
    parser.add_argument("--train-subset", type=int, default=10000, help="class-stratified training images")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)

    parser.add_argument("--base-width", type=int, default=32, help="UNet base channels of the base model")
    parser.add_argument("--base-steps", type=int, default=2500, help="optimizer steps of the base model")
    parser.add_argument("--base-batch-size", type=int, default=64)
    parser.add_argument("--base-lr", type=float, default=5e-4)

    parser.add_argument("--oms-width", type=int, default=16, help="base channels of the OMS network")
    parser.add_argument("--oms-steps", type=int, default=800, help="optimizer steps of each OMS module")
    parser.add_argument("--oms-batch-size", type=int, default=128)
    parser.add_argument("--num-bins", type=int, default=5, help="quantile bins of the brightness OMS")
    parser.add_argument("--condition-dropout", type=float, default=0.1)
    parser.add_argument(
        "--min-group-channels",
        type=int,
        default=MIN_GROUP_CHANNELS,
        help="channels per GroupNorm group at the least, base and OMS networks (1: the rule of earlier runs)",
    )

    parser.add_argument(
        "--samplers",
        nargs="+",
        default=["ddim:20:trailing", "dpm_solver:10:leading"],
        help="base samplers as name:steps:spacing (ddpm, ddim, dpm_solver)",
    )
    parser.add_argument("--num-samples", type=int, default=1000, help="samples per arm of the brightness comparison")
    parser.add_argument("--control-samples", type=int, default=200, help="samples per requested brightness bin")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0], help="OMS guidance scales")
    parser.add_argument("--batch-size", type=int, default=250, help="images per sampling batch")
    parser.add_argument(
        "--feature-checkpoint", default=None, help="ResNet-20 classifier run folder or .ckpt for the Frechet distance"
    )
    return parser.parse_args()


# ---------------------------------------------------------------------------------------
# Data


def to_model_range(images: np.ndarray, image_size: int) -> torch.Tensor:
    """Map uint8 ``(N, H, W, C)`` images to float32 ``(N, C, size, size)`` in [-1, 1], area-downsampled."""
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if tensor.shape[-1] != image_size:
        tensor = F.interpolate(tensor, size=(image_size, image_size), mode="area")
    return tensor


def load_data(args: argparse.Namespace) -> dict[str, Any]:
    datamodule = CIFAR10DataModule(
        path=args.data, train_subset=args.train_subset, cache_dir=str(ROOT / ".cache"), val_size=5000
    )
    splits = datamodule.splits()
    everything = datamodule.load_data()
    train = to_model_range(splits.train.images, args.image_size)
    return {
        "train": train,
        "train_digest": hashlib.sha256(splits.train.images.tobytes()).hexdigest()[:16],
        # The brightness reference: all 50,000 training images. Area downsampling keeps the mean.
        "reference_brightness": image_brightness(to_model_range(everything.train_images, args.image_size)),
        "test_images": everything.test_images,
        "mean": datamodule.mean,
        "std": datamodule.std,
    }


# ---------------------------------------------------------------------------------------
# Training


def base_config(args: argparse.Namespace, data_digest: str) -> dict[str, Any]:
    return {
        "model": {
            "name": "unet",
            "base_channels": args.base_width,
            "channel_multipliers": [1, 2, 2],
            "num_res_blocks": 1,
            "attention_levels": [2],
            "dropout": 0.0,
            "resample": "conv",
            "min_group_channels": args.min_group_channels,
        },
        "schedule": BASE_SCHEDULE,
        "prediction_type": "epsilon",
        "steps": args.base_steps,
        "batch_size": args.base_batch_size,
        "lr": args.base_lr,
        "image_size": args.image_size,
        "data": data_digest,
        "seed": args.seed,
    }


def build_base(config: dict[str, Any]) -> torch.nn.Module:
    spec = dict(config["model"])
    return create_model(spec.pop("name"), 3, 10, **spec)


def train_base(args: argparse.Namespace, train: torch.Tensor, config: dict[str, Any], path: Path) -> torch.nn.Module:
    """Train the base DDPM, or load it from ``path`` when it was trained with the same ``config``."""
    net = build_base(config)
    if path.exists():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored["config"] == config:
            net.load_state_dict(stored["ema"])
            print(f"[base] loaded {path} (trained with the same settings)", flush=True)
            return net.eval()

    torch.manual_seed(args.seed)
    alphabar = make_schedule(**BASE_SCHEDULE)
    ema = EMA(net, 0.999)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.base_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    net.train()
    for step in range(1, args.base_steps + 1):
        indices = torch.randint(0, len(train), (args.base_batch_size,), generator=generator)
        x0 = train[indices]
        flip = torch.rand(len(x0), generator=generator) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        timesteps = torch.randint(0, len(alphabar), (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = add_noise(x0, noise, alphabar[timesteps])
        target = prediction_target(x0, noise, alphabar[timesteps], "epsilon")
        loss = F.mse_loss(net(x_t, timesteps), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        # A 100-step linear warm-up of the learning rate.
        for group in optimizer.param_groups:
            group["lr"] = args.base_lr * min(1.0, step / 100)
        optimizer.step()
        ema.update(net)
        if step % 100 == 0 or step == args.base_steps:
            print(
                f"[base] step {step}/{args.base_steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    torch.save({"config": config, "ema": ema.model.state_dict()}, path)
    return ema.model.eval()


def train_oms(
    args: argparse.Namespace, train: torch.Tensor, bins: BrightnessBins | None, label: str
) -> tuple[OMSNetwork, float]:
    """Train an OMS network on ``train`` alone; return its EMA copy and the training seconds."""
    torch.manual_seed(args.seed + 1)
    network = OMSNetwork(
        in_channels=3,
        base_channels=args.oms_width,
        channel_multipliers=(1, 2, 2),
        num_res_blocks=1,
        num_conditions=bins.num_bins if bins is not None else 0,
        min_group_channels=args.min_group_channels,
    )
    ema = EMA(network, 0.99)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed + 1)
    conditions_all = bins.assign(image_brightness(train)) if bins is not None else None
    start = time.perf_counter()
    for step in range(1, args.oms_steps + 1):
        indices = torch.randint(0, len(train), (args.oms_batch_size,), generator=generator)
        conditions = conditions_all[indices] if conditions_all is not None else None
        dropout = args.condition_dropout if bins is not None else 0.0
        loss = oms_loss(network, train[indices], conditions, dropout, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(network)
        if step % 200 == 0 or step == args.oms_steps:
            print(f"[oms {label}] step {step}/{args.oms_steps} loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - start
    return ema.model.eval(), seconds


def weights_checksum(net: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Sampling and measurement


def parse_sampler(text: str) -> SamplerSettings:
    name, steps, spacing = text.split(":")
    return SamplerSettings(name=name, num_steps=int(steps), spacing=spacing, eta=0.0, clip_x0=1.0)


def sample(
    args: argparse.Namespace,
    net: torch.nn.Module,
    settings: SamplerSettings,
    num_samples: int,
    handover: OMSHandover | None,
    seed: int,
) -> torch.Tensor:
    sampler = build_sampler(settings, make_schedule(**BASE_SCHEDULE), "epsilon")
    samples, _ = generate_samples(
        net,
        sampler,
        settings,
        (3, args.image_size, args.image_size),
        num_samples,
        args.batch_size,
        seed,
        "cpu",
        initial_sample=handover,
    )
    # Quantise as saved images are, so brightness and features see what sample.py writes.
    return to_uint8(samples).float() / 127.5 - 1.0


class FrechetScorer:
    """FD-ResNet20 of samples against the test images, both upsampled bilinearly to 32x32."""

    def __init__(self, args: argparse.Namespace, data: dict[str, Any]) -> None:
        # NOTE: the classifier checkpoint does not store its normalisation, so the mean and std of
        # this run's training subset stand in for those of the classifier's own training data.
        self.network = load_feature_network(args.feature_checkpoint, tuple(data["mean"]), tuple(data["std"]))
        reference = self.upsample(to_model_range(data["test_images"], args.image_size))
        self.reference = feature_statistics(self.network.extract_features(reference))

    @staticmethod
    def upsample(images: torch.Tensor) -> np.ndarray:
        if images.shape[-1] != 32:
            images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
        return to_uint8(images).permute(0, 2, 3, 1).numpy()

    def __call__(self, samples: torch.Tensor) -> float:
        statistics = feature_statistics(self.network.extract_features(self.upsample(samples)))
        return frechet_distance(statistics, self.reference)


def run_comparisons(
    args: argparse.Namespace,
    base: torch.nn.Module,
    oms_plain: OMSNetwork,
    oms_bright: OMSNetwork,
    bins: BrightnessBins,
    data: dict[str, Any],
    scorer: FrechetScorer | None,
) -> list[dict[str, Any]]:
    rows = []
    for text in args.samplers:
        settings = parse_sampler(text)
        row: dict[str, Any] = {"sampler": settings.describe()}
        for arm, handover in (("base", None), ("base+OMS", OMSHandover(oms_plain))):
            start = time.perf_counter()
            samples = sample(args, base, settings, args.num_samples, handover, args.seed)
            comparison = compare_brightness(image_brightness(samples), data["reference_brightness"])
            row[arm] = comparison.to_dict()
            if scorer is not None:
                row[arm]["frechet_resnet20"] = scorer(samples)
            row[arm]["sampling_s"] = time.perf_counter() - start
            print(f"[{settings.describe()}] {arm}: {json.dumps(row[arm])}", flush=True)
            if arm == "base":
                base_mean = comparison.sample_mean

        # Low-frequency control: every bin requested equally often.
        requested = torch.arange(args.control_samples * bins.num_bins) % bins.num_bins
        row["control_without_oms"] = per_bin_brightness_error(
            np.full(len(requested), base_mean), requested, bins.bin_means
        )
        for guidance in args.guidance:
            handover = OMSHandover(oms_bright, conditions=requested, guidance=guidance)
            samples = sample(args, base, settings, len(requested), handover, args.seed + 7)
            brightness = image_brightness(samples)
            control = per_bin_brightness_error(brightness, requested, bins.bin_means)
            control["fraction_in_requested_bin"] = float((bins.assign(brightness) == requested).float().mean())
            row[f"control_oms_guidance_{guidance:g}"] = control
            print(f"[{settings.describe()}] control, OMS guidance {guidance:g}: {json.dumps(control)}", flush=True)

            # Each quantile bin contains an equal share of the data and is requested equally often,
            # so the pooled samples follow the data's bin frequencies.
            arm = f"base+OMS, bins, guidance {guidance:g}"
            row[arm] = compare_brightness(brightness, data["reference_brightness"]).to_dict()
            row[arm]["num_samples"] = len(requested)
            if scorer is not None:
                row[arm]["frechet_resnet20"] = scorer(samples)
            print(f"[{settings.describe()}] {arm}: {json.dumps(row[arm])}", flush=True)
        rows.append(row)
    return rows


def write_markdown(path: Path, results: dict[str, Any]) -> None:
    lines = [
        f"Base: {results['base']['description']}. OMS: {results['oms']['description']}.",
        "",
        "| sampler | arm | darkest 5% | brightest 5% | W1 brightness | mean (std) brightness | FD-ResNet20 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        for arm in (key for key in row if key.startswith("base")):
            values = row[arm]
            frechet = f"{values['frechet_resnet20']:.2f}" if "frechet_resnet20" in values else "n/a"
            lines.append(
                f"| {row['sampler']} | {arm} | {values['dark_fraction']:.3f} | {values['bright_fraction']:.3f} "
                f"| {values['wasserstein_1']:.4f} | {values['sample_mean']:.3f} ({values['sample_std']:.3f}) "
                f"| {frechet} |"
            )
    data_row = results["rows"][0]["base"]
    lines += ["", f"Data: mean (std) brightness {data_row['data_mean']:.3f} ({data_row['data_std']:.3f}).", ""]
    lines += [
        "| sampler | brightness control | mean abs. error per bin | generated mean per bin | fraction in bin |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        for key, control in row.items():
            if not key.startswith("control_"):
                continue
            label = key.removeprefix("control_").replace("_", " ")
            generated = ", ".join(f"{value:.3f}" for value in control["generated_mean"])
            fraction = control.get("fraction_in_requested_bin")
            fraction_text = f"{fraction:.3f}" if fraction is not None else "n/a"
            lines.append(
                f"| {row['sampler']} | {label} | {control['mean_absolute_error']:.4f} | {generated} | {fraction_text} |"
            )
    targets = ", ".join(f"{value:.3f}" for value in results["oms"]["bin_means"])
    lines += ["", f"Target (data) mean brightness per bin: {targets}.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    args = parse_arguments()
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    data = load_data(args)
    train = data["train"]
    config = base_config(args, data["train_digest"])
    base = train_base(args, train, config, output / f"base_w{args.base_width}_s{args.image_size}.pt")
    parameters = sum(parameter.numel() for parameter in base.parameters())
    checksum_before = weights_checksum(base)

    bins = BrightnessBins.from_quantiles(image_brightness(train), args.num_bins)
    oms_plain, plain_seconds = train_oms(args, train, None, "unconditional")
    oms_bright, bright_seconds = train_oms(args, train, bins, "brightness")
    scorer = FrechetScorer(args, data) if args.feature_checkpoint else None

    rows = run_comparisons(args, base, oms_plain, oms_bright, bins, data, scorer)
    checksum_after = weights_checksum(base)
    if checksum_after != checksum_before:
        raise RuntimeError("the base model's weights changed during OMS training or sampling")

    alphabar = make_schedule(**BASE_SCHEDULE)
    oms_parameters = sum(parameter.numel() for parameter in oms_plain.parameters())
    results = {
        "arguments": vars(args),
        "base": {
            "description": (
                f"UNet {parameters / 1e6:.2f}M parameters, scaled-linear schedule (terminal alphabar "
                f"{float(alphabar[-1]):.4f}), epsilon prediction, {args.base_steps} steps of batch "
                f"{args.base_batch_size} on {len(train)} CIFAR-10 images at {args.image_size}x{args.image_size}, "
                "EMA 0.999"
            ),
            "parameters": parameters,
            "weights_sha256_before": checksum_before,
            "weights_sha256_after": checksum_after,
        },
        "oms": {
            "description": (
                f"OMSNetwork {oms_parameters / 1e3:.0f}k parameters, {args.oms_steps} steps of batch "
                f"{args.oms_batch_size} (unconditional: {plain_seconds:.0f} s; {bins.num_bins} brightness bins, "
                f"condition dropout {args.condition_dropout}: {bright_seconds:.0f} s)"
            ),
            "bin_edges": list(bins.edges),
            "bin_means": list(bins.bin_means),
        },
        "frechet": (
            f"FD-ResNet20 ({args.num_samples} samples vs the 10,000 test images, both at "
            f"{args.image_size}x{args.image_size} upsampled to 32x32)"
            if scorer is not None
            else None
        ),
        "rows": rows,
        "wall_s": time.perf_counter() - start,
    }
    (output / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(output / "results.md", results)
    print((output / "results.md").read_text())
    print(f"wrote {output / 'results.json'} and {output / 'results.md'} in {results['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
