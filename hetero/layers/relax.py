"""The Relax emitter: a builder's network as one Relax function ``main(x, *weights) -> logits``,
or ``main(*inputs, *weights) -> (outputs...)`` for a network of named inputs.

The batch dimension is a symbolic ``n``, so one compiled module serves every
batch size; weights are function parameters (named like ``conv3.weight``), not
constants.  An input's other dimensions are sizes, or names (a sequence length
not yet fixed) that become symbolic variables of that name.
"""

from __future__ import annotations

from collections.abc import Sequence

import tvm
from tvm import relax

from .base import Builder, Graph

__all__ = ["RelaxGraph", "build_function", "build_module"]


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

    def _gather(self, table, ids):  # noqa: ANN001, ANN202
        # "nan": an id outside the table gives NaN rather than a read outside it
        return self.emit(relax.op.take(table, ids, axis=0, mode="nan"))

    def _first_rows(self, table, x):  # noqa: ANN001, ANN202
        return self.emit(relax.op.strided_slice(table, axes=[0], begin=[0], end=[self._shape(x)[1]],
                                                assume_inbound=True))

    def _layer_norm(self, x, gamma, beta, eps):  # noqa: ANN001, ANN202
        return self.emit(relax.op.nn.layer_norm(x, gamma, beta, axes=[-1], epsilon=eps))

    def _softmax(self, x):  # noqa: ANN001, ANN202
        return self.emit(relax.op.nn.softmax(x, axis=-1))

    def _gelu(self, x):  # noqa: ANN001, ANN202
        return self.emit(relax.op.nn.gelu(x))  # the erf form; gelu_tanh is the approximation

    def _tanh(self, x):  # noqa: ANN001, ANN202
        return self.emit(relax.op.tanh(x))

    def _transpose(self, x, axes):  # noqa: ANN001, ANN202
        return self.emit(relax.op.permute_dims(x, list(axes)))

    def _split_last(self, x, parts):  # noqa: ANN001, ANN202
        *lead, k = self._shape(x)
        return self.emit(relax.op.reshape(x, (*lead, parts, k // parts)))

    def _merge_last(self, x):  # noqa: ANN001, ANN202
        *lead, a, b = self._shape(x)
        return self.emit(relax.op.reshape(x, (*lead, a * b)))

    def _expand_dims(self, x, axes):  # noqa: ANN001, ANN202
        return self.emit(relax.op.expand_dims(x, list(axes)))

    def _select(self, x, axis, index):  # noqa: ANN001, ANN202
        return self.emit(relax.op.take(x, relax.const(index, "int64"), axis=axis, mode="clip"))  # in bounds: no check

    def _scalar(self, value):  # noqa: ANN001, ANN202
        return relax.const(value, self.dtype)

    def _cast(self, x):  # noqa: ANN001, ANN202
        return self.emit(relax.op.astype(x, self.dtype))


def build_function(builder: Builder, inputs: Sequence[tuple[str, Sequence[int | str], str]],
                   dtype: str = "float32") -> tuple[tvm.IRModule, RelaxGraph, list[tuple]]:
    """The Relax module of ``builder`` for inputs of (name, one sample's shape, dtype), its graph (the
    weight recipe) and the shape of one sample of each output, where a dimension named in an input's
    shape is the symbolic variable of that name.  A builder that returns a tuple gives a tuple."""
    n = tvm.tirx.Var("n", "int64")
    named: dict[str, tvm.tirx.Var] = {}
    params = [relax.Var(name, relax.TensorType(
        (n, *(named.setdefault(d, tvm.tirx.Var(d, "int64")) if isinstance(d, str) else d for d in shape)), dt))
        for name, shape, dt in inputs]
    bb = relax.BlockBuilder()
    g = RelaxGraph(bb, dtype)
    with bb.function("main", attrs={"num_input": len(params)}):
        with bb.dataflow():
            result = builder(g, *params)
            outputs = list(result) if isinstance(result, tuple) else [result]
            out = bb.emit_output(relax.Tuple(outputs) if isinstance(result, tuple) else result)
        bb.emit_func_output(out, params=[*params, *g.weights])
    return bb.finalize(), g, [tuple(g.shape(o)[1:]) for o in outputs]


def build_module(builder: Builder, input_shape: Sequence[int], dtype: str = "float32",
                 ) -> tuple[tvm.IRModule, RelaxGraph, tuple[int, ...]]:
    """The Relax module of ``builder`` for samples of ``input_shape`` (one input ``x``), its graph (the
    weight recipe) and the output shape of one sample."""
    mod, g, (output_shape,) = build_function(builder, [("x", input_shape, dtype)], dtype)
    return mod, g, output_shape
