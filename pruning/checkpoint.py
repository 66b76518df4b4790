"""Save an extracted network with its architecture, and load it with one call.

The file contains only the model's name and constructor arguments, its state dict, the
layers of removed residual branches and an optional report, so it loads with
``torch.load(weights_only=True)``. Loading builds the dense model by name, puts the
stand-ins of removed branches in place and shrinks every layer to the shapes of the
stored tensors, so the pruned widths need not be known in advance.
"""

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from models import create_model
from models.registry import MODEL_SPEC_ATTRIBUTE
from pruning.blocks import removed_layers_of, replace_layers

FORMAT = "leanlight-pruned-model/1"
# Version 2 adds the stand-ins of removed residual branches. A network without any is
# still written as version 1, which readers from before layer pruning can load.
FORMAT_WITH_REMOVED_LAYERS = "leanlight-pruned-model/2"
FORMATS = (FORMAT, FORMAT_WITH_REMOVED_LAYERS)


def model_spec_of(net: nn.Module) -> dict[str, Any]:
    """Return the constructor arguments that :func:`models.create_model` stored on ``net``."""
    spec = getattr(net, MODEL_SPEC_ATTRIBUTE, None)
    if spec is None:
        raise ValueError(
            f"{type(net).__name__} was not created by models.create_model, so its architecture is unknown; "
            "pass spec={'name': ..., 'in_channels': ..., 'num_classes': ...} to save_pruned"
        )
    return dict(spec)


def save_pruned(
    path: str | Path, net: nn.Module, spec: dict[str, Any] | None = None, report: dict[str, Any] | None = None
) -> Path:
    """Save ``net`` (already extracted, without gates) so that :func:`load_pruned` rebuilds it.

    ``spec`` defaults to the arguments ``models.create_model`` recorded on ``net``.
    ``report`` may hold numbers, strings, lists and dicts of them (kept channels, FLOPs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {key: value.detach().cpu().contiguous() for key, value in net.state_dict().items()}
    removed_layers = removed_layers_of(net)
    payload = {
        "format": FORMAT_WITH_REMOVED_LAYERS if removed_layers else FORMAT,
        "model": spec or model_spec_of(net),
        "state_dict": state_dict,
        "removed_layers": removed_layers,
        "report": report or {},
    }

    # Written beside the target and renamed over it, so an interrupted save never replaces a good file.
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)
    return path


def load_pruned(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a network saved by :func:`save_pruned`, in eval mode, with ``torch.load(weights_only=True)``."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") not in FORMATS:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{path} is not a pruned model saved by pruning.save_pruned (format {found!r}, expected one of "
            f"{', '.join(FORMATS)}); a newer format needs a newer leanlight"
        )
    spec = dict(payload["model"])
    net = create_model(**spec)
    # A version 1 file may have no "removed_layers" entry.
    replace_layers(net, payload.get("removed_layers", {}))
    resize_to_state_dict(net, payload["state_dict"])
    net.load_state_dict(payload["state_dict"], strict=True)
    return net.eval()


@torch.no_grad()
def resize_to_state_dict(net: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Shrink ``net``'s convolutions, linear layers and BatchNorms in place to the shapes in ``state_dict``.

    A depthwise convolution stays depthwise at its new width. Raises ``ValueError`` if
    a layer of another type has a tensor of a different shape.
    """
    for name, module in net.named_modules():
        prefix = f"{name}." if name else ""
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        tensors = {
            attribute: state_dict[prefix + attribute]
            for attribute, value in own
            if prefix + attribute in state_dict and value is not None
        }
        changed = {
            attribute: tensor
            for attribute, tensor in tensors.items()
            if tensor.shape != getattr(module, attribute).shape
        }
        if not changed:
            continue
        if isinstance(module, nn.Conv2d):
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            out_channels, in_per_group = tensors["weight"].shape[:2]
            if depthwise:
                module.groups = out_channels
            module.out_channels = out_channels
            module.in_channels = in_per_group * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = tensors["weight"].shape
        elif isinstance(module, _BatchNorm):
            module.num_features = tensors["running_mean" if "running_mean" in tensors else "weight"].shape[0]
        else:
            raise ValueError(
                f"cannot resize layer {name!r} ({type(module).__name__}) to the stored shapes "
                f"{ {key: tuple(value.shape) for key, value in changed.items()} }; only Conv2d, Linear and "
                "BatchNorm layers change width when pruned"
            )
        for attribute, tensor in tensors.items():
            old = getattr(module, attribute)
            new_value = torch.empty(tensor.shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(module, attribute, nn.Parameter(new_value, requires_grad=old.requires_grad))
            else:
                setattr(module, attribute, new_value)
