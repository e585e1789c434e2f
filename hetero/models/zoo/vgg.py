"""VGG-16 and VGG-19: plain 3x3 conv stacks and three fully connected layers."""

from __future__ import annotations

from collections.abc import Sequence

from ...layers import Graph
from ..registry import Tensor, register


def _vgg(g: Graph, x: Tensor, depths: Sequence[int]) -> Tensor:
    for stage, depth in enumerate(depths):
        for _ in range(depth):
            x = g.conv(x, min(64 << stage, 512), 3, 1, 1, bn=False)
        x = g.max_pool(x, 2, 2)
    x = g.flatten(x)  # 512 x 7 x 7 at 224x224 (torchvision's adaptive pool to 7x7 is a no-op)
    x = g.linear(x, 4096, relu=True)
    x = g.linear(x, 4096, relu=True)
    return g.linear(x, 1000)


@register("vgg-16")
def vgg16(g: Graph, x: Tensor) -> Tensor:
    return _vgg(g, x, (2, 2, 3, 3, 3))


@register("vgg-19")
def vgg19(g: Graph, x: Tensor) -> Tensor:
    return _vgg(g, x, (2, 2, 4, 4, 4))
