"""The Relax emitter: a builder's network as one Relax function ``main(x, *weights) -> logits``.

The batch dimension is a symbolic ``n``, so one compiled module serves every
batch size; weights are function parameters (named like ``conv3.weight``), not
constants.
"""

from __future__ import annotations

from collections.abc import Sequence

import tvm
from tvm import relax

from .base import Builder, Graph

__all__ = ["RelaxGraph", "build_module"]


class RelaxGraph(Graph[relax.Expr]):
    """Layers emitted into a Relax ``BlockBuilder`` that is inside a function's dataflow block.

    ``weights`` collects the weight parameters (``relax.Var``) in declaration order.
    """

    def __init__(self, bb: relax.BlockBuilder, dtype: str = "float32") -> None:
        super().__init__(dtype)
        self.bb = bb
        self.weights: list[relax.Var] = []

    def emit(self, expr: relax.Expr) -> relax.Var:
        return self.bb.emit(expr)

    def _param(self, name: str, shape: tuple[int, ...]) -> relax.Var:
        v = relax.Var(name, relax.TensorType(shape, self.dtype))
        self.weights.append(v)
        return v

    def _shape(self, x: relax.Expr) -> list:
        return [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in x.ty.shape.values]

    def _conv2d(self, x, w, stride, padding, groups):  # noqa: ANN001, ANN202 - see Graph
        return self.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=padding, groups=groups))

    def _add(self, a, b):  # noqa: ANN001, ANN202
        return self.emit(relax.op.add(a, b))

    def _multiply(self, a, b):  # noqa: ANN001, ANN202
        return self.emit(relax.op.multiply(a, b))

    def _matmul(self, a, b):  # noqa: ANN001, ANN202
        return self.emit(relax.op.matmul(a, b))

    def _relu(self, x):  # noqa: ANN001, ANN202
        return self.emit(relax.op.nn.relu(x))

    def _concat(self, xs):  # noqa: ANN001, ANN202
        return self.emit(relax.op.concat(xs, axis=1))

    def _max_pool(self, x, kernel, stride, padding, ceil_mode):  # noqa: ANN001, ANN202
        return self.emit(relax.op.nn.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode))

    def _avg_pool(self, x, kernel, stride, padding):  # noqa: ANN001, ANN202
        return self.emit(relax.op.nn.avg_pool2d(x, kernel, stride, padding, count_include_pad=True))

    def _global_avg_pool(self, x):  # noqa: ANN001, ANN202
        return self.emit(relax.op.nn.adaptive_avg_pool2d(x, 1))

    def _flatten(self, x):  # noqa: ANN001, ANN202
        return self.emit(relax.op.reshape(x, (self._shape(x)[0], -1)))


def build_module(builder: Builder, input_shape: Sequence[int], dtype: str = "float32",
                 ) -> tuple[tvm.IRModule, RelaxGraph, tuple[int, ...]]:
    """The Relax module of ``builder`` for samples of ``input_shape``, its graph (the weight
    recipe) and the output shape of one sample."""
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, *input_shape), dtype))
    bb = relax.BlockBuilder()
    g = RelaxGraph(bb, dtype)
    with bb.function("main", attrs={"num_input": 1}):
        with bb.dataflow():
            out = bb.emit_output(builder(g, x))
        bb.emit_func_output(out, params=[x, *g.weights])
    return bb.finalize(), g, tuple(g.shape(out)[1:])
