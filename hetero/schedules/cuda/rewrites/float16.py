"""``fp16``: a float32 network run in float16, its signature unchanged."""

from __future__ import annotations

from collections.abc import Sequence

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .tensors import map_functions, tensor_dtype

_LAYOUT_OPS = ("relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.squeeze",
               "relax.flatten")
# ops whose float16 version would lose too much: run them in float32
_FP32_OPS = ("relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d", "relax.mean", "relax.sum",
             "relax.variance", "relax.nn.softmax", "relax.nn.log_softmax")


@mutator
class _ToFloat16(PyExprMutator):
    """Run a float32 function in float16 (see :func:`to_float16`)."""

    def __init__(self, params: Sequence[relax.Var]) -> None:
        super().__init__()
        self.params = list(params)
        self.casts: dict[int, relax.Var] = {}

    def _half(self, expr: relax.Expr) -> relax.Expr:
        """``expr`` cast to float16 (each parameter once, where first used)."""
        if tensor_dtype(expr) != "float32":
            return expr
        for index, param in enumerate(self.params):
            if expr.same_as(param):
                if index not in self.casts:
                    self.casts[index] = self.builder_.emit(relax.op.astype(expr, "float16"))
                return self.casts[index]
        return self.builder_.emit(relax.op.astype(expr, "float16"))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if not isinstance(call.op, tvm.ir.Op):
            return super().visit_call_(call)
        name = call.op.name
        # Visit the arguments here: normalising the call with some of them already float16 and
        # the others (parameters) still float32 would fail type inference.
        args = [self.visit_expr(a) for a in call.args]
        if name not in _LAYOUT_OPS:
            # A parameter reshaped or permuted stays float32 until its consumer casts it: a
            # bias cast right before its add fuses into the conv's epilogue, not a kernel.
            args = [self._half(a) if any(a.same_as(p) for p in self.params) else a for a in args]
        if any(tensor_dtype(a) == "float16" for a in args) or name in ("relax.nn.conv2d",
                                                                        "relax.matmul"):
            args = [self._half(a) for a in args]
        if name == "relax.nn.conv2d" and all(tensor_dtype(a) == "float16" for a in args):
            at = call.attrs
            out = self.builder_.emit(relax.op.nn.conv2d(
                args[0], args[1], at.strides, at.padding, at.dilation, at.groups, at.data_layout,
                at.kernel_layout, at.out_layout, out_dtype="float32"))
            return relax.op.astype(out, "float16")
        if name == "relax.matmul" and all(tensor_dtype(a) == "float16" for a in args):
            out = self.builder_.emit(relax.op.matmul(args[0], args[1], out_dtype="float32"))
            return relax.op.astype(out, "float16")
        if name in _FP32_OPS and args and tensor_dtype(args[0]) == "float16":
            args[0] = self.builder_.emit(relax.op.astype(args[0], "float32"))
            out = self.builder_.emit(relax.Call(call.op, args, call.attrs, call.ty_args))
            return relax.op.astype(out, "float16")
        return relax.Call(call.op, args, call.attrs, call.ty_args)


def _cast_result(func: relax.Function, dtype: str) -> relax.Function:
    """``func`` with its (tensor) result cast to ``dtype``, in a binding block after the body."""
    body = func.body
    if not isinstance(body, relax.SeqExpr) or tensor_dtype(body.body) in (None, dtype):
        return func
    out = relax.Var("result", relax.TensorType(body.body.ty.shape, dtype))
    block = relax.BindingBlock([relax.VarBinding(out, relax.op.astype(body.body, dtype))])
    return relax.Function(func.params, relax.SeqExpr([*body.blocks, block], out), out.ty,
                          func.is_pure, func.attrs, func.span)


def _to_float16(func: relax.Function) -> relax.Function:
    if any(tensor_dtype(p) not in (None, "float32") for p in func.params):
        return func  # not a float32 function: leave it alone
    if tensor_dtype(func.body) != "float32":
        return func  # a tuple (or non-tensor) result: not handled
    func = _ToFloat16(func.params).visit_expr(func)
    return _cast_result(func, "float32")


@tvm.transform.module_pass(opt_level=0, name="hetero.ToFloat16")
def to_float16(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Run every float32 Relax function in float16, keeping its float32 signature.

    Parameters are cast to float16 once, where first used; conv2d and matmul get
    ``out_dtype="float32"`` (float32 accumulation: the tensor-core schedule uses f16 x f16 -> f32
    fragments) and their result is cast to float16, so the activations between layers are float16;
    averaging ops run in float32; the result is cast back to float32.
    """
    return map_functions(mod, _to_float16)
