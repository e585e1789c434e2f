"""The same architectures in PyTorch (random weights), the baseline hetero's engines are measured against."""

from __future__ import annotations

import torch
from torch import nn

TORCHVISION_NAMES = {
    "squeezenet_v1.0": "squeezenet1_0",
    "squeezenet_v1.1": "squeezenet1_1",
    "resnet-18": "resnet18",
    "resnet-34": "resnet34",
    "resnet-50": "resnet50",
    "inception_v3": "inception_v3",
    "vgg-16": "vgg16",
    "vgg-19": "vgg19",
    "densenet-121": "densenet121",
}


def _mobilenet_v1() -> nn.Module:
    """MobileNet v1 (1.0, 224), which torchvision does not have."""

    def conv_bn(cin: int, cout: int, stride: int, groups: int = 1, kernel: int = 3) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    layers = conv_bn(3, 32, 2)
    plan = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)]
    plan += [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]
    for cin, cout, stride in plan:
        layers += conv_bn(cin, cin, stride, groups=cin) + conv_bn(cin, cout, 1, kernel=1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, 1000))


def torch_model(network: str) -> nn.Module | None:
    """A PyTorch model for a hetero network name, or None when there is no counterpart."""
    torch.manual_seed(0)
    if network == "mobilenet":
        return _mobilenet_v1()
    if network not in TORCHVISION_NAMES:
        return None
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": False} if network == "inception_v3" else {}
    return getattr(torchvision.models, TORCHVISION_NAMES[network])(weights=None, **kwargs)
