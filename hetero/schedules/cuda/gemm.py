"""What the GEMM rules share: a GEMM-like kernel's block, its operands' layout, dlight's
normalisation to ``C[S, I, J] += A[S, I, K] * B[S, J, K]``, and operand staging.

A conv (im2col), a matmul and a batched matmul, with any elementwise epilogue, are all GEMMs here:
dlight's index maps take them alike, so the GEMM rules need no conv matcher.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.matmul import get_index_map, get_reduction_blocks
from tvm.tirx.analysis import undefined_vars


def gemm_block(sch: s_tir.Schedule):
    """The one reduction block of a GEMM-like PrimFunc (everything else spatial), or None."""
    blocks = sch.get_child_blocks(get_root_block(sch))
    reductions = get_reduction_blocks(sch, blocks)
    if reductions is None:
        return None
    main = reductions[0]
    if get_index_map(sch.get(main)) is None:
        return None
    return main


def k_contiguous(block: tirx.SBlock, read: int) -> bool:
    """Whether the innermost index of read ``read`` of ``block`` moves with a reduction axis
    (the operand is stored K-contiguous, like an NHWC im2col row or an OHWI weight row)."""
    reduce_vars = {iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce}
    region = block.reads[read].region
    if not region:
        return True
    used = undefined_vars(region[-1].min)
    if any(v in reduce_vars for v in used):
        return True
    return not used  # a constant innermost index: nothing to gain either way


def in_dtypes(block: tirx.SBlock) -> tuple[str, str, str]:
    """The dtypes of a GEMM block's A, B and C."""
    return (str(block.reads[0].source.dtype), str(block.reads[1].source.dtype),
            str(block.writes[0].source.dtype))


def normalize_gemm(sch: s_tir.Schedule, main) -> None:
    """dlight's normalisation: ``C[S, I, J] += A[S, I, K] * B[S, J, K]`` on reindexed buffers."""
    reindex_a = sch.reindex(main, ("read", 0))
    reindex_b = sch.reindex(main, ("read", 1))
    reindex_c = sch.reindex(main, ("write", 0))
    matmul_map, a_map, b_map, c_map = get_index_map(sch.get(main))
    sch.transform_layout(reindex_a, ("write", 0), a_map)
    sch.transform_layout(reindex_b, ("write", 0), b_map)
    sch.transform_layout(reindex_c, ("read", 0), c_map)
    sch.transform_block_layout(main, matmul_map)


def stage_operand(sch: s_tir.Schedule, main, index: int, scope: str, at, k_major: bool,
                  preserve_unit_loops: bool = False):
    """Stage GEMM operand `index` of `main` in `scope` at loop `at`, copying along the operand's
    contiguous axis (K, or its row axis where it is not K-major); the staged block and its fused copy loop."""
    shared = sch.cache_read(main, index, scope)
    sch.compute_at(shared, at, preserve_unit_loops=preserve_unit_loops)
    rows, cols = sch.get_loops(shared)[-2:]
    if not k_major:
        sch.reorder(cols, rows)
        rows, cols = cols, rows
    return shared, sch.fuse(rows, cols)
