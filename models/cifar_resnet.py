"""ResNets for 32x32 inputs (He et al., "Deep Residual Learning for Image Recognition", 2016, section 4.2).

Depth is 6n + 2: a 3x3 stem with 16 channels, three stages of n basic blocks with
16, 32 and 64 channels (the last two halve the resolution), global average pooling
and a linear classifier. ResNet-20 has 0.27M parameters and ResNet-56 0.85M.

Shortcuts where the shape changes follow one of the paper's two options:

- ``"A"`` (the paper's choice for CIFAR): identity on the subsampled input, with
  the extra channels filled with zeros. No parameters.
- ``"B"``: a 1x1 convolution with stride 2 and BatchNorm.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import register_model


class PaddingShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and append ``extra_channels`` zero channels."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = _make_shortcut(in_channels, out_channels, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _make_shortcut(in_channels: int, out_channels: int, stride: int, option: str) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if option == "A":
        return PaddingShortcut(stride, out_channels - in_channels)
    if option == "B":
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    raise ValueError(f"unknown shortcut option {option!r}; use 'A' (zero padding) or 'B' (1x1 conv)")


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; any input size works, the classifier pools globally."""

    def __init__(
        self,
        depth: int,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        blocks_per_stage = (depth - 2) // 6

        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])

        stages = []
        channels = widths[0]
        for stage_index, width in enumerate(widths):
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(BasicBlock(channels, width, stride, shortcut))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages

        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _register(depth: int) -> None:
    @register_model(f"resnet{depth}")
    def factory(in_channels: int = 3, num_classes: int = 10, **kwargs) -> CifarResNet:
        return CifarResNet(depth, in_channels=in_channels, num_classes=num_classes, **kwargs)


for _depth in (20, 32, 44, 56, 110):
    _register(_depth)
