"""SqueezeNet v1.0 and v1.1: fire modules (a 1x1 squeeze, then 1x1 and 3x3 expands side by side)."""

from __future__ import annotations

from collections.abc import Sequence

from ...layers import Graph
from ..registry import Tensor, register


def _fire(g: Graph, x: Tensor, squeeze: int, expand: int) -> Tensor:
    s = g.conv(x, squeeze, 1, bn=False)
    return g.concat([g.conv(s, expand, 1, bn=False), g.conv(s, expand, 3, 1, 1, bn=False)])


def _squeezenet(g: Graph, x: Tensor, stem: tuple[int, int],
                stages: Sequence[Sequence[tuple[int, int]]]) -> Tensor:
    """``stem`` = (channels, kernel) of the stride-2 first conv; each stage starts with a max pool."""
    x = g.conv(x, stem[0], stem[1], 2, bn=False)
    for fires in stages:
        x = g.max_pool(x, 3, 2, ceil_mode=True)
        for squeeze, expand in fires:
            x = _fire(g, x, squeeze, expand)
    x = g.conv(x, 1000, 1, bn=False)  # the classifier is a 1x1 conv + ReLU
    return g.global_pool(x)


@register("squeezenet_v1.0")
def squeezenet_v1_0(g: Graph, x: Tensor) -> Tensor:
    return _squeezenet(g, x, (96, 7), [[(16, 64), (16, 64), (32, 128)],
                                       [(32, 128), (48, 192), (48, 192), (64, 256)],
                                       [(64, 256)]])


@register("squeezenet_v1.1")
def squeezenet_v1_1(g: Graph, x: Tensor) -> Tensor:
    return _squeezenet(g, x, (64, 3), [[(16, 64), (16, 64)],
                                       [(32, 128), (32, 128)],
                                       [(48, 192), (48, 192), (64, 256), (64, 256)]])
