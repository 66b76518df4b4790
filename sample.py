"""Sample images from a DDPM checkpoint: ``python sample.py ckpt_path=<run folder or .ckpt> [overrides]``.

Writes ``samples.png`` (a grid) and ``samples.npz`` (uint8 images ``(N, H, W, C)``, the
class labels of a class-conditional model, and the settings as JSON) to the output
folder, and prints the network evaluations and FLOPs per image (the OMS step included)
and the sampler's wall time. The checkpoint is read with ``torch.load(weights_only=True)``.
See configs/sample.yaml.

With ``metrics.frechet=resnet20 metrics.feature_checkpoint=<classifier run folder or .ckpt>`` it
also prints the Frechet distance of the samples to ``metrics.data`` (see diffusion/frechet.py).

With ``oms.ckpt_path=<run of module=oms>`` a One More Step module (diffusion/oms.py) maps
the initial noise to the sampler's first timestep before the base model runs, for any
sampler, spacing and time shift; ``oms.condition`` and ``oms.guidance`` steer it.

With ``sampler=flow`` the checkpoint is a rectified flow of SlimFlow (``stages/<stage>/flow.pt``
of ``experiment=slimflow_*``), sampled with ``num_steps`` Euler steps (1 for the one-step
student) or with ``flow_solver=rk45`` (see lightning_modules/flow_sampling.py).
"""

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
    FeatureNetwork,
    FrechetResult,
    ReferenceData,
    frechet_distance_to_reference,
    inception_fid,
    load_feature_network,
    reference_data_from_datamodule,
    reference_statistics,
    require_torch_fidelity,
    resolve_checkpoint_file,
    resolve_inception_weights,
)
from diffusion.oms import OMSHandover, load_oms
from lightning_modules.callbacks.flops import count_forward_cost
from lightning_modules.data.errors import DataError
from lightning_modules.diffusion import (
    LoadedDenoiser,
    SamplerSettings,
    build_sampler,
    cycle_class_labels,
    generate_samples,
    load_denoiser,
    per_evaluation_flops,
    save_samples,
    to_uint8,
)
from lightning_modules.flow_sampling import run_flow_sampling
from lightning_modules.setup_run import instantiate_user_object, resolve_checkpoint_path

# Configs refer to the project root through this variable, as in train.py.
os.environ["LEANLIGHT_ROOT"] = str(Path(__file__).resolve().parent)

log = logging.getLogger("sample")


def run_sampling(cfg: DictConfig) -> dict[str, Any]:
    """Sample ``cfg.num_samples`` images from ``cfg.ckpt_path``, write the PNG and npz; return a report."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ValueError(
            "sample.py needs ckpt_path=<run folder or .ckpt> of a module=ddpm run, or the flow.pt of a SlimFlow "
            "stage with sampler=flow"
        )
    check_pipeline_folder(cfg.ckpt_path)
    checkpoint_path = resolve_checkpoint_path(cfg.ckpt_path)
    if cfg.sampler == "flow" and cfg.oms.ckpt_path is not None:
        raise ValueError(
            "oms.ckpt_path works with the diffusion samplers ddpm, ddim and dpm_solver, whose first timestep it "
            "hands over to, not with sampler=flow; set oms.ckpt_path=null"
        )
    if cfg.sampler == "flow":
        # A rectified-flow checkpoint of SlimFlow: Euler with num_steps, or flow_solver=rk45.
        check_frechet_config(cfg.metrics)
        return run_flow_sampling(cfg, checkpoint_path, _resolve_device(cfg.device), compute_frechet)
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
    # A missing feature checkpoint or weights file, or reference data of another shape, fails
    # here, before minutes of sampling.
    check_frechet_config(cfg.metrics, tuple(denoiser.image_shape))
    labels = None
    if denoiser.class_conditional:
        labels = cycle_class_labels(cfg.num_samples, net.num_classes, cfg.class_label)
    elif cfg.class_label is not None:
        raise ValueError(
            f"class_label={cfg.class_label} was given, but the checkpoint's model is unconditional; "
            "set class_label=null or pass a checkpoint of a class-conditional model"
        )
    handover, oms_report = build_oms_handover(cfg.oms, denoiser, cfg.num_samples, device)

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
        initial_sample=handover,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall_time_s = time.perf_counter() - start

    flops_per_evaluation = per_evaluation_flops(net, denoiser.image_shape, device)
    # The headline cost is the whole generation: the base model's steps plus the OMS step.
    oms_evaluations = 0 if oms_report is None else oms_report["network_evaluations_per_image"]
    oms_flops = 0 if oms_report is None else oms_report["flops_per_image"]
    report = {
        "checkpoint": checkpoint_path,
        "weights": "EMA" if cfg.use_ema else "trained (no EMA)",
        "sampler": settings.describe(),
        "num_samples": cfg.num_samples,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "device": str(device),
        "network_evaluations_per_image": evaluations + oms_evaluations,
        "base_network_evaluations_per_image": evaluations,
        "flops_per_network_evaluation": flops_per_evaluation,
        "flops_per_image": flops_per_evaluation * evaluations + oms_flops,
        "sampler_wall_time_s": wall_time_s,
        "oms": oms_report,
    }

    settings_record = {**_sampling_settings(cfg), **report}
    grid_path, npz_path, images = save_samples(to_uint8(samples), settings_record, Path(cfg.output_dir), labels)
    report["png"] = str(grid_path)
    report["npz"] = str(npz_path)
    if cfg.metrics.frechet is not None:
        report["frechet"] = compute_frechet(cfg.metrics, images, device, cfg.paths.cache_dir).describe()
    return report


def build_oms_handover(
    oms: DictConfig, denoiser: LoadedDenoiser, num_samples: int, device: torch.device
) -> tuple[OMSHandover | None, dict[str, Any] | None]:
    """Load the One More Step module of ``oms.ckpt_path`` for ``denoiser``; return the step and its report.

    ``oms.condition`` is null (the null condition, the module's unconditional estimate), an
    integer (that class or brightness bin for every sample) or ``"cycle"`` (0, 1, ... in turn).
    Returns ``(None, None)`` when ``oms.ckpt_path`` is null.
    """
    if oms.ckpt_path is None:
        if oms.condition is not None:
            raise ValueError(
                f"oms.condition={oms.condition} was given without oms.ckpt_path; set oms.ckpt_path=<run of "
                "module=oms> or oms.condition=null"
            )
        return None, None

    checkpoint_path = resolve_checkpoint_path(oms.ckpt_path)
    loaded = load_oms(checkpoint_path, use_ema=oms.use_ema)
    if tuple(loaded.image_shape) != tuple(denoiser.image_shape):
        raise ValueError(
            f"the OMS module of {checkpoint_path} was trained on images of shape {tuple(loaded.image_shape)}, but "
            f"the base model makes {tuple(denoiser.image_shape)}; train OMS on the base model's data"
        )

    network = loaded.network
    num_conditions = network.num_conditions
    conditions = None
    if oms.condition is not None:
        if num_conditions == 0:
            raise ValueError(
                f"oms.condition={oms.condition} was given, but the OMS module of {checkpoint_path} is unconditional; "
                "set oms.condition=null"
            )
        if oms.condition == "cycle":
            conditions = torch.arange(num_samples, dtype=torch.int64) % num_conditions
        elif isinstance(oms.condition, int) and 0 <= oms.condition < num_conditions:
            conditions = torch.full((num_samples,), oms.condition, dtype=torch.int64)
        else:
            raise ValueError(
                f"oms.condition={oms.condition} is invalid for a module with {num_conditions} {loaded.condition} "
                f"conditions; use null, cycle or an integer from 0 to {num_conditions - 1}"
            )

    guided = conditions is not None
    evaluations = 2 if guided else 1
    example = torch.zeros((1, *loaded.image_shape))
    flops = count_forward_cost(network, example).flops * evaluations
    report = {
        "checkpoint": checkpoint_path,
        "condition_kind": loaded.condition,
        "condition": oms.condition,
        "guidance": float(oms.guidance) if guided else None,
        "network_evaluations_per_image": evaluations,
        "flops_per_image": flops,
    }
    if loaded.brightness_bins is not None and isinstance(oms.condition, int):
        report["target_brightness"] = loaded.brightness_bins.bin_means[oms.condition]
    network.to(device)
    return OMSHandover(network, conditions, float(oms.guidance)), report


def check_frechet_config(metrics: DictConfig, image_shape: tuple[int, ...] | None = None) -> None:
    """Raise ValueError, FileNotFoundError or ModuleNotFoundError when ``metrics.frechet`` lacks what it needs.

    With the samples' ``image_shape`` ``(C, H, W)``, the reference data and the feature network
    are loaded and checked too, so that a mismatch fails before any sampling.
    """
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
    if image_shape is None:
        return

    channels, height, width = image_shape
    reference = load_frechet_reference(metrics, (height, width, channels))
    if metrics.frechet != "inception":
        load_feature_network_of(metrics, reference)


def load_frechet_reference(metrics: DictConfig, sample_shape: tuple[int, ...]) -> ReferenceData:
    """Load the reference images of ``metrics.data`` and check them against samples of shape ``(H, W, C)``."""
    datamodule = instantiate_user_object(metrics.data)
    try:
        reference = reference_data_from_datamodule(datamodule, metrics.reference_split)
    except DataError as error:
        raise DataError(
            "loading the reference data of the Frechet distance (metrics.data, CIFAR-10 by default) failed. For a "
            "model trained on other data, set data@metrics.data=<its data config>, such as data@metrics.data=digits. "
            f"The data error: {str(error).rstrip('.')}"
        ) from None
    if tuple(reference.images.shape[1:]) != tuple(sample_shape):
        raise ValueError(
            f"the samples are {tuple(sample_shape)} (height, width, channels) but the reference images of "
            f"{reference.label} are {tuple(reference.images.shape[1:])}, so their Frechet distance would mean "
            "nothing; set data@metrics.data (and its options, such as metrics.data.downsample_factor) to the data "
            "the model was trained on"
        )
    return reference


def load_feature_network_of(metrics: DictConfig, reference: ReferenceData) -> FeatureNetwork:
    """Load ``metrics.feature_checkpoint`` with the reference data's normalisation and check its name."""
    # NOTE: the checkpoint does not store the classifier's normalisation, so the reference data
    # module's is used. It matches when metrics.data is the data config the classifier trained on.
    network = load_feature_network(metrics.feature_checkpoint, reference.mean, reference.std)
    if network.name.lower() != str(metrics.frechet).lower():
        raise ValueError(
            f"metrics.frechet={metrics.frechet} but {metrics.feature_checkpoint} contains a {network.name}; "
            f"set metrics.frechet={network.name.lower()}"
        )
    return network


def check_pipeline_folder(ckpt_path: str) -> None:
    """Raise ``ValueError`` listing the stage checkpoints when ``ckpt_path`` is a SlimFlow pipeline folder."""
    flows = sorted(Path(ckpt_path).expanduser().glob("stages/*/flow.pt"))
    if flows:
        raise ValueError(
            f"ckpt_path={ckpt_path} is a SlimFlow pipeline folder; pass the flow.pt of one stage with sampler=flow: "
            + ", ".join(str(path) for path in flows)
        )


def compute_frechet(metrics: DictConfig, images: np.ndarray, device: torch.device, cache_dir: str) -> FrechetResult:
    """Compute the Frechet distance of uint8 samples ``(N, H, W, C)`` to the reference data ``metrics.data``."""
    reference = load_frechet_reference(metrics, images.shape[1:])
    if metrics.frechet == "inception":
        return inception_fid(
            images, reference.images, reference.label, metrics.inception_weights, metrics.batch_size, device
        )

    network = load_feature_network_of(metrics, reference)
    statistics = reference_statistics(reference.images, network, reference.label, cache_dir, metrics.batch_size, device)
    return frechet_distance_to_reference(images, network, statistics, reference.label, metrics.batch_size, device)


def format_report(report: dict[str, Any]) -> str:
    """Render the report of :func:`run_sampling` as the table that sample.py logs to the terminal."""
    rows = [
        ("checkpoint", f"{report['checkpoint']} ({report['weights']} weights)"),
        ("sampler", report["sampler"]),
        ("samples", f"{report['num_samples']} in batches of {report['batch_size']}, seed {report['seed']}"),
        ("network evaluations", describe_evaluations(report)),
        (
            "FLOPs per image",
            f"{report['flops_per_image'] / 1e9:.4g} GFLOPs "
            f"({report['flops_per_network_evaluation'] / 1e6:.4g} MFLOPs per base network evaluation, "
            "2 per MAC, convolutions and matrix products)",
        ),
        ("sampler wall time", f"{report['sampler_wall_time_s']:.2f} s on {report['device']}"),
        ("grid", report["png"]),
        ("arrays", report["npz"]),
    ]
    if report.get("oms") is not None:
        rows.append(("One More Step", describe_oms(report["oms"])))
    if "frechet" in report:
        rows.append(("Frechet distance", report["frechet"]))
    width = max(len(label) for label, _ in rows)
    return "\n".join(["", "leanlight samples"] + [f"  {label:<{width}}  {value}" for label, value in rows]) + "\n"


def describe_evaluations(report: dict[str, Any]) -> str:
    """Return the network evaluations per image, split into base model and OMS when OMS ran."""
    total = report["network_evaluations_per_image"]
    if report.get("oms") is None:
        return f"{total:g} per image"
    base = report["base_network_evaluations_per_image"]
    return f"{total:g} per image ({base:g} of the base model, {total - base:g} of the OMS module)"


def describe_oms(oms: dict[str, Any]) -> str:
    """Return one line on the OMS step of a report: checkpoint, condition, guidance and cost."""
    text = f"used, {oms['checkpoint']} ({oms['condition_kind']} module"
    if oms["condition"] is None:
        text += ", null condition"
    else:
        text += f", condition {oms['condition']}, guidance {oms['guidance']:g}"
    if "target_brightness" in oms:
        text += f", target brightness {oms['target_brightness']:.3f}"
    evaluations = oms["network_evaluations_per_image"]
    return text + f"; {evaluations} OMS evaluations, {oms['flops_per_image'] / 1e6:.4g} MFLOPs per image)"


def _sampling_settings(cfg: DictConfig) -> dict[str, Any]:
    """Return the config keys that decide the samples, as plain values for the npz file."""
    keys = ("ckpt_path", "use_ema", "sampler", "num_steps", "spacing", "eta", "clip_x0", "time_shift", "oms")
    keys += ("seed", "num_samples", "batch_size", "class_label", "device")
    return {key: OmegaConf.to_container(cfg[key]) if key in ("time_shift", "oms") else cfg[key] for key in keys}


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
