"""Make every floating-point max and min propagate NaN, as PyTorch and ONNX Runtime do.

TVM lowers ``max(a, b)`` to ``a > b ? a : b`` on LLVM and to ``fmaxf`` on CUDA: both return the
number when one operand is NaN, so ``relu(NaN)`` came out 0 and a max pool skipped a NaN in its
window, turning a bad input into a plausible output. The pass rewrites each float ``Max``/``Min`` in
the compiled kernels to return a NaN operand when there is one, and is run after scheduling, so the
schedule rules still see the plain ``max`` they match.
"""

from __future__ import annotations

import math

import tvm
import tvm_ffi
from tvm import s_tir, tirx


def _can_be_nan(expr: tirx.Expr) -> bool:
    """Whether `expr` may be NaN at run time: anything but a constant number (or a broadcast of one)."""
    if isinstance(expr, tirx.Broadcast):
        expr = expr.value
    return not (isinstance(expr, tirx.FloatImm) and not math.isnan(expr.value))


def _propagating(node: tirx.Max | tirx.Min) -> tirx.Expr:
    if not str(node.ty).startswith(("float", "bfloat")):
        return node
    operands = [node.a, node.b]
    bindings = []
    for index, operand in enumerate(operands):
        if _can_be_nan(operand) and not isinstance(operand, (tirx.Var, tvm.ir.TensorLoad)):
            var = tirx.Var(f"nan_check{index}", operand.ty)  # evaluated once, read twice
            bindings.append((var, operand))
            operands[index] = var
    result = type(node)(*operands)
    for operand in reversed(operands):
        if _can_be_nan(operand):
            result = tirx.Select(tirx.isnan(operand), operand, result)
    for var, value in reversed(bindings):
        result = tirx.Let(var, value, result)
    return result


def _cross_thread_reductions(func: tirx.PrimFunc) -> dict[str, s_tir.SBlock]:
    """The reduction blocks of a scheduled kernel whose reduction is split over a block's threads, by name.

    TVM lowers those (LowerCrossThreadReduction) only where it knows the combiner, which a NaN-propagating
    max is not: a softmax's row max on a GPU. They keep the plain max; a NaN still reaches the softmax's
    output through its exponentials."""
    threads: list[tirx.Var] = []

    def loop(node: tirx.For) -> None:
        if node.thread_binding is not None and node.thread_binding.thread_tag.startswith("threadIdx"):
            threads.append(node.loop_var)

    blocks: dict[str, s_tir.SBlock] = {}

    def realize(node: s_tir.SBlockRealize) -> None:
        for iter_var, value in zip(node.block.iter_vars, node.iter_values):
            if iter_var.iter_type == tirx.IterVar.CommReduce and any(
                    v.same_as(t) for v in _vars(value) for t in threads):
                blocks[node.block.name_hint] = node.block

    tvm_ffi.structural_walk(func.body, (tirx.For, loop))
    tvm_ffi.structural_walk(func.body, (s_tir.SBlockRealize, realize))
    return blocks


def _vars(expr: tirx.Expr) -> list[tirx.Var]:
    found: list[tirx.Var] = []
    tvm_ffi.structural_walk(expr, (tirx.Var, found.append))
    return found


@tvm.transform.module_pass(opt_level=0, name="hetero.PropagateNaN")
def propagate_nan(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Every PrimFunc of `mod` with its float max and min made NaN-propagating, but for the combiners of
    reductions split over threads (:func:`_cross_thread_reductions`)."""
    updates = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            kept = _cross_thread_reductions(func)

            def unchanged(block: s_tir.SBlock) -> s_tir.SBlock:
                return kept.get(block.name_hint, block)  # as it was before its max was rewritten below it

            callbacks = [((tirx.Max, tirx.Min), _propagating)] + ([(s_tir.SBlock, unchanged)] if kept else [])
            updated = tvm_ffi.structural_map(func, callbacks, order="post")
            if not updated.same_as(func):
                updates[gvar] = updated
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
