"""The last resort: each block's outermost loop parallel where it is spatial, nothing else, for kernels
no other rule takes (they all start from dlight's normal form, which not every kernel has)."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from ..base.analysis import SPATIAL, loop_kinds
from ..base.rule import TVM_ERRORS, Rule


class ParallelOnly(Rule):
    """Only parallelise the outermost spatial loop of each block."""

    name = "parallel-only"

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        if not isinstance(func.body, s_tir.SBlockRealize):
            return None  # no root block to find the blocks under
        sch = s_tir.Schedule(func)
        root = sch.get_sblock(func.body.block.name_hint)
        done = False
        for blk in sch.get_child_blocks(root):
            try:
                loops = sch.get_loops(blk)
                kinds = loop_kinds(sch, blk)
                if loops and kinds and kinds[0] == SPATIAL:
                    sch.parallel(loops[0])
                    done = True
            except TVM_ERRORS:  # a block TVM will not parallelise: the others still are
                continue
        return sch if done else None
