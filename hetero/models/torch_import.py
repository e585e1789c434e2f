"""Networks made from PyTorch modules (:func:`from_torch`), through ``torch.export`` and Relax's importer."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any

import tvm
from tvm import relax

from ..errors import HeteroError, one_line
from .network import Network, Origin, readonly, require_package


class TorchConversionError(HeteroError, ValueError):
    """A PyTorch module that cannot be exported, or imported into Relax with a symbolic batch."""


class TorchOrigin(Origin):
    """A PyTorch module (:func:`from_torch`): its PyTorch form is the module itself; its ONNX
    form is exported once (torch.onnx's dynamo exporter, batch dimension ``N``)."""

    forms = ("relax", "onnx", "torch")

    def __init__(self, module: Any, example: Any) -> None:
        self.module = module
        self.example = example  # an input batch of 2, on the module's device
        self._onnx: bytes | None = None
        self._lock = threading.Lock()

    def torch_module(self, net: Network):  # noqa: ANN201
        # a copy: engines move it to their device, precision and memory format, which must not touch the user's
        return copy.deepcopy(self.module).eval()

    def onnx_model(self, net: Network):  # noqa: ANN201
        require_package("onnx", "ONNX", net.name, "'hetero[onnx]'")
        require_package("onnxscript", "ONNX", net.name, "onnxscript")
        import onnx
        import torch

        with self._lock:
            if self._onnx is None:
                try:
                    program = torch.onnx.export(
                        self.module.eval(), (self.example,), dynamo=True, external_data=False,
                        input_names=["x"], output_names=["y"],
                        dynamic_shapes=({0: torch.export.Dim("N", min=1)},), verbose=False)
                except Exception as err:  # unsupported ops, ...
                    raise TorchConversionError(f"cannot export network {net.name!r} to ONNX: "
                                               f"{one_line(err)}") from None
                self._onnx = program.model_proto.SerializeToString()
        return onnx.load_from_string(self._onnx)


def from_torch(module: Any, sample_shape: Sequence[int], name: str = "torch_model") -> Network:
    """The Network of a PyTorch module (one tensor in, one tensor out), for samples of ``sample_shape``.

    ``sample_shape`` is the shape of ONE sample, e.g. ``(3, 224, 224)``.  The module is put in
    eval mode and exported with ``torch.export`` with a dynamic batch dimension, then imported
    into Relax with its parameters as the weights (``params``; buffers such as BatchNorm
    statistics become constants of the module) and the batch a symbolic ``n``.  Its
    ``torch_module()`` is a copy of ``module``; its ``onnx_model()`` is exported by ``torch.onnx``.

    Raises TorchConversionError when the module cannot be exported or imported, or its output's
    batch dimension cannot be made symbolic (e.g. a hard-coded batch size in a reshape).
    """
    import torch  # the caller has a torch module, so torch is installed
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_exported_program

    sample = tuple(int(d) for d in sample_shape)
    if not sample or any(d <= 0 for d in sample):
        raise ValueError(f"sample_shape must be the positive sizes of one sample, got {sample_shape}")
    module.eval()
    tensors = [*module.parameters(), *module.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    device = tensors[0].device if tensors else torch.device("cpu")
    torch_dtype = floats[0].dtype if floats else torch.float32
    dtype = str(torch_dtype).removeprefix("torch.")
    # batch 2: torch.export specializes a dimension whose example size is 0 or 1
    example = torch.randn((2, *sample), generator=torch.Generator().manual_seed(0)).to(device, torch_dtype)
    try:
        exported = torch.export.export(module, (example,),
                                       dynamic_shapes=({0: torch.export.Dim("n", min=1)},))
    except Exception as err:  # data-dependent control flow, a batch size baked in, ...
        raise TorchConversionError(f"cannot export PyTorch module {name!r} with a dynamic batch "
                                   f"dimension: {one_line(err)}") from None
    try:
        mod = from_exported_program(exported, keep_params_as_input=True,
                                    unwrap_unit_return_tuple=True)
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
    out_dims = []
    if isinstance(ret, relax.TensorType) and isinstance(ret.shape, relax.ShapeExpr):
        out_dims = [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in ret.shape.values]
    if not isinstance(batch, tvm.tirx.Var) or not out_dims or not isinstance(out_dims[0], tvm.tirx.Var) \
            or not out_dims[0].same_as(batch) or not all(isinstance(d, int) for d in out_dims[1:]):
        raise TorchConversionError(f"PyTorch module {name!r}: cannot make the batch dimension "
                                   f"symbolic (output {ret}); it must return one tensor "
                                   "(batch, ...) with static sizes after the batch")
    mod = _rename_batch(mod, batch)
    params = tuple(readonly(p.numpy()) for p in detached.get("main", []))
    if len(params) != len(main.params) - 1:
        raise TorchConversionError(f"PyTorch module {name!r}: {len(main.params) - 1} weight "
                                   f"parameters but {len(params)} values")
    return Network(name, mod, params, sample, tuple(out_dims[1:]), dtype,
                   TorchOrigin(module, example))


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
