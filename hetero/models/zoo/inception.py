"""Inception v3 as in torchvision, without the auxiliary classifier.

A conv spec is (channels, kernel[, stride[, padding]]); every conv is conv-BN-ReLU.
"""

from __future__ import annotations

from ...layers import Graph
from ..registry import Tensor, register


def _convs(g: Graph, x: Tensor, *specs: tuple) -> Tensor:
    for spec in specs:
        x = g.conv(x, *spec)
    return x


def _split_1x3_3x1(g: Graph, x: Tensor, c: int) -> Tensor:
    return g.concat([g.conv(x, c, (1, 3), 1, (0, 1)), g.conv(x, c, (3, 1), 1, (1, 0))])


def _inception_a(g: Graph, x: Tensor, pool_features: int) -> Tensor:
    return g.concat([
        _convs(g, x, (64, 1)),
        _convs(g, x, (48, 1), (64, 5, 1, 2)),
        _convs(g, x, (64, 1), (96, 3, 1, 1), (96, 3, 1, 1)),
        _convs(g, g.avg_pool(x, 3, 1, 1), (pool_features, 1)),
    ])


def _inception_b(g: Graph, x: Tensor) -> Tensor:
    return g.concat([
        _convs(g, x, (384, 3, 2)),
        _convs(g, x, (64, 1), (96, 3, 1, 1), (96, 3, 2)),
        g.max_pool(x, 3, 2),
    ])


def _inception_c(g: Graph, x: Tensor, c7: int) -> Tensor:
    h, v = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))  # 1x7 and 7x1 (kernel, stride, padding)
    return g.concat([
        _convs(g, x, (192, 1)),
        _convs(g, x, (c7, 1), (c7, *h), (192, *v)),
        _convs(g, x, (c7, 1), (c7, *v), (c7, *h), (c7, *v), (192, *h)),
        _convs(g, g.avg_pool(x, 3, 1, 1), (192, 1)),
    ])


def _inception_d(g: Graph, x: Tensor) -> Tensor:
    return g.concat([
        _convs(g, x, (192, 1), (320, 3, 2)),
        _convs(g, x, (192, 1), (192, (1, 7), 1, (0, 3)), (192, (7, 1), 1, (3, 0)), (192, 3, 2)),
        g.max_pool(x, 3, 2),
    ])


def _inception_e(g: Graph, x: Tensor) -> Tensor:
    return g.concat([
        _convs(g, x, (320, 1)),
        _split_1x3_3x1(g, _convs(g, x, (384, 1)), 384),
        _split_1x3_3x1(g, _convs(g, x, (448, 1), (384, 3, 1, 1)), 384),
        _convs(g, g.avg_pool(x, 3, 1, 1), (192, 1)),
    ])


@register("inception_v3", input_shape=(3, 299, 299))
def inception_v3(g: Graph, x: Tensor) -> Tensor:
    """Inception v3 as in torchvision, without the auxiliary classifier.

A conv spec is (channels, kernel[, stride[, padding]]); every conv is conv-BN-ReLU.
"""
    g.bn_eps = 1e-3
    x = _convs(g, x, (32, 3, 2), (32, 3), (64, 3, 1, 1))
    x = g.max_pool(x, 3, 2)
    x = _convs(g, x, (80, 1), (192, 3))
    x = g.max_pool(x, 3, 2)
    for pool_features in (32, 64, 64):
        x = _inception_a(g, x, pool_features)
    x = _inception_b(g, x)
    for c7 in (128, 160, 160, 192):
        x = _inception_c(g, x, c7)
    x = _inception_d(g, x)
    x = _inception_e(g, x)
    x = _inception_e(g, x)
    return g.classifier(x)
