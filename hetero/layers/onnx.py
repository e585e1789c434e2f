"""The ONNX emitter: a builder's network as an ``onnx.ModelProto``.

One input ``x`` of shape ``(N, *input_shape)`` with a symbolic batch ``N``, one
output ``y``; or named inputs and outputs, whose dimensions after the batch may
be names too (a sequence length left open).  The weights are initializers named
like the Relax function's weight parameters (``conv3.weight``), holding the given
values in declaration order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .base import Builder, Graph

__all__ = ["BATCH", "OPSET", "OnnxGraph", "build_model", "build_named_model"]

OPSET = 17
BATCH = "N"  # the symbolic batch dimension's name


def _pool_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output size of a conv or pool along one axis (PyTorch's rule: the last window of a
    ceil-mode pool must start inside the input or its left padding)."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _broadcast(a: list, b: list) -> list:
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        out.append(db if da == 1 else da)
    return out[::-1]


class OnnxGraph(Graph[str]):
    """Layers emitted as ONNX nodes; a tensor is the name of an ONNX value.

    ONNX values carry no shapes while the graph is built, so this class keeps them
    (the batch dimension is the string ``N``).
    """

    def __init__(self, dtype: str = "float32") -> None:
        super().__init__(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.shapes: dict[str, list] = {}

    def input(self, name: str, shape: Sequence[int | str]) -> str:
        self.shapes[name] = [BATCH, *shape]
        return name

    def _constant(self, value: np.ndarray) -> str:
        return self._node("Constant", [], list(value.shape), value=numpy_helper.from_array(value))

    def _node(self, op: str, inputs: list[str], shape: list, **attrs) -> str:
        out = f"{op.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        self.shapes[out] = shape
        return out

    def _param(self, name: str, shape: tuple[int, ...]) -> str:
        self.shapes[name] = list(shape)
        return name

    def _shape(self, x: str) -> list:
        return list(self.shapes[x])

    def _conv2d(self, x, w, stride, padding, groups):  # noqa: ANN001, ANN202 - see Graph
        (n, _, h, wd), (cout, _, kh, kw) = self.shapes[x], self.shapes[w]
        shape = [n, cout, _pool_size(h, kh, stride[0], padding[0], False),
                 _pool_size(wd, kw, stride[1], padding[1], False)]
        return self._node("Conv", [x, w], shape, kernel_shape=[kh, kw], strides=list(stride),
                          pads=[padding[0], padding[1], padding[0], padding[1]], group=groups)

    def _add(self, a, b):  # noqa: ANN001, ANN202
        return self._node("Add", [a, b], _broadcast(self.shapes[a], self.shapes[b]))

    def _multiply(self, a, b):  # noqa: ANN001, ANN202
        return self._node("Mul", [a, b], _broadcast(self.shapes[a], self.shapes[b]))

    def _matmul(self, a, b):  # noqa: ANN001, ANN202
        return self._node("MatMul", [a, b], [*self.shapes[a][:-1], self.shapes[b][-1]])

    def _relu(self, x):  # noqa: ANN001, ANN202
        return self._node("Relu", [x], self._shape(x))

    def _concat(self, xs):  # noqa: ANN001, ANN202
        shape = self._shape(xs[0])
        shape[1] = sum(self.shapes[x][1] for x in xs)
        return self._node("Concat", xs, shape, axis=1)

    def _pool(self, op: str, x: str, kernel: int, stride: int, padding: int, ceil_mode: bool,
              **attrs) -> str:
        n, c, h, w = self.shapes[x]
        shape = [n, c, _pool_size(h, kernel, stride, padding, ceil_mode),
                 _pool_size(w, kernel, stride, padding, ceil_mode)]
        return self._node(op, [x], shape, kernel_shape=[kernel, kernel], strides=[stride, stride],
                          pads=[padding] * 4, ceil_mode=int(ceil_mode), **attrs)

    def _max_pool(self, x, kernel, stride, padding, ceil_mode):  # noqa: ANN001, ANN202
        return self._pool("MaxPool", x, kernel, stride, padding, ceil_mode)

    def _avg_pool(self, x, kernel, stride, padding):  # noqa: ANN001, ANN202
        return self._pool("AveragePool", x, kernel, stride, padding, False, count_include_pad=1)

    def _global_avg_pool(self, x):  # noqa: ANN001, ANN202
        n, c, *_ = self.shapes[x]
        return self._node("GlobalAveragePool", [x], [n, c, 1, 1])

    def _flatten(self, x):  # noqa: ANN001, ANN202
        n, *rest = self.shapes[x]
        return self._node("Flatten", [x], [n, math.prod(rest)], axis=1)

    def _gather(self, table, ids):  # noqa: ANN001, ANN202
        return self._node("Gather", [table, ids], [*self.shapes[ids], self.shapes[table][-1]], axis=0)

    def _first_rows(self, table, x):  # noqa: ANN001, ANN202
        length = self._node("Shape", [x], [1], start=1, end=2)  # read at run time: the sequence may be open
        zero = self._constant(np.zeros(1, np.int64))
        return self._node("Slice", [table, zero, length, zero], [self.shapes[x][1], *self.shapes[table][1:]])

    def _layer_norm(self, x, gamma, beta, eps):  # noqa: ANN001, ANN202
        return self._node("LayerNormalization", [x, gamma, beta], self._shape(x), axis=-1, epsilon=eps)

    def _softmax(self, x):  # noqa: ANN001, ANN202
        return self._node("Softmax", [x], self._shape(x), axis=-1)

    def _gelu(self, x):  # noqa: ANN001, ANN202 - opset 17 has no Gelu (20 has)
        erf = self._node("Erf", [self._multiply(x, self._scalar(math.sqrt(0.5)))], self._shape(x))
        return self._multiply(self._multiply(x, self._add(erf, self._scalar(1.0))), self._scalar(0.5))

    def _tanh(self, x):  # noqa: ANN001, ANN202
        return self._node("Tanh", [x], self._shape(x))

    def _transpose(self, x, axes):  # noqa: ANN001, ANN202
        return self._node("Transpose", [x], [self.shapes[x][a] for a in axes], perm=list(axes))

    def _reshape_last(self, x: str, lead: int, last: list[int], shape: list) -> str:
        """Reshape keeping the first ``lead`` dimensions (0: copied, whether known or not) and
        making the rest ``last``."""
        target = self._constant(np.array([0] * lead + last, np.int64))
        return self._node("Reshape", [x, target], shape)

    def _split_last(self, x, parts):  # noqa: ANN001, ANN202
        *lead, k = self.shapes[x]
        return self._reshape_last(x, len(lead), [parts, k // parts], [*lead, parts, k // parts])

    def _merge_last(self, x):  # noqa: ANN001, ANN202
        *lead, a, b = self.shapes[x]
        return self._reshape_last(x, len(lead), [a * b], [*lead, a * b])

    def _expand_dims(self, x, axes):  # noqa: ANN001, ANN202
        shape = self._shape(x)
        for axis in sorted(axes):
            shape.insert(axis, 1)
        return self._node("Unsqueeze", [x, self._constant(np.array(axes, np.int64))], shape)

    def _select(self, x, axis, index):  # noqa: ANN001, ANN202
        shape = self._shape(x)
        del shape[axis]
        return self._node("Gather", [x, self._constant(np.array(index, np.int64))], shape, axis=axis)

    def _scalar(self, value):  # noqa: ANN001, ANN202
        return self._constant(np.array(value, self.dtype))

    def _cast(self, x):  # noqa: ANN001, ANN202
        to = helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))
        return self._node("Cast", [x], self._shape(x), to=to)


def _value_info(name: str, dtype: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)


def build_model(builder: Builder, input_shape: Sequence[int], params: Sequence[np.ndarray], *,
                name: str = "hetero", dtype: str = "float32") -> onnx.ModelProto:
    """The ONNX model of ``builder`` for samples of ``input_shape`` (input ``x``, output ``y``), with
    ``params`` (the values of the declared weights, in order, as :meth:`Graph.init_weights` makes them)
    as initializers."""
    return build_named_model(builder, [("x", input_shape, dtype)], ["y"], params, name=name, dtype=dtype)


def build_named_model(builder: Builder, inputs: Sequence[tuple[str, Sequence[int | str], str]],
                      outputs: Sequence[str], params: Sequence[np.ndarray], *, name: str = "hetero",
                      dtype: str = "float32") -> onnx.ModelProto:
    """The ONNX model of ``builder`` for inputs of (name, one sample's shape, dtype), whose dimensions
    may be names (left open), and outputs named ``outputs`` (the builder returns a tuple of as many
    where there are several), with ``params`` as initializers as in :func:`build_model`."""
    g = OnnxGraph(dtype)
    result = builder(g, *(g.input(i, shape) for i, shape, _ in inputs))
    values = list(result) if isinstance(result, tuple) else [result]
    if len(values) != len(outputs):
        raise ValueError(f"{name}: the graph gives {len(values)} outputs, {len(outputs)} are named")
    if len(params) != len(g.weight_names):
        raise ValueError(f"{name}: the graph declares {len(g.weight_names)} weights, "
                         f"{len(params)} values were given")
    initializers = []
    for wname, shape, value in zip(g.weight_names, g.weight_shapes, params):
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{name}: weight {wname} has shape {tuple(shape)}, "
                             f"its value {tuple(value.shape)}")
        initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), wname))
    producers = {o: node for node in g.nodes for o in node.output}
    consumed = {i for node in g.nodes for i in node.input}
    for value, output in zip(values, outputs):
        if value in producers and value not in consumed:  # name it where it is made
            node = producers[value]
            node.output[list(node.output).index(value)] = output
        else:  # the output is an input, a weight, or feeds other nodes too
            g.nodes.append(helper.make_node("Identity", [value], [output], name=output))
    graph = helper.make_graph(g.nodes, name, [_value_info(i, dt, g.shapes[i]) for i, _, dt in inputs],
                              [_value_info(o, dtype, g.shapes[v]) for v, o in zip(values, outputs)], initializers)
    model = helper.make_model(graph, producer_name="hetero",
                              opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = min(model.ir_version, 8)  # opset 17's IR, readable by older runtimes
    return model
