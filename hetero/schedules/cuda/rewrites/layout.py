"""NHWC for every conv: the rewrites around ``ConvertLayout`` that keep it from leaving copies."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ...base.analysis import static
from .tensors import map_functions, tensor_shape

_ARITH = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum",
          "relax.minimum")


@mutator
class _BroadcastTo4D(PyExprMutator):
    """``x (N,C,H,W) + b (C,1,1)`` -> ``x + reshape(b, (1,C,1,1))``.

    ConvertLayout cannot give a rank-3 operand a 4-D layout, so it would convert every bias add
    back to NCHW; with both operands 4-D it permutes the (tiny) bias instead.
    """

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name in _ARITH and len(call.args) == 2):
            return call
        shapes = [tensor_shape(a) for a in call.args]
        if any(s is None for s in shapes):
            return call
        ranks = [len(s) for s in shapes]
        if ranks[0] == ranks[1] or max(ranks) != 4 or min(ranks) == 0:
            return call
        args = list(call.args)
        low = ranks.index(min(ranks))
        args[low] = self.builder_.emit(relax.op.reshape(args[low], [1] * (4 - ranks[low]) + shapes[low]))
        return relax.Call(call.op, args, call.attrs, call.ty_args)


@tvm.transform.module_pass(opt_level=0, name="hetero.BroadcastTo4D")
def broadcast_to_4d(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    return map_functions(mod, lambda f: _BroadcastTo4D().visit_expr(f))


@mutator
class _PermuteToReshape(PyExprMutator):
    """``permute_dims`` that keeps the order of the non-unit axes -> ``reshape`` (a free view).

    ConvertLayout leaves ``permute_dims(reshape(bias), [0, 2, 3, 1])`` from (1, C, 1, 1) to
    (1, 1, 1, C): a copy kernel per bias per call, where a reshape costs nothing.
    """

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.permute_dims"):
            return call
        shape = tensor_shape(call.args[0])
        if shape is None:
            return call
        axes = call.attrs.axes
        axes = list(range(len(shape)))[::-1] if axes is None else [int(a) for a in axes]
        moved = [a for a in axes if static(shape[a]) != 1]  # a symbolic extent counts as > 1
        if moved != sorted(moved):
            return call
        return relax.op.reshape(call.args[0], [shape[a] for a in axes])


@tvm.transform.module_pass(opt_level=0, name="hetero.PermuteToReshape")
def permute_to_reshape(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    return map_functions(mod, lambda f: _PermuteToReshape().visit_expr(f))


def to_nhwc() -> list[tvm.transform.Pass]:
    """The passes that turn a module's convs NHWC (weights OHWI), biases and all."""
    return [broadcast_to_4d, relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]}),
            permute_to_reshape]
