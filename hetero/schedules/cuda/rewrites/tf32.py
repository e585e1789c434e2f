"""``tf32``: every GEMM operand rounded to TF32 where it is computed, for the TF32 tensor cores."""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from .tensors import tensor_dtype


def tf32_rounded(value: tirx.PrimExpr) -> tirx.PrimExpr:
    """The TF32 number nearest the float32 ``value`` (ties away from zero; 10 mantissa bits), as a
    float32: half a TF32 unit added to the bits, the 13 bits below TF32's mantissa cleared.  A NaN
    stays itself: one whose payload lies in those 13 bits alone would otherwise round to infinity."""
    bound = tirx.Var("tf32_operand", "float32")  # the value is computed once, read three times
    bits = tirx.reinterpret("uint32", bound) + tirx.const(1 << 12, "uint32")
    rounded = tirx.reinterpret("float32", bits & tirx.const(0xFFFFE000, "uint32"))
    return tirx.Let(bound, value, tirx.Select(tirx.isnan(bound), bound, rounded))


def _tf32_rounding(x):
    from tvm import te

    return te.compute(x.shape, lambda *i: tf32_rounded(x(*i)), name="tf32_round")


def _is_tensor_core_gemm(call: relax.Call) -> bool:
    if not isinstance(call.op, tvm.ir.Op):
        return False
    if call.op.name == "relax.nn.conv2d":
        return int(call.attrs.groups) == 1
    return call.op.name == "relax.matmul"


@mutator
class _RoundGemmOperands(PyExprMutator):
    """Round what the GEMMs read to TF32 (see :func:`round_to_tf32`)."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.operands: set[relax.Var] = set()  # the dataflow vars that some GEMM of the function reads
        self.rounded: dict[relax.Expr, relax.Var] = {}  # other operands (parameters), rounded where first used

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        super().visit_var_binding_(binding)
        if binding.var in self.operands:  # every later use, not only the GEMM's, reads the rounded value
            remapped = self.get_var_remap(binding.var)
            self.set_var_remap(binding.var, self._emit_rounding(binding.var if remapped is None else remapped))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not _is_tensor_core_gemm(call):
            return call
        return relax.Call(call.op, [self._rounded(a) for a in call.args], call.attrs, call.ty_args)

    def _rounded(self, arg: relax.Expr) -> relax.Expr:
        if isinstance(arg, relax.DataflowVar) or tensor_dtype(arg) != "float32":
            return arg  # rounded where it is bound
        if arg not in self.rounded:
            self.rounded[arg] = self._emit_rounding(arg)
        return self.rounded[arg]

    def _emit_rounding(self, expr: relax.Expr) -> relax.Var:
        return self.builder_.emit(self.builder_.call_te(_tf32_rounding, expr))


# Ops whose output is TF32 wherever their input is: they move or pick values (rounding is
# monotone, so max_pool(round(x)) == round(max_pool(x)), bit for bit).
_KEEP_ROUNDING = ("relax.nn.max_pool2d", "relax.reshape", "relax.permute_dims")


def _gemm_operands(func: relax.Function) -> set[relax.Var]:
    """The dataflow vars to round: the GEMMs' float32 operands, each traced back through
    _KEEP_ROUNDING ops to the first value with other uses.  Rounded there, the rounding fuses into
    the epilogue of the conv that computes it, not into a max pool after it (and vgg's convs then
    fit two blocks per SM: benchmarks/HISTORY.md, "TF32 rounding before max pools")."""
    bindings = [binding for block in (func.body.blocks if isinstance(func.body, relax.SeqExpr) else [])
                for binding in block.bindings]
    uses: dict[relax.Var, int] = {}

    def count(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1

    for expr in [binding.value for binding in bindings] + [getattr(func.body, "body", func.body)]:
        relax.analysis.post_order_visit(expr, count)
    source = {binding.var: binding.value.args[0] for binding in bindings
              if isinstance(binding.value, relax.Call) and isinstance(binding.value.op, tvm.ir.Op)
              and binding.value.op.name in _KEEP_ROUNDING
              and isinstance(binding.value.args[0], relax.DataflowVar) and uses.get(binding.value.args[0]) == 1}

    def first_rounded(var: relax.Var) -> relax.Var:
        while var in source:
            var = source[var]
        return var

    operands = set()
    for binding in bindings:
        if isinstance(binding.value, relax.Call) and _is_tensor_core_gemm(binding.value):
            operands.update(first_rounded(a) for a in binding.value.args
                            if isinstance(a, relax.DataflowVar) and tensor_dtype(a) == "float32")
    return operands


@tvm.transform.module_pass(opt_level=0, name="hetero.RoundToTF32")
def round_to_tf32(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Round every operand of the convolutions and matmuls to TF32, where it is computed: the
    tensor cores read float32 bits as TF32 by dropping the low 13 mantissa bits, which biases
    every product towards zero, and the bias adds up over a network's layers (vgg-16: 1.1e-2 of
    fp32; rounded, 1.1e-3).  An activation is rounded right after the op that computes it, for
    all its uses (the rounding fuses into that op's kernel, where rounding only the GEMM's use
    would cost a kernel of its own); a weight is rounded once, where the weights are prepared
    (``LiftTransformParams``), not on every call."""
    mutator_ = _RoundGemmOperands(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator_.operands, mutator_.rounded = _gemm_operands(func), {}
            mutator_.builder_.update_func(gv, mutator_.visit_expr(func))
    return mutator_.builder_.get()
