"""Backbones created by name: leanlight's own CIFAR models first, then any timm model."""

from collections.abc import Callable

import timm
import torch.nn as nn

ModelFactory = Callable[..., nn.Module]

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
    **kwargs,
) -> nn.Module:
    """Create a backbone by name, with its input channels and classes set from the data.

    leanlight's names (``resnet20`` ... ``resnet110``, ``vgg11_bn``, ``vgg16_bn``) take
    precedence; any other name goes to ``timm.create_model``. Pretrained weights are
    loaded only when ``pretrained`` is true, and only timm models have them.
    """
    if in_channels < 1 or num_classes < 1:
        raise ValueError(
            f"model {name!r} needs in_channels >= 1 and num_classes >= 1, "
            f"got in_channels={in_channels}, num_classes={num_classes}"
        )

    if name in _REGISTRY:
        if pretrained:
            raise ValueError(f"model {name!r} has no pretrained weights in leanlight; set model.pretrained=false")
        return _REGISTRY[name](in_channels=in_channels, num_classes=num_classes, **kwargs)

    if not timm.is_model(name):
        raise ValueError(
            f"unknown model {name!r}. leanlight models: {', '.join(list_models())}; "
            f"for timm models, look the name up with timm.list_models('*{name}*')"
        )
    return _create_timm_model(name, in_channels, num_classes, pretrained, **kwargs)


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
