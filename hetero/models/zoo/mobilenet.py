"""MobileNet v1: depthwise-separable convs."""

from __future__ import annotations

from ...layers import Graph
from ..registry import Tensor, register


@register("mobilenet")
def mobilenet(g: Graph, x: Tensor) -> Tensor:
    """MobileNet v1, width 1.0, 224x224: depthwise-separable convs."""
    x = g.conv(x, 32, 3, 2, 1)
    for cout, stride in [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                         *[(512, 1)] * 5, (1024, 2), (1024, 1)]:
        cin = g.channels(x)
        x = g.conv(x, cin, 3, stride, 1, groups=cin)  # depthwise
        x = g.conv(x, cout, 1)  # pointwise
    return g.classifier(x)
