"""The PyTorch emitter: a builder's network as a ``torch.nn.Module``.

The module holds the weights (``nn.ParameterList``, in declaration order) and its
``forward`` (one tensor per input of the network, in order; one tensor or a tuple
of them back) re-runs the builder with a :class:`TorchGraph` that consumes them, so
there is no second description of the network to drift from the first.  The
builder is plain Python over tensors: ``torch.compile`` traces through it, and the
module may be converted with ``module.to(memory_format=torch.channels_last)``
(the conv weights are the only 4-D parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import Builder, Graph

__all__ = ["BuiltModule", "TorchGraph"]


class TorchGraph(Graph[torch.Tensor]):
    """Layers run eagerly on torch tensors, taking the weights from ``params`` in order."""

    def __init__(self, params: Sequence[torch.Tensor], dtype: str = "float32") -> None:
        super().__init__(dtype)
        self.params = params
        self.used = 0

    def _param(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if self.used >= len(self.params):
            raise ValueError(f"weight {name} is declared, but the module holds only "
                             f"{len(self.params)} weights")
        p = self.params[self.used]
        if tuple(p.shape) != tuple(shape):
            raise ValueError(f"weight {name} has shape {tuple(shape)}, the module's "
                             f"weight {self.used} {tuple(p.shape)}")
        self.used += 1
        return p

    def _shape(self, x: torch.Tensor) -> list:
        return list(x.shape)

    def _conv2d(self, x, w, stride, padding, groups):  # noqa: ANN001, ANN202 - see Graph
        return F.conv2d(x, w, None, stride, padding, 1, groups)

    def _add(self, a, b):  # noqa: ANN001, ANN202
        return a + b

    def _multiply(self, a, b):  # noqa: ANN001, ANN202
        return a * b

    def _matmul(self, a, b):  # noqa: ANN001, ANN202
        return torch.matmul(a, b)

    def _relu(self, x):  # noqa: ANN001, ANN202
        return F.relu(x)

    def _concat(self, xs):  # noqa: ANN001, ANN202
        return torch.cat(xs, 1)

    def _max_pool(self, x, kernel, stride, padding, ceil_mode):  # noqa: ANN001, ANN202
        return F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode)

    def _avg_pool(self, x, kernel, stride, padding):  # noqa: ANN001, ANN202
        return F.avg_pool2d(x, kernel, stride, padding, count_include_pad=True)

    def _global_avg_pool(self, x):  # noqa: ANN001, ANN202
        return F.adaptive_avg_pool2d(x, 1)

    def _flatten(self, x):  # noqa: ANN001, ANN202
        return torch.flatten(x, 1)

    def _gather(self, table, ids):  # noqa: ANN001, ANN202
        return F.embedding(ids, table)

    def _first_rows(self, table, x):  # noqa: ANN001, ANN202
        return table[: x.shape[1]]

    def _layer_norm(self, x, gamma, beta, eps):  # noqa: ANN001, ANN202
        return F.layer_norm(x, gamma.shape, gamma, beta, eps)

    def _softmax(self, x):  # noqa: ANN001, ANN202
        return torch.softmax(x, -1)

    def _gelu(self, x):  # noqa: ANN001, ANN202
        return F.gelu(x)  # the erf form, PyTorch's default

    def _tanh(self, x):  # noqa: ANN001, ANN202
        return torch.tanh(x)

    def _transpose(self, x, axes):  # noqa: ANN001, ANN202
        return x.permute(*axes)

    def _split_last(self, x, parts):  # noqa: ANN001, ANN202
        return x.unflatten(-1, (parts, -1))

    def _merge_last(self, x):  # noqa: ANN001, ANN202
        return x.flatten(-2)

    def _expand_dims(self, x, axes):  # noqa: ANN001, ANN202
        for axis in sorted(axes):
            x = x.unsqueeze(axis)
        return x

    def _select(self, x, axis, index):  # noqa: ANN001, ANN202
        return x.select(axis, index)

    def _scalar(self, value):  # noqa: ANN001, ANN202 - a Python number broadcasts on any device
        return value

    def _cast(self, x):  # noqa: ANN001, ANN202
        # to the weights' precision, which an engine may have changed (module.half() for fp16)
        return x.to(self.params[0].dtype)


class BuiltModule(nn.Module):
    """``builder``'s network as a module: ``forward(x)`` with ``x`` of shape ``(batch, *input_shape)``,
    or ``forward(*inputs)`` for a builder of several inputs (``input_shape`` then describes each).

    ``params`` are the weight values in declaration order (a Network's ``params``); they are
    copied into ``self.weights`` (not trainable).  The module is returned in eval mode.
    """

    def __init__(self, builder: Builder, input_shape: Sequence[int | str], params: Sequence[np.ndarray],
                 *, name: str = "hetero", dtype: str = "float32") -> None:
        super().__init__()
        self.builder = builder
        self.name = name
        self.input_shape = tuple(input_shape)
        self.dtype = dtype
        self.weights = nn.ParameterList(
            nn.Parameter(torch.from_numpy(np.array(p, dtype=dtype)), requires_grad=False)
            for p in params)
        self.eval()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        g = TorchGraph(self.weights, self.dtype)
        y = self.builder(g, *inputs)
        if g.used != len(self.weights):
            raise ValueError(f"{self.name}: the network declares {g.used} weights, "
                             f"the module holds {len(self.weights)}")
        return y

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_shape={self.input_shape}"
