"""DenseNet-121: dense blocks of pre-activation layers, joined by transitions.

Pre-activation (BN-ReLU-conv): the BN in front of each conv reads a concatenation of many convs' outputs, so it
stays a per-channel scale+shift; the BN between a dense layer's 1x1 and 3x3 convs is folded into the 1x1.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...layers import Graph
from ..registry import Tensor, register


def _dense_layer(g: Graph, x: Tensor, growth: int, bn_size: int) -> Tensor:
    y = g.conv(g.relu(g.batch_norm(x)), bn_size * growth, 1)
    return g.conv(y, growth, 3, 1, 1, bn=False, bias=False, relu=False)


def _transition(g: Graph, x: Tensor) -> Tensor:
    y = g.relu(g.batch_norm(x))
    y = g.conv(y, g.channels(x) // 2, 1, bn=False, bias=False, relu=False)
    return g.avg_pool(y, 2, 2)


def _densenet(g: Graph, x: Tensor, growth: int, blocks: Sequence[int],
              init_features: int, bn_size: int = 4) -> Tensor:
    x = g.conv(x, init_features, 7, 2, 3)
    x = g.max_pool(x, 3, 2, 1)
    for i, layers in enumerate(blocks):
        for _ in range(layers):
            x = g.concat([x, _dense_layer(g, x, growth, bn_size)])
        if i < len(blocks) - 1:
            x = _transition(g, x)
    return g.classifier(g.relu(g.batch_norm(x)))


@register("densenet-121")
def densenet121(g: Graph, x: Tensor) -> Tensor:
    return _densenet(g, x, 32, (6, 12, 24, 16), 64)
