"""VGG with BatchNorm for 32x32 inputs (Simonyan and Zisserman, 2015).

The CIFAR variant used across the pruning literature: the convolutional layers of
the ImageNet VGG, each followed by BatchNorm and ReLU, then global average pooling
and one linear classifier instead of the three large fully connected layers.
VGG-16 has 14.7M parameters here. Pooling uses ``ceil_mode`` so inputs
smaller than 32x32 (such as 8x8 digits) stay at least one pixel wide.

Two options give the VGG of the spiking-network literature (IIR-SNN, Chowdhury et al.,
2022, and the hybrid conversion code it builds on): ``pooling="avg"`` for 2x2 average
pooling, and ``dropout`` after the ReLU of every convolution that no pooling follows.
"""

import torch
import torch.nn as nn

from models.registry import register_model

POOLINGS = ("max", "avg")

# Output channels of each 3x3 convolution, and "M" for a 2x2 pooling (max or average, see CifarVGG).
_LAYOUTS: dict[str, list[int | str]] = {
    "vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class CifarVGG(nn.Module):
    """VGG feature extractor with BatchNorm, global average pooling and a linear classifier.

    Args:
        layout: output channels of each 3x3 convolution, and ``"M"`` for a 2x2 pooling.
        in_channels: channels of the input images.
        num_classes: outputs of the classifier.
        pooling: ``"max"`` (the pruning literature's VGG) or ``"avg"`` (the spiking-network
            literature's, where an average of spikes keeps their rate).
        dropout: probability of the dropout after the ReLU of each convolution that is not
            followed by pooling. IIR-SNN's VGG uses 0.2. 0 adds no dropout layers.
    """

    def __init__(
        self,
        layout: list[int | str],
        in_channels: int = 3,
        num_classes: int = 10,
        pooling: str = "max",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"model.dropout must be a probability in [0, 1), got {dropout!r}")

        layers: list[nn.Module] = []
        channels = in_channels
        for index, item in enumerate(layout):
            if item == "M":
                layers.append(_pooling_layer(pooling))
                continue
            layers += [
                nn.Conv2d(channels, int(item), 3, padding=1, bias=False),
                nn.BatchNorm2d(int(item)),
                nn.ReLU(inplace=True),
            ]
            pooled_next = index + 1 < len(layout) and layout[index + 1] == "M"
            if dropout > 0 and not pooled_next:
                layers.append(nn.Dropout(dropout))
            channels = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _pooling_layer(pooling: str) -> nn.Module:
    if pooling == "avg":
        return nn.AvgPool2d(2, 2, ceil_mode=True)
    return nn.MaxPool2d(2, 2, ceil_mode=True)


def _register(name: str) -> None:
    @register_model(name)
    def factory(in_channels: int = 3, num_classes: int = 10, pooling: str = "max", dropout: float = 0.0) -> CifarVGG:
        return CifarVGG(_LAYOUTS[name], in_channels, num_classes, pooling=pooling, dropout=dropout)


for _name in _LAYOUTS:
    _register(_name)


@register_model("vgg_bn")
def vgg_with_layout(
    layout: list[int | str], in_channels: int = 3, num_classes: int = 10, pooling: str = "max", dropout: float = 0.0
) -> CifarVGG:
    """Build a CifarVGG with any layout: the output channels of each 3x3 convolution, and "M" for 2x2 pooling.

    Small layouts such as ``[16, "M", 32, "M", 64]`` suit 8x8 digits, where vgg11_bn's
    last four convolutions see 1x1 feature maps.
    """
    items = list(layout)
    if not items or not all(item == "M" or (isinstance(item, int) and item > 0) for item in items):
        raise ValueError(f"model.layout must list positive channel counts and 'M', got {items!r}")
    if not isinstance(items[0], int):
        raise ValueError(f"model.layout must start with a convolution's channel count, got {items!r}")
    return CifarVGG(items, in_channels, num_classes, pooling=pooling, dropout=dropout)
