"""Sliding-window reductions in NCHW, depthwise (and grouped) conv2d and max / avg pooling: output
columns vectorised, the window unrolled, the padded input produced per (n, c) task."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from ..base.analysis import (
    OTHER,
    REDUCTION,
    SPATIAL,
    is_var,
    iter_kinds,
    largest_divisor_at_most,
    loop_extent,
    loop_kinds,
    reads_buffer,
    static_shape,
    uses_var,
)
from ..base.rule import TVM_ERRORS, Rule
from .common import located, pick_vector_factor, schedule_block_generic, vector_lanes

WINDOW_MAX_TILE_X = 64  # output columns of one accumulator row
MAX_UNROLLED_WINDOW = 64  # unroll the window loops up to this many taps


def _linear_coef(expr, var) -> int | None:
    """Coefficient of ``var`` in ``expr`` if ``expr`` is linear in it (with a constant coefficient)."""
    coefs = tvm.sym.detect_linear_equation(expr, [var])  # empty where it is not linear
    if len(coefs) != 2 or not isinstance(coefs[0], tirx.IntImm):
        return None
    return int(coefs[0])


def find_window(sch: s_tir.Schedule, blocks: list):
    """The single reduction block ``out[n, c, y, x] = reduce(data[.., y*s+.., x*s+..])``.

    Returns (block, data_buffer, x_stride)."""
    reds = [b for b in blocks if REDUCTION in iter_kinds(sch.get(b))]
    if len(reds) != 1:
        return None
    blk = reds[0]
    stmt = sch.get(blk)
    kinds = iter_kinds(stmt)
    if OTHER in kinds or len(stmt.writes) != 1:
        return None
    ivars = [iv.var for iv in stmt.iter_vars]
    s_vars = [v for v, k in zip(ivars, kinds) if k == SPATIAL]
    body = stmt.body
    if not isinstance(body, tirx.BufferStore) or len(body.indices) != 4 or len(s_vars) != 4:
        return None
    if not all(is_var(i, v) for i, v in zip(body.indices, s_vars)):
        return None
    x_var = s_vars[3]
    for region in stmt.reads:
        buf = region.source
        if buf.same_as(body.buffer) or len(region.region) < 2:
            continue
        last = region.region[-1].min
        if not uses_var(last, x_var):
            continue
        coef = _linear_coef(last, x_var)
        if coef is None or coef < 1:
            return None
        return blk, buf, coef
    return None


def _deinterleave_columns(sch: s_tir.Schedule, producer, stride: int) -> None:
    """Store the padded input ``w % stride, w // stride``: the columns one vector of a strided
    window reads lie side by side."""
    sch.transform_layout(producer, ("write", 0), lambda a, b, h, w: (a, b, h, w % stride, w // stride))
    sch.transform_block_layout(producer, lambda a, b, h, w: (a, b, h, w % stride, w // stride))


def _produce_in_task(sch: s_tir.Schedule, producer, task, lanes: int) -> None:
    """The padded plane of one (n, c) produced inside the task that consumes it (it stays in cache
    instead of a round trip to memory), vectorised; where TVM cannot move it there, the generic
    schedule."""
    try:
        sch.compute_at(producer, task, preserve_unit_loops=True)
        ploops = sch.get_loops(producer)[1:]
        if ploops:
            factor = pick_vector_factor(loop_extent(sch, ploops[-1]), lanes)
            if factor is None:
                sch.vectorize(ploops[-1])
            elif factor:
                sch.vectorize(sch.split(ploops[-1], factors=[None, factor])[1])
    except TVM_ERRORS:
        schedule_block_generic(sch, producer, lanes)


class Window(Rule):
    """Depthwise conv2d and pooling (NCHW): vectorise over output columns,
    reduction window innermost but one with the accumulator row in registers,
    parallel over (n, c); for stride > 1 the padded input is stored column
    deinterleaved (``w % s, w // s``) so the vector loads are contiguous."""

    name = "window"

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        prepared = located(func, find_window)
        if prepared is None:
            return None
        sch, blocks, (blk, data_buf, stride) = prepared
        out_buf = sch.get(blk).writes[0].source
        _, c_ext, _, w_ext = static_shape(out_buf)
        if w_ext is None or w_ext < 4 or c_ext is None:
            return None
        lanes = vector_lanes(target, int(out_buf.dtype.bits))
        others = [b for b in blocks if not b.same_as(blk)]
        consumers = [b for b in others if reads_buffer(sch.get(b), out_buf)]
        producers = [b for b in others if b not in consumers]
        if len(consumers) > 1:
            return None

        # an accumulator row of tile_x output columns, per (n, c) task
        acc = sch.cache_write(blk, 0, "local")
        loops = sch.get_loops(blk)
        kinds = loop_kinds(sch, blk)
        if kinds is None or kinds[:4] != [SPATIAL] * 4:
            return None
        nn, cc, yy, xx = loops[:4]
        r_loops = loops[4:]
        if w_ext <= WINDOW_MAX_TILE_X:
            tile_x = w_ext
        else:
            tile_x = largest_divisor_at_most(w_ext, WINDOW_MAX_TILE_X)
            if tile_x < lanes:
                tile_x = 2 * lanes
        xo, xi = sch.split(xx, factors=[None, tile_x])
        sch.reorder(nn, cc, yy, xo, *r_loops, xi)
        task = sch.fuse(nn, cc)
        sch.parallel(task)

        # write back (+ the epilogue) per accumulator row
        if consumers:
            sch.compute_inline(acc)
            sch.reverse_compute_at(consumers[0], xo, preserve_unit_loops=True)
            tail = consumers[0]
        else:
            sch.reverse_compute_at(acc, xo, preserve_unit_loops=True)
            tail = acc
        sch.vectorize(sch.get_loops(tail)[-1])

        sch.vectorize(xi)
        window = 1
        for r in r_loops:
            window *= loop_extent(sch, r) or 1000
        if window <= MAX_UNROLLED_WINDOW:
            for r in r_loops:
                sch.unroll(r)
        if r_loops:
            init = sch.decompose_reduction(blk, r_loops[0])
            sch.vectorize(sch.get_loops(init)[-1])

        for prod in producers:
            pstmt = sch.get(prod)
            if (
                stride > 1
                and len(pstmt.writes) == 1
                and pstmt.writes[0].source.same_as(data_buf)
                and len(data_buf.shape) == 4
                and isinstance(data_buf.shape[3], tirx.IntImm)
                and int(data_buf.shape[3]) % stride == 0
            ):
                _deinterleave_columns(sch, prod, stride)
            _produce_in_task(sch, prod, task, lanes)
        return sch
