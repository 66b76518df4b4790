"""Sample images from a DDPM checkpoint: ``python sample.py ckpt_path=<run folder or .ckpt> [overrides]``.

Writes ``samples.png`` (a grid) and ``samples.npz`` (uint8 images ``(N, H, W, C)``, the
class labels of a class-conditional model, and the settings as JSON) to the output
folder, and prints the network evaluations and FLOPs per image and the sampler's wall
time. The checkpoint is read with ``torch.load(weights_only=True)``. See configs/sample.yaml.

With ``metrics.frechet=resnet20 metrics.feature_checkpoint=<classifier run folder or .ckpt>`` it
also prints the Frechet distance of the samples to ``metrics.data`` (see diffusion/frechet.py).
"""

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion.frechet import (
    FrechetResult,
    frechet_distance_to_reference,
    inception_fid,
    load_feature_network,
    reference_data_from_datamodule,
    reference_statistics,
    require_torch_fidelity,
    resolve_checkpoint_file,
    resolve_inception_weights,
)
from lightning_modules.diffusion import (
    SamplerSettings,
    build_sampler,
    cycle_class_labels,
    generate_samples,
    load_denoiser,
    per_evaluation_flops,
    save_grid,
    to_uint8,
)
from lightning_modules.setup_run import instantiate_user_object, resolve_checkpoint_path

# Configs refer to the project root through this variable, as in train.py.
os.environ["LEANLIGHT_ROOT"] = str(Path(__file__).resolve().parent)

log = logging.getLogger("sample")


def run_sampling(cfg: DictConfig) -> dict[str, Any]:
    """Sample ``cfg.num_samples`` images from ``cfg.ckpt_path``, write the PNG and npz; return a report."""
    checkpoint_path = resolve_checkpoint_path(cfg.ckpt_path)
    denoiser = load_denoiser(checkpoint_path, use_ema=cfg.use_ema)
    device = _resolve_device(cfg.device)
    net = denoiser.net.to(device)

    settings = SamplerSettings(
        name=cfg.sampler,
        num_steps=cfg.num_steps,
        spacing=cfg.spacing,
        eta=cfg.eta,
        clip_x0=cfg.clip_x0,
        time_shift=OmegaConf.to_container(cfg.time_shift, resolve=True),
    )
    sampler = build_sampler(settings, denoiser.alphabar, denoiser.prediction_type)
    # A missing feature checkpoint or weights file fails here, before minutes of sampling.
    check_frechet_config(cfg.metrics)
    labels = None
    if denoiser.class_conditional:
        labels = cycle_class_labels(cfg.num_samples, net.num_classes, cfg.class_label)
    elif cfg.class_label is not None:
        raise ValueError(
            f"class_label={cfg.class_label} was given, but the checkpoint's model is unconditional; "
            "set class_label=null or pass a checkpoint of a class-conditional model"
        )

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    samples, evaluations = generate_samples(
        net,
        sampler,
        settings,
        denoiser.image_shape,
        cfg.num_samples,
        cfg.batch_size,
        cfg.seed,
        device,
        class_labels=labels,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall_time_s = time.perf_counter() - start

    flops_per_evaluation = per_evaluation_flops(net, denoiser.image_shape, device)
    report = {
        "checkpoint": checkpoint_path,
        "weights": "EMA" if cfg.use_ema else "trained (no EMA)",
        "sampler": settings.describe(),
        "num_samples": cfg.num_samples,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "device": str(device),
        "network_evaluations_per_image": evaluations,
        "flops_per_network_evaluation": flops_per_evaluation,
        "flops_per_image": flops_per_evaluation * evaluations,
        "sampler_wall_time_s": wall_time_s,
    }

    output_dir = Path(cfg.output_dir)
    images = to_uint8(samples)
    grid_path = save_grid(images, output_dir / "samples.png")
    arrays = {
        "images": images.permute(0, 2, 3, 1).numpy(),
        "settings": np.array(json.dumps({**_sampling_settings(cfg), **report})),
    }
    if labels is not None:
        arrays["labels"] = labels.numpy()
    npz_path = output_dir / "samples.npz"
    np.savez(npz_path, **arrays)
    report["png"] = str(grid_path)
    report["npz"] = str(npz_path)
    if cfg.metrics.frechet is not None:
        report["frechet"] = compute_frechet(cfg.metrics, arrays["images"], device, cfg.paths.cache_dir).describe()
    return report


def check_frechet_config(metrics: DictConfig) -> None:
    """Raise ValueError, FileNotFoundError or ModuleNotFoundError when ``metrics.frechet`` lacks what it needs."""
    if metrics.frechet is None:
        return
    if metrics.frechet == "inception":
        resolve_inception_weights(metrics.inception_weights)
        require_torch_fidelity()
    elif str(metrics.frechet).startswith("resnet"):
        if metrics.feature_checkpoint is None:
            raise ValueError(
                f"metrics.frechet={metrics.frechet} needs metrics.feature_checkpoint=<run folder or .ckpt> "
                "of a classifier trained with `python train.py experiment=cifar10_resnet20`"
            )
        resolve_checkpoint_file(metrics.feature_checkpoint)
    else:
        raise ValueError(
            f"metrics.frechet={metrics.frechet} is invalid; use null, inception, or the CIFAR ResNet "
            "of metrics.feature_checkpoint, such as resnet20"
        )


def compute_frechet(metrics: DictConfig, images: np.ndarray, device: torch.device, cache_dir: str) -> FrechetResult:
    """Compute the Frechet distance of uint8 samples ``(N, H, W, C)`` to the reference data ``metrics.data``."""
    datamodule = instantiate_user_object(metrics.data)
    reference = reference_data_from_datamodule(datamodule, metrics.reference_split)
    if metrics.frechet == "inception":
        return inception_fid(
            images, reference.images, reference.label, metrics.inception_weights, metrics.batch_size, device
        )

    # NOTE: the checkpoint does not store the classifier's normalisation, so the reference data
    # module's is used. It matches when metrics.data is the data config the classifier trained on.
    network = load_feature_network(metrics.feature_checkpoint, reference.mean, reference.std)
    if network.name.lower() != str(metrics.frechet).lower():
        raise ValueError(
            f"metrics.frechet={metrics.frechet} but {metrics.feature_checkpoint} contains a {network.name}; "
            f"set metrics.frechet={network.name.lower()}"
        )
    statistics = reference_statistics(reference.images, network, reference.label, cache_dir, metrics.batch_size, device)
    return frechet_distance_to_reference(images, network, statistics, reference.label, metrics.batch_size, device)


def format_report(report: dict[str, Any]) -> str:
    """Render the report of :func:`run_sampling` as the table that sample.py logs to the terminal."""
    rows = [
        ("checkpoint", f"{report['checkpoint']} ({report['weights']} weights)"),
        ("sampler", report["sampler"]),
        ("samples", f"{report['num_samples']} in batches of {report['batch_size']}, seed {report['seed']}"),
        ("network evaluations", f"{report['network_evaluations_per_image']} per image"),
        (
            "FLOPs per image",
            f"{report['flops_per_image'] / 1e9:.4g} GFLOPs "
            f"({report['flops_per_network_evaluation'] / 1e6:.4g} MFLOPs per network evaluation, "
            "2 per MAC, convolutions and matrix products)",
        ),
        ("sampler wall time", f"{report['sampler_wall_time_s']:.2f} s on {report['device']}"),
        ("grid", report["png"]),
        ("arrays", report["npz"]),
    ]
    if "frechet" in report:
        rows.append(("Frechet distance", report["frechet"]))
    width = max(len(label) for label, _ in rows)
    return "\n".join(["", "leanlight samples"] + [f"  {label:<{width}}  {value}" for label, value in rows]) + "\n"


def _sampling_settings(cfg: DictConfig) -> dict[str, Any]:
    """Return the config keys that decide the samples, as plain values for the npz file."""
    keys = ("ckpt_path", "use_ema", "sampler", "num_steps", "spacing", "eta", "clip_x0", "time_shift")
    keys += ("seed", "num_samples", "batch_size", "class_label", "device")
    return {key: OmegaConf.to_container(cfg[key]) if key == "time_shift" else cfg[key] for key in keys}


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    """Run :func:`run_sampling` and log its report; log a user-fixable error without a traceback."""
    try:
        report = run_sampling(cfg)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s\n(set HYDRA_FULL_ERROR=1 to see the traceback)", type(error).__name__, error)
        sys.exit(1)
    log.info(format_report(report))


if __name__ == "__main__":
    main()
