"""Depthwise convs and pools: reductions too small to share among threads."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain, auto_inline_producers, get_reduction_blocks

from ..base.analysis import sblock_realize, static
from ..base.rule import Rule


class SmallReduction(Rule):
    """One output per thread, the reduction (at most ``max_reduction`` elements) in a register.

    dlight's ``GeneralReduction`` spends a warp on each output, whose 9-element reduction (a 3x3
    depthwise conv) leaves most of it idle.  Here the spatial loops are fused (channel innermost,
    so in NHWC a warp reads consecutive channels), producers (padding) inlined into the reads, the
    epilogue into the write-back.  Not for a PrimFunc that is not one reduction block plus
    spatial blocks.
    """

    name = "small-reduction"

    def __init__(self, max_reduction: int = 64, threads: int = 256):
        self.max_reduction = max_reduction
        self.threads = threads

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        reductions = get_reduction_blocks(sch, blocks)
        if reductions is None:
            return None
        main = reductions[0]
        block = sch.get(main)
        loops = sch.get_loops(main)
        if len(loops) != len(block.iter_vars):
            return None
        size = 1
        for iv in block.iter_vars:
            if iv.iter_type == tirx.IterVar.CommReduce:
                extent = static(iv.dom.extent)
                if extent is None:
                    return None
                size *= extent
        if size > self.max_reduction:
            return None
        # a freshly legalized block: loop i binds iter var i (trivial binding)
        realize = sblock_realize(sch, main)
        spatial, reduce = [], []
        for loop, iv, value in zip(loops, block.iter_vars, realize.iter_values):
            if not value.same_as(sch.get(loop).loop_var):
                return None
            (reduce if iv.iter_type == tirx.IterVar.CommReduce else spatial).append(loop)
        if not spatial or not reduce:
            return None
        auto_inline_producers(sch, main)
        sch.reorder(*spatial, *reduce)
        fused = sch.fuse(*spatial)
        bx, tx = sch.split(fused, [None, self.threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        l2g = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(l2g, tx, preserve_unit_loops=True)
        auto_inline_consumer_chain(sch, l2g)
        sch.decompose_reduction(main, reduce[0])
        for loop in reduce:
            sch.unroll(loop)
        return sch
