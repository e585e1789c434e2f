"""What several CPU rules share: vector width, inlining, the generic parallel + vector schedule of one block."""

from __future__ import annotations

import os
from collections.abc import Callable

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target.codegen import llvm_get_vector_width

from ..base.analysis import REDUCTION, SPATIAL, iter_kinds, loop_extent, loop_kinds, uses_var
from ..base.rule import TVM_ERRORS

PARALLEL_GRAIN = 64  # outer loops are fused into one parallel loop until this many static iterations


def vector_lanes(target: tvm.target.Target, dtype_bits: int = 32) -> int:
    """Elements of ``dtype_bits`` in one vector register of ``target`` (128-bit registers where LLVM
    does not know the target's CPU)."""
    width = int(llvm_get_vector_width(target))  # -1 where LLVM cannot tell
    if width <= 0:
        width = 128
    return max(width // max(dtype_bits, 8), 1)


def num_cores(target: tvm.target.Target) -> int:
    """The target's ``num-cores``, else this machine's CPUs."""
    cores = target.attrs.get("num-cores", None) if target.attrs is not None else None
    if cores:
        return int(cores)
    return max(os.cpu_count() or 1, 1)


def pick_vector_factor(extent: int | None, lanes: int) -> int | None:
    """Choose an inner split factor for vectorisation of a loop of ``extent``.

    Returns None when the loop should be vectorised whole (LLVM splits a
    vector of up to 4 registers itself), 0 when it should not be vectorised,
    otherwise the factor; divisors of the extent are preferred so that no
    tail predicate (which TVM's vectoriser scalarises) is needed.
    """
    if extent is None:
        return lanes
    if extent <= 1:
        return 0
    if extent <= 4 * lanes:
        return None
    for f in list(range(4 * lanes, lanes - 1, -1)) + list(range(lanes - 1, max(lanes // 2, 3) - 1, -1)):
        if extent % f == 0:
            return f
    return lanes


def is_spatial_block(sch: s_tir.Schedule, block) -> bool:
    return all(kind == SPATIAL for kind in iter_kinds(sch.get(block)))


def can_inline_cheaply(sch: s_tir.Schedule, block) -> bool:
    """True if every consumer reads the produced buffer with the consumer's
    spatial iters only (no reduction vars), i.e. inlining duplicates no work."""
    stmt = sch.get(block)
    if len(stmt.writes) != 1:
        return False
    buf = stmt.writes[0].source
    try:
        consumers = sch.get_consumers(block)
    except TVM_ERRORS:
        return False
    for cons in consumers:
        cstmt = sch.get(cons)
        red_vars = [iv.var for iv in cstmt.iter_vars if iv.iter_type != tirx.IterVar.DataPar]
        if not red_vars:
            continue
        for region in cstmt.reads:
            if not region.source.same_as(buf):
                continue
            for rng in region.region:
                for v in red_vars:
                    if uses_var(rng.min, v):
                        return False
    return True


def inline_all(sch: s_tir.Schedule, blocks: list) -> list:
    """compute_inline / reverse_compute_inline every block that allows it.

    Returns the blocks that stay.  A producer is only inlined into its
    consumers when it is elementwise-like (each element read once), so a
    padding stage feeding a convolution or pooling stays materialised.
    TVM refuses an inlining that does not fit (a ScheduleError) and leaves
    the schedule as it was.
    """
    remaining = list(blocks)
    changed = True
    while changed:
        changed = False
        for blk in list(remaining):
            if not is_spatial_block(sch, blk):
                continue
            if can_inline_cheaply(sch, blk):
                try:
                    sch.compute_inline(blk)
                    remaining.remove(blk)
                    changed = True
                    continue
                except TVM_ERRORS:
                    pass
            try:
                sch.reverse_compute_inline(blk)
                remaining.remove(blk)
                changed = True
            except TVM_ERRORS:
                pass
    return remaining


def located(func: tirx.PrimFunc, find: Callable) -> tuple[s_tir.Schedule, list, object] | None:
    """A schedule of ``func`` with its elementwise blocks inlined, the blocks left, and what
    ``find(sch, blocks)`` locates among them; None when either comes up empty."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    blocks = inline_all(sch, [info.block_rv for info in infos])
    found = find(sch, blocks)
    return None if found is None else (sch, blocks, found)


def schedule_block_generic(sch: s_tir.Schedule, block, lanes: int, vectorize: bool = True) -> None:
    """Parallel outer spatial loops + vectorised innermost spatial loop."""
    kinds = loop_kinds(sch, block)
    loops = sch.get_loops(block)
    if not loops:
        return
    if kinds is None:
        # a loop binds iterators of both kinds: no loop is safely parallel
        return
    s_loops = [loop for loop, k in zip(loops, kinds) if k == SPATIAL]
    r_loops = [loop for loop, k in zip(loops, kinds) if k == REDUCTION]
    if not s_loops:
        return

    # Move the innermost spatial loop inside the reduction loops so that it
    # can be vectorised (pooling, reductions over non-innermost axes).
    inner = s_loops[-1]
    inner_ext = loop_extent(sch, inner)
    vec = vectorize and inner_ext is not None and inner_ext > 1
    if r_loops:
        if vec and len(s_loops) >= 2:
            sch.reorder(*s_loops[:-1], *r_loops, inner)
        else:
            vec = False
            sch.reorder(*s_loops, *r_loops)
    outer = s_loops[:-1] if vec else s_loops

    vec_loop = None
    if vec:
        factor = pick_vector_factor(inner_ext, lanes)
        if factor == 0:
            vec = False
        elif factor is None:
            vec_loop = inner
        else:
            _, vec_loop = sch.split(inner, factors=[None, factor])

    # Parallelise: fuse outer spatial loops until enough parallel work.
    to_fuse = []
    work = 1
    for loop in outer:
        to_fuse.append(loop)
        ext = loop_extent(sch, loop)
        if ext is not None:
            work *= ext
            if work >= PARALLEL_GRAIN:
                break
    if not to_fuse and vec_loop is not None and not r_loops:
        # Single loop: split the vector loop's outer part instead.
        to_fuse = [sch.get_loops(block)[0]]
    if to_fuse:
        fused = sch.fuse(*to_fuse) if len(to_fuse) > 1 else to_fuse[0]
        sch.parallel(fused)
    if vec_loop is not None:
        sch.vectorize(vec_loop)
    if r_loops and vec_loop is not None:
        # Initialise outside of the reduction loops (the init loop copies the
        # vectorised inner loop); where TVM cannot, the init stays inside.
        try:
            sch.decompose_reduction(block, r_loops[0])
        except TVM_ERRORS:
            pass
