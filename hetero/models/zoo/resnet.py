"""ResNet-18, -34 (basic blocks) and -50 (bottlenecks), as in torchvision ("v1.5")."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ...layers import Graph
from ..registry import Tensor, register


def _shortcut(g: Graph, x: Tensor, cout: int, stride: int) -> Tensor:
    if stride == 1 and g.channels(x) == cout:
        return x
    return g.conv(x, cout, 1, stride, relu=False)


def _basic_block(g: Graph, x: Tensor, width: int, stride: int, gamma: float) -> Tensor:
    y = g.conv(x, width, 3, stride, 1)
    y = g.conv(y, width, 3, 1, 1, relu=False, bn_gamma=gamma)
    return g.relu(g.add(y, _shortcut(g, x, width, stride)))


def _bottleneck(g: Graph, x: Tensor, width: int, stride: int, gamma: float) -> Tensor:
    y = g.conv(x, width, 1)
    y = g.conv(y, width, 3, stride, 1)  # stride on the 3x3 (torchvision's "v1.5")
    y = g.conv(y, width * 4, 1, relu=False, bn_gamma=gamma)
    return g.relu(g.add(y, _shortcut(g, x, width * 4, stride)))


def _resnet(g: Graph, x: Tensor, block: Callable[..., Tensor],
            depths: Sequence[int]) -> Tensor:
    x = g.conv(x, 64, 7, 2, 3)
    x = g.max_pool(x, 3, 2, 1)
    # Each residual add grows the variance by (1 + gamma^2); damping the last
    # BatchNorm of every branch keeps the total growth bounded (~e) at any depth.
    gamma = 1.0 / math.sqrt(sum(depths))
    for stage, depth in enumerate(depths):
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            x = block(g, x, 64 << stage, stride, gamma)
    return g.classifier(x)


@register("resnet-18")
def resnet18(g: Graph, x: Tensor) -> Tensor:
    return _resnet(g, x, _basic_block, (2, 2, 2, 2))


@register("resnet-34")
def resnet34(g: Graph, x: Tensor) -> Tensor:
    return _resnet(g, x, _basic_block, (3, 4, 6, 3))


@register("resnet-50")
def resnet50(g: Graph, x: Tensor) -> Tensor:
    return _resnet(g, x, _bottleneck, (3, 4, 6, 3))
