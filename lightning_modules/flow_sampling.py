"""``sample.py sampler=flow``: images from a rectified-flow checkpoint (a SlimFlow teacher or student).

The checkpoint is a ``flow.pt`` of a SlimFlow stage or a Lightning ``.ckpt`` of one of
its stages, recognised by its ``"rectified_flow"`` entry. Sampling is Euler with
``num_steps`` steps (1 for the one-step student) or, with ``flow_solver=rk45``, SciPy's
adaptive RK45. The outputs and the report have the layout of the diffusion samplers'.
"""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from lightning_modules.diffusion import per_evaluation_flops, save_samples, to_uint8
from lightning_modules.slimflow import generate_flow_samples, load_flow_model

FLOW_SOLVERS = ("euler", "rk45")


def run_flow_sampling(
    cfg: DictConfig,
    checkpoint_path: str,
    device: torch.device,
    compute_frechet: Callable[[DictConfig, np.ndarray, torch.device, str], Any],
) -> dict[str, Any]:
    """Sample ``cfg.num_samples`` images from the flow at ``checkpoint_path``, write PNG and npz; return a report.

    ``compute_frechet`` is sample.py's, called when ``cfg.metrics.frechet`` is set.
    """
    solver = cfg.get("flow_solver", "euler")
    if solver not in FLOW_SOLVERS:
        raise ValueError(f"flow_solver={solver!r} is invalid; use euler (with num_steps) or rk45 (adaptive)")
    if cfg.class_label is not None:
        raise ValueError(f"class_label={cfg.class_label} was given, but SlimFlow's flows are unconditional")
    if cfg.oms.ckpt_path is not None:
        raise ValueError("oms.ckpt_path is for diffusion samplers; set oms.ckpt_path=null with sampler=flow")
    loaded = load_flow_model(checkpoint_path, use_ema=cfg.use_ema)
    net = loaded.net.to(device)
    tolerance = float(cfg.get("flow_tolerance", 1e-5))

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    samples, evaluations = generate_flow_samples(
        net,
        loaded.image_shape,
        cfg.num_samples,
        cfg.batch_size,
        cfg.seed,
        device,
        solver=solver,
        num_steps=cfg.num_steps,
        rtol=tolerance,
        atol=tolerance,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall_time_s = time.perf_counter() - start

    metadata = loaded.metadata
    description = (
        f"rectified flow, Euler {cfg.num_steps} step(s)"
        if solver == "euler"
        else f"rectified flow, RK45 rtol=atol={tolerance:g}"
    )
    if metadata.get("distance_description"):
        description += f"; {metadata.get('role')} distilled with {metadata['distance_description']}"
    flops_per_evaluation = per_evaluation_flops(net, loaded.image_shape, device)
    report: dict[str, Any] = {
        "checkpoint": checkpoint_path,
        "weights": "EMA" if cfg.use_ema else "trained (no EMA)",
        "sampler": description,
        "num_samples": cfg.num_samples,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "device": str(device),
        "network_evaluations_per_image": evaluations,
        "flops_per_network_evaluation": flops_per_evaluation,
        "flops_per_image": flops_per_evaluation * evaluations,
        "sampler_wall_time_s": wall_time_s,
        "images_per_second": cfg.num_samples / wall_time_s if wall_time_s > 0 else None,
        "flow_role": metadata.get("role"),
        "distance": metadata.get("distance_description"),
    }

    settings = {"ckpt_path": cfg.ckpt_path, "use_ema": cfg.use_ema, "sampler": "flow", "flow_solver": solver}
    settings.update({"num_steps": cfg.num_steps, "flow_tolerance": tolerance, "seed": cfg.seed})
    grid_path, npz_path, images = save_samples(to_uint8(samples), {**settings, **report}, Path(cfg.output_dir))
    report["png"] = str(grid_path)
    report["npz"] = str(npz_path)
    if cfg.metrics.frechet is not None:
        report["frechet"] = compute_frechet(cfg.metrics, images, device, cfg.paths.cache_dir).describe()
    return report
