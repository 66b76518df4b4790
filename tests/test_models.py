"""Backbones: parameter counts against the papers, shapes for any input, errors by name."""

import huggingface_hub
import pytest
import torch

from models import create_model, list_models
from models.cifar_resnet import CifarResNet


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        # He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M.
        ("resnet20", 0.27e6),
        ("resnet32", 0.46e6),
        ("resnet44", 0.66e6),
        ("resnet56", 0.85e6),
        ("resnet110", 1.7e6),
    ],
)
def test_cifar_resnet_parameter_count(name: str, parameters: float) -> None:
    model = create_model(name, in_channels=3, num_classes=10)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - parameters) / parameters < 0.03


def test_vgg16_parameter_count() -> None:
    model = create_model("vgg16_bn", in_channels=3, num_classes=10)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 14.7e6) / 14.7e6 < 0.01


def test_vgg_average_pooling_and_dropout_layout() -> None:
    model = create_model("vgg_bn", 3, 10, layout=[16, "M", 32, 32, "M", 64], pooling="avg", dropout=0.2)
    kinds = [type(module).__name__ for module in model.features]
    # Dropout follows each ReLU that no pooling follows, as in IIR-SNN's VGG.
    assert kinds == [
        "Conv2d", "BatchNorm2d", "ReLU", "AvgPool2d",
        "Conv2d", "BatchNorm2d", "ReLU", "Dropout",
        "Conv2d", "BatchNorm2d", "ReLU", "AvgPool2d",
        "Conv2d", "BatchNorm2d", "ReLU", "Dropout",
    ]  # fmt: skip
    assert model.features[7].p == 0.2


def test_vgg_defaults_keep_max_pooling_without_dropout() -> None:
    model = create_model("vgg11_bn", in_channels=3, num_classes=10)
    kinds = {type(module).__name__ for module in model.features}
    assert "MaxPool2d" in kinds
    assert not kinds & {"AvgPool2d", "Dropout"}


def test_vgg_rejects_invalid_pooling_and_dropout() -> None:
    with pytest.raises(ValueError, match="model.pooling must be one of max, avg, got 'mean'"):
        create_model("vgg11_bn", 3, 10, pooling="mean")
    with pytest.raises(ValueError, match="model.dropout must be a probability in \\[0, 1\\), got 1.0"):
        create_model("vgg_bn", 3, 10, layout=[16, "M"], dropout=1.0)
    with pytest.raises(ValueError, match="model.dropout must be a probability in \\[0, 1\\), got None"):
        create_model("vgg_bn", 3, 10, layout=[16, "M"], dropout=None)


@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn", "vgg16_bn", "resnet18", "mobilenetv2_050"])
@pytest.mark.parametrize(("in_channels", "size"), [(1, 8), (3, 32)])
def test_backbone_output_shape(name: str, in_channels: int, size: int) -> None:
    model = create_model(name, in_channels=in_channels, num_classes=7).eval()
    logits = model(torch.randn(2, in_channels, size, size))
    assert logits.shape == (2, 7)


def test_shortcut_option_b_has_projection() -> None:
    option_a = CifarResNet(20, shortcut="A")
    option_b = CifarResNet(20, shortcut="B")
    extra = sum(p.numel() for p in option_b.parameters()) - sum(p.numel() for p in option_a.parameters())
    # Two 1x1 projections with BatchNorm: 16*32 + 2*32 and 32*64 + 2*64.
    assert extra == 16 * 32 + 64 + 32 * 64 + 128


def test_invalid_depth_is_rejected() -> None:
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21)


def test_unknown_model_names_the_name() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet_nope'"):
        create_model("resnet_nope", in_channels=3, num_classes=10)


def test_leanlight_models_are_listed() -> None:
    assert {"resnet20", "resnet56", "vgg16_bn"} <= set(list_models())


def test_pretrained_leanlight_model_is_rejected() -> None:
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_model("resnet20", in_channels=3, num_classes=10, pretrained=True)


def test_pretrained_offline_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; offline mode fails at once
    # instead of retrying the download for most of a minute.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="model.pretrained=false"):
        create_model("resnet18", in_channels=3, num_classes=10, pretrained=True)


def test_timm_library_overrides_leanlight_name() -> None:
    leanlight_vgg = create_model("vgg11_bn", in_channels=3, num_classes=10)
    timm_vgg = create_model("vgg11_bn", in_channels=3, num_classes=10, library="timm")
    assert type(leanlight_vgg).__name__ == "CifarVGG"
    assert type(timm_vgg).__name__ == "VGG"
