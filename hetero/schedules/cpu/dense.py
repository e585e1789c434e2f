"""Matmul with (K, N) weights, ``out[.., i, j] += a[.., i, k] * b[.., k, j]``: the reduction split across
cores, so a batch of 1 (a GEMV) runs in parallel too and every task streams whole weight rows."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from ..base.analysis import OTHER, REDUCTION, is_var, iter_kinds, loop_extent, loop_kinds, multiply_accumulate, uses_var
from ..base.rule import Rule
from .common import located, num_cores, pick_vector_factor, schedule_block_generic, vector_lanes

DENSE_COL_CHUNK = 4096  # output columns per inner sweep (acc chunk stays in L1)


def find_dense(sch: s_tir.Schedule, blocks: list):
    """MAC block whose last output axis j is the contiguous (last) axis of one
    operand ``b`` and is not used by the other operand ``a``."""
    for blk in blocks:
        stmt = sch.get(blk)
        kinds = iter_kinds(stmt)
        if kinds.count(REDUCTION) != 1 or OTHER in kinds or kinds[-1] != REDUCTION:
            continue
        mac = multiply_accumulate(stmt)
        if mac is None:
            continue
        store, a, b = mac
        ivars = [iv.var for iv in stmt.iter_vars]
        s_vars = ivars[:-1]
        k_var = ivars[-1]
        if len(store.indices) != len(s_vars) or len(s_vars) < 2:
            continue
        if not all(is_var(i, v) for i, v in zip(store.indices, s_vars)):
            continue
        j_var = s_vars[-1]
        for a_load, b_load in ((a, b), (b, a)):
            if not is_var(b_load.indices[-1], j_var):
                continue
            if len(b_load.indices) < 2 or not is_var(b_load.indices[-2], k_var):
                continue
            if any(uses_var(i, j_var) for i in a_load.indices):
                continue
            if not is_var(a_load.indices[-1], k_var):
                continue
            return blk
    return None


def _partial_sums(sch: s_tir.Schedule, k_loop, parts: int, n_ext: int, lanes: int) -> None:
    """``parts`` parallel tasks, each summing one contiguous range of ``k_loop`` into its own row of
    partial sums (rfactor), in chunks of columns with the innermost vectorised; the block of
    ``k_loop`` is left summing the partial rows."""
    ko, _ = sch.split(k_loop, factors=[parts, None])
    rf = sch.rfactor(ko, factor_axis=0)
    rloops = sch.get_loops(rf)
    s_loops, rj, rko, rki = rloops[:-3], rloops[-3], rloops[-2], rloops[-1]
    factor = pick_vector_factor(n_ext, lanes)
    if factor is None:
        jo, jc, jl = sch.split(rj, factors=[1, 1, None])
    else:
        chunk = max(factor, (DENSE_COL_CHUNK // factor) * factor)
        while n_ext % chunk and chunk > factor:
            chunk -= factor
        jo, jc, jl = sch.split(rj, factors=[None, chunk // factor, factor])
    sch.reorder(rko, jo, rki, *s_loops, jc, jl)
    sch.parallel(rko)
    sch.vectorize(jl)
    init = sch.decompose_reduction(rf, rki)
    sch.vectorize(sch.get_loops(init)[-1])


class Dense(Rule):
    """matmul with the weight in (K, N) layout (a GEMV at batch 1).

    The reduction is split into P contiguous k ranges (rfactor) computed in
    parallel, so even batch 1 uses every core and each task streams whole
    weight rows (contiguous, no TLB thrash); partial sums over chunks of
    columns stay in L1, the inner column loop is vectorised.  The P partial
    results are summed by a small write-back block.
    """

    name = "dense"

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        prepared = located(func, find_dense)
        if prepared is None:
            return None
        sch, blocks, blk = prepared
        out_buf = sch.get(blk).writes[0].source
        lanes = vector_lanes(target, int(out_buf.dtype.bits))
        loops = sch.get_loops(blk)
        kinds = loop_kinds(sch, blk)
        if kinds is None or kinds[-1] != REDUCTION or REDUCTION in kinds[:-1]:
            return None
        n_ext, k_ext = loop_extent(sch, loops[-2]), loop_extent(sch, loops[-1])
        if n_ext is None or k_ext is None or k_ext < 128:
            return None
        cores = num_cores(target)
        parts = next(
            (p for p in range(4 * cores, 0, -1) if k_ext % p == 0 and p % cores == 0 and k_ext // p >= 32),
            None,
        )
        if parts is None:
            return None
        others = [b for b in blocks if not b.same_as(blk)]

        _partial_sums(sch, loops[-1], parts, n_ext, lanes)
        schedule_block_generic(sch, blk, lanes)  # the sum of the partial rows
        for other in others:
            schedule_block_generic(sch, other, lanes)
        return sch
