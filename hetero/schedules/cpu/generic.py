"""Any kernel the specific rules leave: elementwise blocks inlined, each block left parallel over its outer
spatial loops and vectorised along its innermost spatial loop (reduction loops moved outside it)."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from ..base.rule import Rule
from .common import located, schedule_block_generic, vector_lanes


def _out_dtype_bits(sch: s_tir.Schedule, block) -> int:
    stmt = sch.get(block)
    if stmt.writes:
        return int(stmt.writes[0].source.dtype.bits)
    return 32


class Generic(Rule):
    """Parallel + vectorise every block of a kernel (after inlining)."""

    name = "generic"

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        prepared = located(func, lambda sch, blocks: blocks)
        if prepared is None:
            return None
        sch, blocks, _ = prepared
        for blk in blocks:
            schedule_block_generic(sch, blk, vector_lanes(target, _out_dtype_bits(sch, blk)))
        return sch
