"""Networks made from PyTorch modules (:func:`from_torch`), through ``torch.export`` and Relax's importer: a module
of one input, or of several named inputs whose sizes after the batch may be left open (a sequence length)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tvm
from tvm import relax

from ..errors import HeteroError, one_line
from .network import Network, Origin, Tensor, readonly, require_package

log = logging.getLogger(__name__)


class TorchConversionError(HeteroError, ValueError):
    """A PyTorch module that cannot be exported, or imported into Relax with a symbolic batch, or example
    inputs that do not describe it."""


class TorchOrigin(Origin):
    """A PyTorch module (:func:`from_torch`): its PyTorch form is a copy of the module; its ONNX form the program
    ``torch.export`` made of it (the batch and any open dimension dynamic), exported once by ``torch.onnx`` under
    the network's input and output names. A network of named inputs gets its Relax module once its open
    dimensions are fixed (:meth:`fixed`): the module is exported again at those sizes, only the batch dynamic."""

    forms = ("relax", "onnx", "torch")

    def __init__(self, module: Any, exported: Any, example: tuple, input_names: Sequence[str],
                 output_names: Sequence[str], limits: Mapping[str, int] | None = None) -> None:
        self.module = module
        self.exported = exported  # torch.export's program of the module
        self.example = example  # an input batch of 2 per input, on the module's device and in its dtypes
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.limits = dict(limits or {})  # the largest size of each open dimension, where the module bounds it
        self._onnx: bytes | None = None
        self._lock = threading.Lock()
        self._fixed: dict[tuple, Network] = {}  # a network of named inputs per size of its open dimensions
        self._fixing = threading.Lock()

    def torch_module(self, net: Network):  # noqa: ANN201
        # a copy: engines move it to their device, precision and memory format, which must not touch the user's
        return copy.deepcopy(self.module).eval()

    def graph_digest(self, net: Network) -> str:
        """What identifies the module while the network has no Relax module: its class, its structure as
        PyTorch prints it and its weights and buffers (an export's names its symbols differently from one
        process to the next, so neither the program nor its ONNX form would give one digest to every run)."""
        import torch

        h = hashlib.sha256(f"{type(self.module).__module__}.{type(self.module).__qualname__} {self.module!r}".encode())
        for key, value in self.module.state_dict().items():
            h.update(f"|{key} {value.dtype} {tuple(value.shape)}|".encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
        return h.hexdigest()

    def onnx_model(self, net: Network):  # noqa: ANN201
        require_package("onnx", "ONNX", net.name, "'hetero[onnx]'")
        require_package("onnxscript", "ONNX", net.name, "onnxscript")
        import onnx
        import torch

        with self._lock:
            if self._onnx is None:
                try:
                    program = torch.onnx.export(self.exported, dynamo=True, external_data=False, verbose=False,
                                                input_names=self.input_names, output_names=self.output_names)
                except Exception as err:  # unsupported ops, ...
                    raise TorchConversionError(f"cannot export network {net.name!r} to ONNX: "
                                               f"{one_line(err)}") from None
                self._onnx = program.model_proto.SerializeToString()
        return onnx.load_from_string(self._onnx)

    def fixed(self, net: Network, sizes: dict[str, int]) -> Network:
        """`net` with its open dimensions fixed and its Relax module: once per size in this process, since
        every run of a session fixes its inputs' sequence length again."""
        for dim, size in sizes.items():
            if size > self.limits.get(dim, size):
                raise TorchConversionError(f"{net.name} takes a {dim} of at most {self.limits[dim]}, not {size}")
        key = tuple(sorted(sizes.items()))
        with self._fixing:
            if key not in self._fixed:
                self._fixed[key] = self.with_relax(super().fixed(net, sizes))
            return self._fixed[key]

    def with_relax(self, net: Network, exported: Any = None) -> Network:
        """`net`, of named inputs every dimension of which but the batch is fixed, with the Relax module of the
        module exported at those sizes (or of `exported`, an export of it with only the batch dynamic); `net`
        as it is where Relax cannot import it (TVM's engine then declines it, the others run its other forms)."""
        import torch

        if exported is None:
            records = net.random_input(2)  # what the values are matters to no export of a batch-dynamic module
            example = tuple(torch.from_numpy(np.ascontiguousarray(records[t.name])).to(like.device, like.dtype)
                            for t, like in zip(net.inputs, self.example))
            batch = tuple({0: torch.export.Dim.DYNAMIC} for _ in example)
            exported = _export(self.module, example, (batch,), net.name)
        try:
            mod, params, _ = _relax(exported, net.name, len(net.inputs), len(net.outputs) or 1)
        except TorchConversionError as err:
            log.info("TVM cannot convert %s: %s", net.name, err)
            return net
        return dataclasses.replace(net, module=mod, params=params)


def from_torch(module: Any, sample_shape: Sequence[int] | None = None, name: str = "torch_model", *,
               inputs: Mapping[str, Any] | None = None, output_names: Sequence[str] | None = None,
               dynamic: Mapping[str, Mapping[int, str]] | None = None) -> Network:
    """The Network of a PyTorch module: of one tensor in and one out, for samples of ``sample_shape``; or of
    several named inputs, given an example batch of each as ``inputs``.

    One input: ``sample_shape`` is the shape of ONE sample, e.g. ``(3, 224, 224)``.  The module is put in
    eval mode and exported with ``torch.export`` with a dynamic batch dimension, then imported
    into Relax with its parameters as the weights (``params``; buffers such as BatchNorm
    statistics become constants of the module) and the batch a symbolic ``n``.  Its
    ``torch_module()`` is a copy of ``module``; its ``onnx_model()`` is exported by ``torch.onnx``.

    Named inputs: ``from_torch(bert, inputs={"input_ids": ids, "attention_mask": mask}, name="bert")``, each
    example an array or tensor of at least 2 samples (``torch.export`` fixes a dimension of size 1), integer
    inputs kept integer, floating ones cast to the module's dtype.  The module is called with them by name where
    its ``forward`` names them all (a Hugging Face model's), else in the order given; it may return a tensor, a
    tuple, a dict or a ``ModelOutput``, whose outputs are named by ``output_names``, else by the dict's keys,
    else "output0", "output1", ...  Dimension 0 of every input and output is the batch.  Which others stay open
    (a sequence length, fixed later by :meth:`Network.fit` from the inputs it runs on) is ``dynamic``, as
    ``torch.onnx.export``'s ``dynamic_axes`` names them: ``{"input_ids": {1: "sequence"}, "attention_mask":
    {1: "sequence"}}``; ``{}`` leaves none open.  Without it, a size (2 or more) after the batch that two inputs
    or more share is open, named "sequence" (further ones "sequence2", ...), where the module does not fix it.
    Open dimensions that the module bounds (a table of 512 positions) are refused beyond that size.  The
    network's Relax module exists once every dimension but the batch is fixed; its ``torch_module()`` is called
    ``module(*tensors)`` with one tensor per input in ``Network.inputs`` order.

    Raises TorchConversionError when the module cannot be exported or imported, or its output's
    batch dimension cannot be made symbolic (e.g. a hard-coded batch size in a reshape), or the example
    inputs do not describe it.
    """
    if (sample_shape is None) == (inputs is None):
        raise TorchConversionError(f"from_torch {name!r}: give either a sample_shape (a module of one input) or "
                                   "inputs by name, " + ("not both" if inputs is not None else "not neither"))
    if inputs is not None:
        return _from_named(module, inputs, name, output_names, dynamic)
    import torch  # the caller has a torch module, so torch is installed

    sample = tuple(int(d) for d in sample_shape)
    if not sample or any(d <= 0 for d in sample):
        raise ValueError(f"sample_shape must be the positive sizes of one sample, got {sample_shape}")
    module.eval()
    device, torch_dtype = _placement(module)
    dtype = str(torch_dtype).removeprefix("torch.")
    # batch 2: torch.export specializes a dimension whose example size is 0 or 1
    example = torch.randn((2, *sample), generator=torch.Generator().manual_seed(0)).to(device, torch_dtype)
    exported = _export(module, (example,), ({0: torch.export.Dim("n", min=1)},), name)
    mod, params, (output_shape,) = _relax(exported, name, 1, 1)
    return Network(name, mod, params, sample, output_shape, dtype, TorchOrigin(module, exported, (example,), ["x"], ["y"]))


def _placement(module: Any) -> tuple[Any, Any]:
    """The device of a module's weights, and the dtype of its floating ones (float32 where it has none)."""
    import torch

    tensors = [*module.parameters(), *module.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    return (tensors[0].device if tensors else torch.device("cpu")), (floats[0].dtype if floats else torch.float32)


def _export(module: Any, example: tuple, dynamic_shapes: tuple, name: str) -> Any:
    """``torch.export`` of `module` on `example` with `dynamic_shapes`, its failure one line."""
    import torch

    try:
        return torch.export.export(module, example, dynamic_shapes=dynamic_shapes)
    except Exception as err:  # data-dependent control flow, a batch size baked in, ...
        raise TorchConversionError(f"cannot export PyTorch module {name!r} with a dynamic batch "
                                   f"dimension: {one_line(err)}") from None


def _relax(exported: Any, name: str, inputs: int, outputs: int) -> tuple[tvm.IRModule, tuple, list[tuple[int, ...]]]:
    """The Relax module of an exported program of `inputs` tensors in and `outputs` out, each (batch, ...) with
    static sizes after the batch: the module, its weights, and the shape of one sample of each output."""
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_exported_program

    try:
        mod = from_exported_program(exported, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    except Exception as err:  # ops the Relax frontend does not know, ...
        raise TorchConversionError(f"cannot convert PyTorch module {name!r} to Relax: "
                                   f"{one_line(err)}") from None
    mod, detached = detach_params(mod)
    main = mod["main"]
    batch = None
    if main.params and isinstance(main.params[0].ty, relax.TensorType) \
            and isinstance(main.params[0].ty.shape, relax.ShapeExpr):
        batch = main.params[0].ty.shape.values[0]
    ret = main.ret_ty
    returned = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    shapes = [[int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in t.shape.values] for t in returned
              if isinstance(t, relax.TensorType) and isinstance(t.shape, relax.ShapeExpr)]
    if not isinstance(batch, tvm.tirx.Var) or len(shapes) != len(returned) or len(shapes) != outputs or not all(
            dims and isinstance(dims[0], tvm.tirx.Var) and dims[0].same_as(batch)
            and all(isinstance(d, int) for d in dims[1:]) for dims in shapes):
        returns = "one tensor" if outputs == 1 else f"{outputs} tensors"
        raise TorchConversionError(f"PyTorch module {name!r}: cannot make the batch dimension "
                                   f"symbolic (output {ret}); it must return {returns} (batch, ...) with "
                                   "static sizes after the batch")
    mod = _rename_batch(mod, batch)
    params = tuple(readonly(p.numpy()) for p in detached.get("main", []))
    if len(params) != len(main.params) - inputs:
        raise TorchConversionError(f"PyTorch module {name!r}: {len(main.params) - inputs} weight "
                                   f"parameters but {len(params)} values")
    return mod, params, [tuple(dims[1:]) for dims in shapes]


def _rename_batch(mod: tvm.IRModule, batch: tvm.tirx.Var) -> tvm.IRModule:
    """``mod`` with its batch variable (named after a torch symbol, e.g. s31) renamed ``n``, as in
    every other network (tuning binds it by that name)."""
    n = tvm.tirx.Var("n", "int64")
    mod = relax.transform.BindSymbolicVars({batch: n})(mod)
    main = mod["main"]
    for key in ("tir_var_lower_bound", "tir_var_upper_bound"):
        bounds = main.attrs.get(key) if main.attrs else None
        if bounds is not None and batch.name in bounds:
            main = main.with_attr(key, {("n" if k == batch.name else k): v for k, v in bounds.items()})
    mod["main"] = main  # mod is the pass's new module
    return mod


def _from_named(module: Any, inputs: Mapping[str, Any], name: str, output_names: Sequence[str] | None,
                dynamic: Mapping[str, Mapping[int, str]] | None) -> Network:
    """:func:`from_torch` of a module of several named inputs."""
    import torch

    from .torch_call import CalledByPosition

    names = list(inputs)
    if not names:
        raise TorchConversionError(f"from_torch {name!r}: inputs names no input")
    module.eval()
    device, float_dtype = _placement(module)
    example = tuple(_example(inputs[n], n, name, device, float_dtype) for n in names)
    if any(t.dim() == 0 for t in example) or len({t.shape[0] for t in example}) != 1 or example[0].shape[0] < 2:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, example))
        raise TorchConversionError(f"from_torch {name!r}: every example input needs the same batch of at least 2 "
                                   f"samples (torch.export fixes a dimension of size 1), got {shapes}")
    axes = _open_axes(names, example, dynamic, name)
    wrapped = CalledByPosition(module, names)
    size = torch.export.Dim.DYNAMIC if dynamic is not None else torch.export.Dim.AUTO  # AUTO: where the module lets it
    exported = _export(wrapped, example, (tuple({0: torch.export.Dim.DYNAMIC, **{axis: size for axis in axes[n]}}
                                                 for n in names),), name)
    received, returned = _values(exported)
    batch = str(received[0].shape[0])
    dims = {str(value.shape[axis]): dim for value, n in zip(received, names) for axis, dim in axes[n].items()
            if isinstance(value.shape[axis], torch.SymInt)}  # torch's symbol of each dimension left open

    def tensor(tensor_name: str, value: Any, what: str) -> Tensor:
        sizes = [int(d) if isinstance(d, int) else dims.get(str(d)) for d in value.shape[1:]]
        if not value.shape or str(value.shape[0]) != batch or None in sizes:
            open_ = ", ".join(sorted(set(dims.values()))) or "no open dimension"
            raise TorchConversionError(f"PyTorch module {name!r}: {what} {tensor_name} of shape {tuple(value.shape)} "
                                       f"is not (batch, ...) in sizes or {open_}")
        return Tensor(tensor_name, tuple(sizes), str(value.dtype).removeprefix("torch."))

    names_out = list(output_names or wrapped.output_names(example) or [f"output{i}" for i in range(len(returned))])
    if len(names_out) != len(returned):
        raise TorchConversionError(f"from_torch {name!r}: {len(names_out)} output names ({', '.join(names_out)}) "
                                   f"for {len(returned)} outputs")
    named_inputs = tuple(tensor(n, value, "input") for n, value in zip(names, received))
    named_outputs = tuple(tensor(n, value, "output") for n, value in zip(names_out, returned))
    limits = {dims[str(symbol)]: int(bounds.upper) for symbol, bounds in exported.range_constraints.items()
              if str(symbol) in dims and bounds.upper.is_finite}
    origin = TorchOrigin(wrapped, exported, example, names, names_out, limits)
    if len(named_outputs) == 1:  # one output is a plain array, as a single-input network's is
        (output,) = named_outputs
        net = Network(name, None, (), (), output.shape, output.dtype, origin, named_inputs)
    else:
        net = Network(name, None, (), (), (), "float32", origin, named_inputs, named_outputs)
    return origin.with_relax(net, exported) if not net.open_dimensions else net


def _example(value: Any, input_name: str, name: str, device: Any, float_dtype: Any) -> Any:
    """One example input as a tensor on the module's device: floating ones in its dtype, others as they are."""
    import torch

    try:
        tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TorchConversionError(f"from_torch {name!r}: input {input_name} is not an array: {one_line(err)}") from None
    return tensor.to(device, float_dtype if tensor.is_floating_point() else tensor.dtype)


def _open_axes(names: list[str], example: tuple, dynamic: Mapping[str, Mapping[int, str]] | None,
               name: str) -> dict[str, dict[int, str]]:
    """The dimensions after the batch left open, by input: axis -> the dimension's name."""
    if dynamic is not None:
        unknown = [n for n in dynamic if n not in names]
        if unknown:
            raise TorchConversionError(f"from_torch {name!r}: dynamic names no input {', '.join(unknown)}; "
                                       f"the inputs are {', '.join(names)}")
        axes: dict[str, dict[int, str]] = {}
        for n, tensor in zip(names, example):
            axes[n] = {int(axis): str(dim) for axis, dim in dict(dynamic.get(n, {})).items() if axis != 0}
            wrong = [axis for axis in axes[n] if not 0 < axis < tensor.dim() or tensor.shape[axis] < 2]
            if wrong:
                raise TorchConversionError(f"from_torch {name!r}: input {n} of shape {tuple(tensor.shape)} has no "
                                           f"dimension {wrong[0]} of 2 or more to leave open")
        return axes
    inputs_of: dict[int, set[str]] = {}  # the inputs that have each size after the batch
    for n, tensor in zip(names, example):
        for size in tensor.shape[1:]:
            if size >= 2:
                inputs_of.setdefault(int(size), set()).add(n)
    shared = [size for size, having in inputs_of.items() if len(having) >= 2]
    dim_names = {size: "sequence" if i == 0 else f"sequence{i + 1}" for i, size in enumerate(shared)}
    return {n: {axis: dim_names[int(size)] for axis, size in enumerate(tensor.shape) if axis and size in dim_names}
            for n, tensor in zip(names, example)}


def _values(exported: Any) -> tuple[list, list]:
    """The example values (fake tensors, symbolic sizes) of an exported program's inputs and outputs."""
    nodes = {node.name: node for node in exported.graph.nodes}
    signature = exported.graph_signature
    output = next(node for node in exported.graph.nodes if node.op == "output")
    returned = [arg for arg in output.args[0] if getattr(arg, "name", None) in signature.user_outputs]
    return [nodes[n].meta["val"] for n in signature.user_inputs], [arg.meta["val"] for arg in returned]
