"""The CUDA-core GEMM: convs and matmuls in float32 (and any GEMM that no tensor-core rule takes)."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain, auto_inline_producers

from ..base.rule import Rule
from .gemm import gemm_block, k_contiguous, normalize_gemm, stage_operand
from .tiles import DEFAULT_NUM_SMS, SimtConfig, Trace, pick_simt_config


class SimtGemm(Rule):
    """A GEMM-like PrimFunc (conv, matmul, + elementwise epilogue) on CUDA cores.

    8x8 outputs per thread (2x2 virtual threads of 4x4) in the largest tile, float4 global loads,
    shared tiles stored transposed so that every inner-loop shared read is a conflict-free float4.
    The tile is picked per kernel (:func:`.tiles.pick_simt_config`) for ``num_sms`` SMs.  With
    ``software_pipeline`` the K loop is software pipelined: the global loads of tile k+1 go to
    registers before tile k is computed from the other half of a double-buffered shared tile.
    """

    name = "simt-gemm"

    def __init__(self, num_sms: int = DEFAULT_NUM_SMS, software_pipeline: bool = True, trace: Trace | None = None):
        self.num_sms = num_sms
        self.software_pipeline = software_pipeline
        self.trace = trace

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        main = gemm_block(sch)
        if main is None:
            return None
        block = sch.get(main)
        k_major = [k_contiguous(block, 0), k_contiguous(block, 1)]
        normalize_gemm(sch, main)
        extents = [sch.get(lp).extent for lp in sch.get_loops(main)]
        cfg = pick_simt_config(extents, self.num_sms)
        if self.trace is not None:
            self.trace(self.name, cfg, extents)
        if cfg is None:
            return None

        sch.pad_einsum(main, [1, cfg.bm, cfg.bn, cfg.bk])
        batch, i, j, k = sch.get_loops(main)
        bi, vi, ti, mi = sch.split(i, [None, cfg.vi, cfg.ty, cfg.mi])
        bj, vj, tj, mj = sch.split(j, [None, cfg.vj, cfg.tx, cfg.mj])
        ko, ki = sch.split(k, [None, cfg.bk])
        sch.reorder(bi, bj, vi, vj, ti, tj, ko, ki, mi, mj)
        sch.bind(batch, "blockIdx.z")
        sch.bind(bi, "blockIdx.x")  # M (n*H*W) is the large one: x allows 2^31 - 1 blocks
        sch.bind(bj, "blockIdx.y")
        sch.bind(vi, "vthread.y")
        sch.bind(vj, "vthread.x")
        sch.bind(ti, "threadIdx.y")
        sch.bind(tj, "threadIdx.x")
        sch.annotate(tj, "pragma_auto_unroll_max_step", 512)
        sch.annotate(tj, "pragma_unroll_explicit", 1)

        l2g = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(l2g, tj, preserve_unit_loops=True)

        a_sh = self._fetch(sch, main, 0, ko, k_major[0], cfg)
        b_sh = self._fetch(sch, main, 1, ko, k_major[1], cfg)
        auto_inline_producers(sch, a_sh)
        auto_inline_producers(sch, b_sh)

        for index in (0, 1):  # registers: the thread's rows (columns) of A (B) at one k
            local = sch.cache_read(main, index, "local")
            sch.compute_at(local, ki, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(local)[-1])
        sch.unroll(ki)
        if self.software_pipeline:
            # ko's body: A global->regs, A regs->shared, B global->regs, B regs->shared, compute
            sch.annotate(ko, "software_pipeline_stage", [0, 0, 0, 0, 1])
            sch.annotate(ko, "software_pipeline_order", [0, 3, 1, 4, 2])

        auto_inline_consumer_chain(sch, l2g)
        sch.vectorize(sch.get_loops(l2g)[-1])
        sch.decompose_reduction(main, ko)
        return sch

    def _fetch(self, sch: s_tir.Schedule, main, index: int, ko, k_major: bool, cfg: SimtConfig):
        """Operand ``index``'s tile of one K step in shared memory, loaded a float4 a thread."""
        shared, fused = stage_operand(sch, main, index, "shared", ko, k_major, preserve_unit_loops=True)
        _, f_ty, f_tx, f_vec = sch.split(fused, [None, cfg.ty, cfg.tx, cfg.vec])
        sch.vectorize(f_vec)
        sch.bind(f_ty, "threadIdx.y")
        sch.bind(f_tx, "threadIdx.x")
        # Stored transposed, [k][row]: a thread's 4 rows at one k are one aligned float4, and the
        # 16 threads of a half-warp read 16 consecutive float4 (no bank conflicts).  The row pitch
        # bm + 4 (bn + 4) keeps the transposing stores at most 2-way conflicted.
        sch.transform_layout(shared, ("write", 0), lambda s, r, c: (s, c, r))
        sch.storage_align(shared, 0, axis=1, factor=32, offset=4)
        if self.software_pipeline:
            sch.annotate(shared, "tirx.manifest_shared_memory_local_stage", 1)
        return shared
