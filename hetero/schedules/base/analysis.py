"""Reading kernels: extents, the kinds of a block's iterators and loops, variables, multiply-accumulates."""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad
from tvm.sym.analyzer import Analyzer
from tvm.tirx.analysis import undefined_vars

# The batch the tile heuristics assume (the batch itself stays symbolic in every kernel).
PLANNING_BATCH = 64

SPATIAL, REDUCTION, OTHER = "S", "R", "O"

_get_sblock_realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")


def static(expr) -> int | None:
    """An extent's value, None where it is symbolic (the batch)."""
    return int(expr) if isinstance(expr, tirx.IntImm) else None


def estimate(expr, batch: int = PLANNING_BATCH) -> int:
    """An extent at the planning batch: every symbolic variable (the batch) set to ``batch``."""
    if isinstance(expr, tirx.IntImm):
        return int(expr)
    analyzer = Analyzer()
    for var in undefined_vars(expr):
        analyzer.bind(var, tirx.IntImm(str(var.ty), batch))
    value = analyzer.simplify(expr)
    return int(value) if isinstance(value, tirx.IntImm) else batch


def static_shape(buffer: tirx.Buffer) -> list[int | None]:
    """A buffer's extents, None where one is symbolic (the batch)."""
    return [static(dim) for dim in buffer.shape]


def static_numel(shape) -> int | None:
    """Elements of a shape, None if any extent is symbolic."""
    total = 1
    for dim in shape:
        if not isinstance(dim, tirx.IntImm):
            return None
        total *= int(dim)
    return total


def loop_extent(sch: s_tir.Schedule, loop) -> int | None:
    return static(sch.get(loop).extent)


def largest_divisor_at_most(n: int, cap: int) -> int:
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


def sblock_realize(sch: s_tir.Schedule, block):
    """The realize of ``block``: the values its iterators are bound to."""
    return _get_sblock_realize(sch, block)


def iter_kinds(block: tirx.SBlock) -> list[str]:
    """SPATIAL, REDUCTION or OTHER for each iterator of ``block``."""
    kinds = []
    for iv in block.iter_vars:
        if iv.iter_type == tirx.IterVar.DataPar:
            kinds.append(SPATIAL)
        elif iv.iter_type == tirx.IterVar.CommReduce:
            kinds.append(REDUCTION)
        else:
            kinds.append(OTHER)
    return kinds


def vars_of(expr) -> list[tirx.Var]:
    found = []
    tvm_ffi.structural_walk(expr, (tirx.Var, found.append), order="post")
    return found


def uses_var(expr, var: tirx.Var) -> bool:
    return any(v.same_as(var) for v in vars_of(expr))


def is_var(expr, var: tirx.Var) -> bool:
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def loop_kinds(sch: s_tir.Schedule, block) -> list[str] | None:
    """SPATIAL or REDUCTION for each loop above ``block``, from the iterators it binds; None when a
    loop binds iterators of both kinds or of another kind."""
    realize = sblock_realize(sch, block)
    kinds = iter_kinds(sch.get(block))
    result = []
    for loop in sch.get_loops(block):
        loop_var = sch.get(loop).loop_var
        used = {kind for kind, value in zip(kinds, realize.iter_values) if uses_var(value, loop_var)}
        if not used:
            result.append(SPATIAL)  # a unit or unused loop: harmless
        elif len(used) == 1 and next(iter(used)) in (SPATIAL, REDUCTION):
            result.append(next(iter(used)))
        else:
            return None
    return result


def reads_buffer(block: tirx.SBlock, buffer: tirx.Buffer) -> bool:
    return any(region.source.same_as(buffer) for region in block.reads)


def read_index(block: tirx.SBlock, buffer: tirx.Buffer) -> int:
    """Which of ``block``'s reads reads ``buffer``."""
    for i, region in enumerate(block.reads):
        if region.source.same_as(buffer):
            return i
    raise ValueError("buffer not read by block")


def strip_cast(expr):
    while isinstance(expr, tirx.Cast):
        expr = expr.value
    return expr


def multiply_accumulate(block: tirx.SBlock) -> tuple[tirx.BufferStore, TensorLoad, TensorLoad] | None:
    """``out[..] = out[..] + a[..] * b[..]`` (casts allowed around the product and its operands): the
    store, ``a`` and ``b``; None for any other body."""
    body = block.body
    if not isinstance(body, tirx.BufferStore):
        return None
    value = body.value
    if not isinstance(value, tirx.Add):
        return None
    lhs, rhs = value.a, value.b
    if isinstance(rhs, TensorLoad) and rhs.source.same_as(body.buffer):
        lhs, rhs = rhs, lhs
    if not (isinstance(lhs, TensorLoad) and lhs.source.same_as(body.buffer)):
        return None
    rhs = strip_cast(rhs)
    if not isinstance(rhs, tirx.Mul):
        return None
    a, b = strip_cast(rhs.a), strip_cast(rhs.b)
    if not (isinstance(a, TensorLoad) and isinstance(b, TensorLoad)):
        return None
    return body, a, b
