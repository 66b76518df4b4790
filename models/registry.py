"""Backbones created by name: leanlight's own CIFAR models first, then any timm model."""

from collections.abc import Callable

import timm
import torch.nn as nn

ModelFactory = Callable[..., nn.Module]

# Attribute set on every model that create_model returns: the arguments that rebuild
# it (name, in_channels, num_classes, pretrained and extra keyword arguments), so a
# pruned copy can be saved with its architecture and loaded without this process.
MODEL_SPEC_ATTRIBUTE = "leanlight_model_spec"

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a factory ``f(in_channels, num_classes, **kwargs) -> nn.Module`` under ``name``."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice; pick another name")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Return the names of leanlight's own backbones (timm's are listed by ``timm.list_models``)."""
    return sorted(_REGISTRY)


def create_model(
    name: str,
    in_channels: int,
    num_classes: int,
    pretrained: bool = False,
    library: str = "auto",
    **kwargs,
) -> nn.Module:
    """Create a backbone by name, with its input channels and classes set from the data.

    ``library="auto"`` looks the name up in leanlight's models first (``resnet20`` ...
    ``resnet110``, ``vgg11_bn``, ``vgg16_bn``), then in timm; ``"leanlight"`` or
    ``"timm"`` looks in one only, which matters for names both have (timm's ``vgg16_bn``
    is the ImageNet VGG). Pretrained weights are loaded only when ``pretrained`` is
    true, and only timm models have them.
    """
    if library not in ("auto", "leanlight", "timm"):
        raise ValueError(f"model.library must be 'auto', 'leanlight' or 'timm', got {library!r}")
    if in_channels < 1 or num_classes < 1:
        raise ValueError(
            f"model {name!r} needs in_channels >= 1 and num_classes >= 1, "
            f"got in_channels={in_channels}, num_classes={num_classes}"
        )

    if name in _REGISTRY and library != "timm":
        if pretrained:
            raise ValueError(f"model {name!r} has no pretrained weights in leanlight; set model.pretrained=false")
        model = _REGISTRY[name](in_channels=in_channels, num_classes=num_classes, **kwargs)
    elif timm.is_model(name) and library != "leanlight":
        model = _create_timm_model(name, in_channels, num_classes, pretrained, **kwargs)
    else:
        raise ValueError(
            f"unknown model {name!r} (library={library}). leanlight models: {', '.join(list_models())}; "
            f"for timm models, look the name up with timm.list_models('*{name}*')"
        )
    spec = {
        "name": name,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "pretrained": False,
        "library": library,
        **kwargs,
    }
    setattr(model, MODEL_SPEC_ATTRIBUTE, spec)
    return model


def _create_timm_model(name: str, in_channels: int, num_classes: int, pretrained: bool, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, in_chans=in_channels, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError) as error:
        if not pretrained:
            raise
        # The weights come from the Hugging Face Hub; offline, or behind a firewall,
        # the download fails with a connection or file-not-found error.
        raise RuntimeError(
            f"could not load pretrained weights for timm model {name!r}: {error}. "
            "Connect to the Hugging Face Hub, put the weights in its local cache "
            "(HF_HOME) and set HF_HUB_OFFLINE=1, or set model.pretrained=false"
        ) from error
