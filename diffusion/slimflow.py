"""SlimFlow's training objectives: Annealing Reflow and Flow-Guided Distillation, and their distances.

Zhu et al., "SlimFlow: Training Smaller One-Step Diffusion Models with Rectified Flow"
(ECCV 2024).

- Annealing Reflow trains a small student from scratch on a teacher's reflow pairs, with
  the paired noise loosened at first: ``z0' = sqrt(1 - beta^2) z0 + beta eps``, beta going
  from 1 (noise independent of the image) to 0 (the exact pairs) over the first N steps.
- Flow-Guided Distillation trains the one-step prediction ``z0 + v_s(z0, eps)`` on the
  pairs (term 1) and on the end point of a one-step Euler move of a frozen guide flow from
  a point the student itself reached (term 2).

The distance ``d`` of the distillation terms is LPIPS (VGG) in SlimFlow. LPIPS needs ImageNet
VGG-16 weights, so it is used only when the user gives a weights file. The default is the
pseudo-Huber distance of improved consistency training (Song and Dhariwal, 2023):
``sqrt(|x - y|^2 + c^2) - c`` with ``c = 0.00054 sqrt(d)`` for images of ``d`` values.
"""

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion.rectified_flow import T_EPSILON, VelocityField

BETA_SCHEDULES = ("linear", "cosine", "exponential")
DISTANCES = ("pseudo_huber", "l2", "lpips")
# c = PSEUDO_HUBER_FACTOR * sqrt(values per image), as in improved consistency training.
PSEUDO_HUBER_FACTOR = 0.00054
# SlimFlow resizes both images to 64x64 before LPIPS.
LPIPS_RESOLUTION = 64


# ---------------------------------------------------------------------------------------
# Annealing Reflow


def annealing_beta(step: int, anneal_steps: int, schedule: str = "linear") -> float:
    """Return beta at optimizer step ``step`` for annealing over ``anneal_steps`` steps.

    linear: ``1 - min(1, step / N)``; cosine: ``(1 + cos(pi min(1, step / N))) / 2``; both
    reach 0 at step N. exponential: ``exp(-step / N)``, which only decays towards 0.
    ``anneal_steps = 0`` means no annealing (beta = 0, the exact pairs) from the start.
    """
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {schedule!r}; valid schedules: {', '.join(BETA_SCHEDULES)}")
    if anneal_steps < 0 or step < 0:
        raise ValueError(f"step and anneal_steps must be >= 0, got {step} and {anneal_steps}")
    if anneal_steps == 0:
        return 0.0
    progress = min(1.0, step / anneal_steps)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return math.exp(-step / anneal_steps)


def anneal_noise(z0: torch.Tensor, beta: float, fresh_noise: torch.Tensor) -> torch.Tensor:
    """Return ``sqrt(1 - beta^2) z0 + beta * fresh_noise``, still standard normal when both inputs are."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return math.sqrt(1.0 - beta * beta) * z0 + beta * fresh_noise


def joint_horizontal_flip(
    x1: torch.Tensor, z0: torch.Tensor, probability: float = 0.5, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip image and noise of the whole batch horizontally together with ``probability``, else return them.

    Both are flipped, so each noise stays pixel-aligned with its image, which is what the
    pairing carries.
    """
    if torch.rand((), generator=generator).item() < probability:
        return x1.flip(-1), z0.flip(-1)
    return x1, z0


# ---------------------------------------------------------------------------------------
# Distances for distillation

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pseudo_huber_constant(values_per_image: int) -> float:
    """Return the pseudo-Huber constant ``c = 0.00054 sqrt(d)`` of improved consistency training."""
    return PSEUDO_HUBER_FACTOR * math.sqrt(values_per_image)


def pseudo_huber_distance(x: torch.Tensor, y: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Return the batch mean of ``sqrt(|x - y|^2 + c^2) - c``, the norm taken over each image's values.

    ``c`` defaults to :func:`pseudo_huber_constant` of the image size.
    """
    difference = (x - y).float().flatten(1)
    if c is None:
        c = pseudo_huber_constant(difference.shape[1])
    return (torch.sqrt(difference.pow(2).sum(1) + c * c) - c).mean()


def l2_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Return the mean squared difference over all values of the batch."""
    return F.mse_loss(x.float(), y.float())


class LPIPSDistance(nn.Module):
    """LPIPS with a VGG-16 backbone (Zhang et al., 2018), from torchmetrics, with user-supplied VGG weights.

    The linear layers of LPIPS ship with torchmetrics (``lpips_models/vgg.pth``). The VGG-16
    ImageNet weights are read from ``vgg_weights``, a torchvision ``vgg16`` state dict such as
    ``vgg16-397923af.pth``, and never downloaded. Images in [-1, 1] are resized to 64x64, as
    in SlimFlow's code, and grey images are repeated to three channels.
    """

    def __init__(self, vgg_weights: str | Path) -> None:
        super().__init__()
        path = lpips_weights_file(vgg_weights)
        try:
            import torchvision
            from torchmetrics.functional.image.lpips import _LPIPS
        except ImportError as error:
            raise ModuleNotFoundError(
                f"LPIPS needs torchmetrics and torchvision ({error}); install them or use distance pseudo_huber"
            ) from None

        # pnet_rand=True builds the VGG slices without downloading ImageNet weights; they are loaded below.
        self.lpips = _LPIPS(pretrained=True, net="vgg", pnet_rand=True)
        vgg = torchvision.models.vgg16(weights=None)
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            vgg.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"{path} is not a torchvision vgg16 state dict: {error}") from None
        for slice_module in (self.lpips.net.slice1, self.lpips.net.slice2, self.lpips.net.slice3):
            self._copy_layers(slice_module, vgg.features)
        for slice_module in (self.lpips.net.slice4, self.lpips.net.slice5):
            self._copy_layers(slice_module, vgg.features)
        self.lpips.eval().requires_grad_(False)

    @staticmethod
    def _copy_layers(slice_module: nn.Sequential, features: nn.Sequential) -> None:
        # The slices keep the layer indices of vgg16.features as their child names.
        for name, layer in slice_module.named_children():
            layer.load_state_dict(features[int(name)].state_dict())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return the batch mean LPIPS between images ``x`` and ``y`` in [-1, 1]."""
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        size = (LPIPS_RESOLUTION, LPIPS_RESOLUTION)
        x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
        y = F.interpolate(y.float(), size=size, mode="bilinear", align_corners=False)
        return self.lpips(x, y, normalize=False).mean()


def lpips_weights_file(vgg_weights: str | Path | None) -> Path:
    """Return the path of the VGG-16 weights for LPIPS; raise if none is given or the file does not exist."""
    if vgg_weights is None:
        raise ValueError(
            "distance lpips needs the VGG-16 ImageNet weights, which are never downloaded: set "
            "module.distance.vgg_weights=<torchvision vgg16 .pth>, or use module.distance.name=pseudo_huber"
        )
    path = Path(vgg_weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"VGG-16 weights file {path} for LPIPS not found. Pass a torchvision vgg16 state dict "
            "(vgg16-397923af.pth) as module.distance.vgg_weights, or use module.distance.name=pseudo_huber"
        )
    return path


def check_distance(name: str, vgg_weights: str | Path | None = None) -> None:
    """Raise the error that :func:`make_distance` would raise, without building the distance."""
    describe_distance(name)
    if name == "lpips":
        lpips_weights_file(vgg_weights)


def make_distance(name: str = "pseudo_huber", vgg_weights: str | Path | None = None) -> Distance:
    """Return the distillation distance ``name``: pseudo_huber (default), l2, or lpips with ``vgg_weights``."""
    check_distance(name, vgg_weights)
    if name == "pseudo_huber":
        return pseudo_huber_distance
    if name == "l2":
        return l2_distance
    return LPIPSDistance(vgg_weights)


def describe_distance(name: str) -> str:
    """Return the distance's name as results state it, e.g. "pseudo-Huber (c = 0.00054 sqrt(d))"."""
    descriptions = {
        "pseudo_huber": "pseudo-Huber (c = 0.00054 sqrt(d), improved consistency training)",
        "l2": "L2 (mean squared error)",
        "lpips": "LPIPS (VGG-16, 64x64)",
    }
    if name not in descriptions:
        raise ValueError(f"unknown distance {name!r}; valid distances: {', '.join(DISTANCES)}")
    return descriptions[name]


# ---------------------------------------------------------------------------------------
# Flow-Guided Distillation


def one_step_prediction(velocity: VelocityField, z0: torch.Tensor, eps: float = T_EPSILON) -> torch.Tensor:
    """Return the one-step image ``z0 + v(z0, eps)``."""
    t = torch.full((z0.shape[0],), eps, device=z0.device)
    return z0 + velocity(z0, t)


def paired_distillation_loss(
    student: VelocityField, z0: torch.Tensor, x1: torch.Tensor, distance: Distance, eps: float = T_EPSILON
) -> torch.Tensor:
    """Return term 1, ``d(z0 + v_s(z0, eps), x1)`` on reflow pairs."""
    return distance(one_step_prediction(student, z0, eps), x1)


def flow_guidance_loss(
    student: VelocityField,
    guide: VelocityField,
    noise: torch.Tensor,
    t_prime: torch.Tensor,
    distance: Distance,
    eps: float = T_EPSILON,
) -> torch.Tensor:
    """Return term 2, ``d(noise + v_s, x_t' + (1 - t') v_guide(x_t', t'))`` with ``x_t' = noise + t' v_s``.

    ``v_s = v_s(noise, eps)`` carries the gradient in the first argument only. The guide's
    target is computed without gradient from the student's detached velocity.
    ``t_prime`` has shape ``(B,)``.
    """
    t = torch.full((noise.shape[0],), eps, device=noise.device)
    student_velocity = student(noise, t)
    prediction = noise + student_velocity
    target = flow_guidance_target(guide, noise, student_velocity.detach(), t_prime)
    return distance(prediction, target)


@torch.no_grad()
def flow_guidance_target(
    guide: VelocityField, noise: torch.Tensor, student_velocity: torch.Tensor, t_prime: torch.Tensor
) -> torch.Tensor:
    """Return term 2's target: step the student's line to ``t'``, then one guide Euler step to t = 1.

    ``noise`` and ``student_velocity`` have shape ``(B, C, H, W)``, ``t_prime`` shape ``(B,)``;
    the result has the shape of ``noise``.
    """
    times = t_prime.to(noise.device, noise.dtype).view(-1, *([1] * (noise.ndim - 1)))
    x_t = noise + times * student_velocity
    return x_t + (1.0 - times) * guide(x_t, t_prime.to(noise.device))


def sample_t_prime(batch_size: int, low: float, high: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``t' ~ U(low, high)`` of shape ``(batch_size,)`` on the CPU."""
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"the range of t' must satisfy 0 <= low <= high <= 1, got [{low}, {high}]")
    return torch.rand(batch_size, generator=generator) * (high - low) + low
