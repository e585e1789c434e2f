"""Networks read from .onnx files: one input with a batch dimension, one output, weights as parameters; or
several named inputs and outputs (a BERT-style encoder's input_ids and attention_mask), each with a batch
dimension, whose other dimensions may be left open by name (a sequence length) until inputs fix them."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from ..errors import HeteroError, one_line
from .network import Network, Origin, Tensor, readonly, require_package

log = logging.getLogger(__name__)


class OnnxUnavailableError(HeteroError, ImportError):
    """An .onnx model was asked for but the optional ``onnx`` package is not installed.

    An ImportError, and a HeteroError so the command lines report it in one line.
    """


class OnnxOrigin(Origin):
    """An .onnx file: its ONNX form is the file's own model, read again from the bytes kept here
    (or, for weights in external files, a copy of the model as loaded)."""

    forms = ("relax", "onnx")
    what = "it was read from an ONNX file"

    def __init__(self, raw: bytes | None, model: Any = None) -> None:
        self.raw = raw
        self.model = model
        self._fixed: dict[tuple, Network] = {}  # a network of named inputs per size of its open dimensions
        self._fixing = threading.Lock()

    def onnx_model(self, net: Network):  # noqa: ANN201
        require_package("onnx", "ONNX", net.name, "'hetero[onnx]'")
        import onnx

        if self.raw is not None:
            return onnx.load_from_string(self.raw)
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        return model

    def onnx_bytes(self, net: Network) -> bytes:
        """The file's own bytes."""
        return self.raw if self.raw is not None else super().onnx_bytes(net)

    def fixed(self, net: Network, sizes: dict[str, int]) -> Network:
        """`net` with its open dimensions fixed, and its Relax module where TVM converts it: once per size in
        this process, since every run of a session fixes its inputs' sequence length again."""
        import onnx

        key = (net.digest, tuple(sorted(sizes.items())))
        with self._fixing:
            if key not in self._fixed:
                self._fixed[key] = _with_relax(super().fixed(net, sizes), self.onnx_model(net), onnx)
            return self._fixed[key]


def _int_initializers_as_constants(model, onnx):  # noqa: ANN001 - onnx types
    """Copy of ``model`` whose non-float initializers (shapes, axes, ...) are Constant nodes.

    With ``keep_params_in_input`` the frontend turns every initializer into a
    function parameter, which would make e.g. a Reshape's target shape a
    runtime value; only float tensors are weights.
    """
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                   onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    weights = [t for t in m.graph.initializer if t.data_type in float_types]
    consts = [t for t in m.graph.initializer if t.data_type not in float_types]
    if consts:
        names = {t.name for t in consts}
        nodes = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in consts]
        nodes += list(m.graph.node)
        inputs = [i for i in m.graph.input if i.name not in names]
        del m.graph.initializer[:], m.graph.node[:], m.graph.input[:]
        m.graph.initializer.extend(weights)
        m.graph.node.extend(nodes)
        m.graph.input.extend(inputs)
    return m


def load_onnx(path: str) -> Network:
    """The Network of the .onnx file at ``path``, converted once per content in this process."""
    try:
        import onnx
    except ImportError:
        raise OnnxUnavailableError(
            f"loading {path!r} needs the onnx package: pip install onnx (or pip install .[onnx])"
        ) from None

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"cannot read ONNX model {path!r}: no such file")
    try:
        raw = file.read_bytes()
        model = onnx.load(str(file))
    except Exception as err:  # protobuf decode errors, permissions, bad external data, ...
        raise ValueError(f"cannot read ONNX model {path!r}: {one_line(err)}") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        # weights in other files, which no digest of this file's bytes covers
        return _convert_onnx(model, onnx, path, OnnxOrigin(None, model))
    content = (hashlib.sha256(raw).hexdigest(), file.stem)
    with _ONNX_LOCK:
        if content not in _ONNX_BY_CONTENT:
            _ONNX_BY_CONTENT[content] = _convert_onnx(model, onnx, path, OnnxOrigin(raw))
        return _ONNX_BY_CONTENT[content]


# ONNX models converted in this process, by (digest of the file's bytes, file stem)
_ONNX_BY_CONTENT: dict[tuple[str, str], Network] = {}
_ONNX_LOCK = threading.Lock()


def _convert_onnx(model, onnx, path: str, origin: Origin) -> Network:  # noqa: ANN001 - onnx types
    """The Network of a loaded ONNX model, checked to be one we can split by its batch dimension."""
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    file = Path(path)
    graph = model.graph
    if not graph.node:
        raise ValueError(f"cannot read ONNX model {path!r}: the file holds no graph")
    initialized = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialized]
    if len(inputs) != 1 or len(graph.output) != 1:
        return _named_network(model, inputs, onnx, path, origin)
    inp = inputs[0]
    ttype = inp.type.tensor_type
    dims = list(ttype.shape.dim)
    if not inp.type.HasField("tensor_type") or not ttype.HasField("shape") or len(dims) < 2 \
            or any(d.dim_value <= 0 for d in dims[1:]):
        shown = [d.dim_value or d.dim_param or "?" for d in dims]
        raise ValueError(f"ONNX model {path!r}: input {inp.name!r} must be a tensor (batch, ...) "
                         f"with static sizes after the batch dimension, got {shown}")
    sample = tuple(int(d.dim_value) for d in dims[1:])
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name
    except (KeyError, ValueError):
        raise ValueError(f"ONNX model {path!r}: input {inp.name!r} has an unsupported "
                         f"element type ({ttype.elem_type})") from None

    n = tvm.tirx.Var("n", "int64")
    try:
        mod = from_onnx(_int_initializers_as_constants(model, onnx),
                        shape_dict={inp.name: [n, *sample]}, keep_params_in_input=True)
    except Exception as err:  # unsupported ops, shape errors, old IR versions, ...
        raise ValueError(f"cannot convert ONNX model {path!r}: {one_line(err)}") from None
    mod, detached = detach_params(mod)
    main = mod["main"]

    ret = main.ret_ty
    out_dims = []
    if isinstance(ret, relax.TensorType) and isinstance(ret.shape, relax.ShapeExpr):
        out_dims = [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in ret.shape.values]
    if not out_dims or isinstance(out_dims[0], int) or not out_dims[0].same_as(n) \
            or not all(isinstance(d, int) for d in out_dims[1:]):
        raise ValueError(f"ONNX model {path!r}: cannot make the batch dimension symbolic "
                         f"(output shape {ret}); the model may hard-code its batch size")
    params = tuple(readonly(p.numpy()) for p in detached.get("main", []))
    if len(params) != len(main.params) - 1:
        raise ValueError(f"ONNX model {path!r}: {len(main.params) - 1} weight parameters "
                         f"but {len(params)} values")
    return Network(file.stem, mod, params, sample, tuple(out_dims[1:]), dtype, origin)


def _tensors(values: list, onnx, path: str, what: str, open_dimensions: set[str]) -> tuple[Tensor, ...]:  # noqa: ANN001
    """The named tensors of an ONNX graph's inputs or outputs, each a batch: its first dimension is the batch,
    any other a size or a name that `open_dimensions` (those the inputs leave open) holds."""
    tensors = []
    for value in values:
        ttype = value.type.tensor_type
        dims = list(ttype.shape.dim)
        sample = [d.dim_value if d.dim_value > 0 else d.dim_param or "?" for d in dims[1:]]
        if not value.type.HasField("tensor_type") or not ttype.HasField("shape") or not dims \
                or any(isinstance(d, str) and d not in open_dimensions for d in sample):
            shown = [d.dim_value or d.dim_param or "?" for d in dims]
            raise ValueError(f"ONNX model {path!r}: {what} {value.name!r} must be a tensor (batch, ...) whose other "
                             f"dimensions are sizes{' or ' + ', '.join(sorted(open_dimensions)) if open_dimensions else ''}"
                             f", got {shown}")
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name
        except (KeyError, ValueError):
            raise ValueError(f"ONNX model {path!r}: {what} {value.name!r} has an unsupported "
                             f"element type ({ttype.elem_type})") from None
        tensors.append(Tensor(value.name, tuple(sample), dtype))
    return tuple(tensors)


def _named_network(model, inputs: list, onnx, path: str, origin: Origin) -> Network:  # noqa: ANN001
    """The Network of an ONNX model of several inputs or outputs, run by name: with its Relax module once every
    dimension but the batch is fixed (at once, or when inputs fix the open ones: :meth:`OnnxOrigin.fixed`)."""
    open_dimensions = {d.dim_param for i in inputs for d in i.type.tensor_type.shape.dim[1:] if d.dim_param}
    named_inputs = _tensors(inputs, onnx, path, "input", open_dimensions)
    named_outputs = _tensors(list(model.graph.output), onnx, path, "output", open_dimensions)
    if len(named_outputs) == 1:  # one output is a plain array, as a single-input network's is
        (output,) = named_outputs
        net = Network(Path(path).stem, None, (), (), output.shape, output.dtype, origin, named_inputs)
    else:
        net = Network(Path(path).stem, None, (), (), (), "float32", origin, named_inputs, named_outputs)
    return net if open_dimensions else _with_relax(net, model, onnx)


def _fold_static_shapes(model, inputs: tuple[Tensor, ...], onnx):  # noqa: ANN001, ANN202 - onnx types
    """Copy of ``model`` with its inputs' sizes after the batch written in, and each size its graph reads from a
    tensor's shape (``Gather(Shape(x), i)``, what ``x.shape[i]`` exports as) that is now known made a constant.

    TVM 0.27's ONNX frontend turns a ``Range`` to a size read at run time (a BERT's position ids, up to the
    sequence length) into a tensor of a new symbolic length, which then broadcasts with nothing; a constant
    length keeps every shape known but the batch.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    sizes = {t.name: t.shape for t in inputs}
    for value in m.graph.input:
        for dim, size in zip(value.type.tensor_type.shape.dim[1:], sizes.get(value.name, ())):
            dim.dim_value = size
    inferred = onnx.shape_inference.infer_shapes(m)
    known = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
             for v in [*inferred.graph.value_info, *inferred.graph.input]}
    constants = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    shape_of = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Shape" and not n.attribute}
    nodes = []
    for node in m.graph.node:
        if node.op_type == "Gather" and node.input[0] in shape_of and node.input[1] in constants:
            index, dims = constants[node.input[1]], known.get(shape_of[node.input[0]], [])
            if index.ndim == 0 and -len(dims) <= int(index) < len(dims) and dims[int(index)]:
                size = onnx.numpy_helper.from_array(np.array(dims[int(index)], np.int64))
                node = onnx.helper.make_node("Constant", [], [node.output[0]], value=size)
        nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def _with_relax(net: Network, model, onnx) -> Network:  # noqa: ANN001 - onnx types
    """`net`, a network of named inputs whose every dimension but the batch is fixed, with the Relax module and
    weights TVM's ONNX frontend converts its model to; `net` as it is where the frontend cannot (TVM's engine
    then declines it, the others run its ONNX form)."""
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    n = tvm.tirx.Var("n", "int64")
    folded = _fold_static_shapes(_int_initializers_as_constants(model, onnx), net.inputs, onnx)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the frontend prints the node it failed on
            mod = from_onnx(folded, shape_dict={t.name: [n, *t.shape] for t in net.inputs}, keep_params_in_input=True)
    except Exception as err:  # noqa: BLE001 -- unsupported ops, shape errors: the network runs on the other engines
        log.info("TVM cannot convert %s: %s", net.name, one_line(err))
        return net
    mod, detached = detach_params(mod)
    return dataclasses.replace(net, module=mod, params=tuple(readonly(p.numpy()) for p in detached.get("main", [])))
