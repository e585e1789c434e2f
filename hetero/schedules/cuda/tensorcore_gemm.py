"""The tensor-core GEMM: convs and matmuls with float16 operands, or float32 operands read as TF32."""

from __future__ import annotations

from dataclasses import dataclass, replace

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain, auto_inline_producers

from ..base.analysis import static
from ..base.rule import Rule
from ..base.tvmscript import tensor_intrinsics
from .gemm import gemm_block, in_dtypes, k_contiguous, normalize_gemm, stage_operand
from .lowering import MMA_PIPELINE, WMMA_PIPELINE, generate_code
from .mma import FLOAT16, TF32, MmaType, c_layout, register
from .tiles import DEFAULT_NUM_SMS, TensorCoreConfig, Trace, pick_tensorcore_config


@dataclass(frozen=True)
class TensorCoreKind:
    """What differs between the tensor-core GEMMs: ``mma.sync`` on fragments held in registers
    (TF32, and float16 from sm_80 on) or TVM's wmma fragments (float16 on sm_70 and sm_75)."""

    operand_dtype: str
    fragment_k: int  # K of one fragment
    k_steps: int  # fragments along K per shared-memory stage: 32 K elements in all kinds
    vector: tuple[int, int]  # global -> shared vector width: K-contiguous, transposing fetch
    align: tuple[int, int]  # shared row pitch = offset mod factor (conflict-free fragment reads)
    mma: MmaType | None  # None: wmma

    @property
    def scopes(self) -> tuple[str, str, str]:
        """Where the A, B and accumulator fragments live."""
        return ("warp",) * 3 if self.mma else ("wmma.matrix_a", "wmma.matrix_b", "wmma.accumulator")

    @property
    def tir_pipeline(self) -> str:
        """The TIR lowering its kernels need (:mod:`.lowering`)."""
        return MMA_PIPELINE if self.mma else WMMA_PIPELINE


# float16: 8 x float16 = 16 bytes per load; a transposing (row-contiguous) fetch stores the vector
# element by element, which CUDA codegen only supports up to 4 lanes of float16
MMA_F16 = TensorCoreKind("float16", FLOAT16.k, 2, vector=(8, 4), align=(16, 8), mma=FLOAT16)
WMMA_F16 = replace(MMA_F16, mma=None)
MMA_TF32 = TensorCoreKind("float32", TF32.k, 4, vector=(4, 4), align=(16, 4), mma=TF32)


def sm_version(target: tvm.target.Target) -> int:
    """``target``'s compute capability as a number (sm_90a: 90), 0 if it names none."""
    arch = str(target.attrs.get("arch", ""))
    digits = arch.replace("sm_", "").rstrip("a")
    return int(digits) if digits.isdigit() else 0


def tensor_core_kind(target: tvm.target.Target, precision: str) -> TensorCoreKind | None:
    """The tensor-core GEMM ``target`` runs in ``precision``: TF32 and float16 on ``mma.sync`` from
    sm_80 on, float16 on wmma on sm_70 and sm_75; None for fp32 and GPUs without them."""
    if target.kind.name != "cuda" or precision == "fp32":
        return None
    sm = sm_version(target)
    if precision == "tf32":
        return MMA_TF32 if sm >= 80 else None
    return MMA_F16 if sm >= 80 else WMMA_F16 if sm >= 70 else None


def tensor_core_intrinsics(fragment: MmaType | None) -> dict[str, str]:
    """The intrinsic group of a GEMM on ``fragment`` (:mod:`.mma`), registered once; for ``None``
    TVM's f16 x f16 -> f32 wmma intrinsics (B transposed, shared.dyn)."""
    if fragment is not None:
        return register(fragment)
    # only float16 on sm_70 and sm_75 needs TVM's module of intrinsics (seconds to import, once)
    return tensor_intrinsics().cuda.get_wmma_intrin_group(load_scope="shared.dyn", store_scope="shared.dyn",
                                                          in_dtype="float16", out_dtype="float32", trans_b=True)


# Shared-memory tiles in a cp.async ring: one computed while the next loads.  Three (TVM's
# MultiLevelTilingTensorCore ring) took 121 KB for a 128x128 tf32 tile, one block per SM; with two,
# resnet-50 ran 13% faster in tf32 on an H200 (benchmarks/HISTORY.md, "A cp.async ring of two tiles").
ASYNC_STAGES = 2


def copies_async(k_major: list[bool], k_extent, bk: int, vector: int) -> bool:
    """Whether a tensor-core GEMM fills its shared tiles with ``cp.async`` (see benchmarks/HISTORY.md,
    "K tiles of 32 and cp.async tile loads").  Not when an operand is fetched transposed (TVM's
    InjectPTXAsyncCopy then copies a strided vector as if it were contiguous: vgg-16's dense
    layers faulted with a misaligned address), not when K is not a whole number of vectors (the copies would shrink
    to 4 bytes), and not for K loops shorter than the ring: with one stage, vgg-16's first conv
    (K=27) took 5.7 ms instead of 0.5 and mobilenet ran 3.7x slower in tf32 on an H100."""
    k = static(k_extent)
    return all(k_major) and k is not None and k % vector == 0 and k // bk >= ASYNC_STAGES


@dataclass(frozen=True)
class _Loops:
    """The loops of a tiled GEMM block that later steps schedule at."""

    k0: object  # shared-memory stages
    k1: object  # fragment K steps within a stage
    i2: object  # a warp's fragments along I
    j2: object  # and along J
    warp: object  # the block's warps (threadIdx.y)
    i_inner: object  # the 16 rows of one fragment: what a tensor-core instruction computes


class TensorCoreGemm(Rule):
    """A GEMM-like PrimFunc on tensor cores (``kind``: ``mma.sync`` on float16 or TF32 fragments, or
    wmma on float16 ones), float32 accumulation.

    The structure is dlight's ``MatmulTensorization`` (register-staged double-buffered shared
    tiles, software pipeline, fragment loads, staged epilogue), with a tile chosen per kernel
    (:func:`.tiles.pick_tensorcore_config`, for ``num_sms`` SMs) and its primitives reordered so
    that it also works for convs whose M is ``n*H*W``: dlight's order (blockize first) leaves TVM
    unable to prove that the padded tile covers the un-padded rows.  With ``async_copy``, GEMMs
    that qualify (see :func:`copies_async`) fill the shared tiles with ``cp.async`` instead, in a
    ring of ASYNC_STAGES.  With ``verify``, a schedule is only used when its kernel generates code
    on its own (~0.1 s a kernel): TVM 0.27 fails to lower some tile/shape combinations, and one
    kernel that fails would fail the whole build.
    """

    name = "tensorcore-gemm"

    def __init__(self, kind: TensorCoreKind = MMA_F16, num_sms: int = DEFAULT_NUM_SMS, async_copy: bool = True,
                 verify: bool = True, trace: Trace | None = None):
        self.kind = kind
        self.num_sms = num_sms
        self.async_copy = async_copy
        self.verify = verify
        self.trace = trace

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        sch = self._schedule(func)
        if sch is not None and self.verify:
            generate_code(sch.mod["main"], target, self.kind.tir_pipeline)
        return sch

    def _pick(self, extents) -> TensorCoreConfig | None:
        cfg = pick_tensorcore_config(extents, self.num_sms, k_steps=self.kind.k_steps,
                                     single_warp_columns=self.kind.mma is not None)
        if self.trace is not None:
            self.trace(self.name, cfg, extents)
        return cfg

    def _schedule(self, func: tirx.PrimFunc) -> s_tir.Schedule | None:
        kind = self.kind
        sch = s_tir.Schedule(func)
        main = gemm_block(sch)
        if main is None:
            return None
        block = sch.get(main)
        if in_dtypes(block) != (kind.operand_dtype, kind.operand_dtype, "float32"):
            return None
        k_major = [k_contiguous(block, 0), k_contiguous(block, 1)]
        normalize_gemm(sch, main)
        extents = [sch.get(lp).extent for lp in sch.get_loops(main)]
        cfg = self._pick(extents)
        if cfg is None:
            return None
        n_static = static(extents[2])
        if n_static is None or n_static % cfg.bn:
            return None  # padding N breaks the vectorized epilogue's codegen: CUDA cores take it
        bk = kind.fragment_k * cfg.tk
        async_copy = self.async_copy and copies_async(k_major, extents[3], bk, kind.vector[0])

        loops = _tile(sch, main, cfg, kind.fragment_k, bk)
        _stage_tiles(sch, main, loops.k0, k_major, kind, cfg.wi * cfg.wj, async_copy)
        a_mat, b_mat = _operand_fragments(sch, main, kind, loops.k1)
        store, acc_s2g, store_tiles = _accumulator(sch, main, kind, loops.warp)
        block_outer = sch.blockize(loops.i_inner)
        init = sch.decompose_reduction(block_outer, loops.k0)
        init_loops = _tensorize(sch, main, kind, a_mat, b_mat, store, sch.get_child_blocks(init)[0])
        if kind.mma:
            # fragments are plain register arrays here: a loop over them that nvcc leaves rolled
            # indexes them at run time, which moves them to (slow, local) memory
            for loop in (loops.i2, loops.j2, *store_tiles, *init_loops[-4:-2]):
                sch.unroll(loop)
        _pipeline(sch, loops, async_copy)
        fused = sch.fuse(*sch.get_loops(acc_s2g)[-2:])
        _, f_tx, f_vec = sch.split(fused, [None, 32, 4])
        sch.bind(f_tx, "threadIdx.x")
        sch.vectorize(f_vec)
        return sch


def _tile(sch: s_tir.Schedule, main, cfg: TensorCoreConfig, frag_k: int, bk: int) -> _Loops:
    """Pad the GEMM to whole tiles and split it: blocks, warps, fragments, 16x16xK instructions."""
    sch.pad_einsum(main, [1, cfg.bm, cfg.bn, bk])
    batch, i, j, k = sch.get_loops(main)
    i, i_inner = sch.split(i, [None, 16])
    j, j_inner = sch.split(j, [None, 16])
    k, k_inner = sch.split(k, [None, frag_k])
    i0, i1, i2 = sch.split(i, [None, cfg.wi, cfg.ti])
    j0, j1, j2 = sch.split(j, [None, cfg.wj, cfg.tj])
    k0, k1 = sch.split(k, [None, cfg.tk])
    sch.reorder(i0, j0, i1, j1, k0, k1, i2, j2, i_inner, j_inner, k_inner)
    sch.bind(batch, "blockIdx.z")
    sch.bind(i0, "blockIdx.x")
    sch.bind(j0, "blockIdx.y")
    warp = sch.fuse(i1, j1)
    sch.bind(warp, "threadIdx.y")
    return _Loops(k0, k1, i2, j2, warp, i_inner)


def _stage_tiles(sch: s_tir.Schedule, main, k0, k_major: list[bool], kind: TensorCoreKind, num_warps: int,
                 async_copy: bool) -> None:
    """A and B tiles of each stage in shared memory: copied by ``cp.async`` into a ring, or through
    registers into a double buffer."""
    staged = []
    for index in (0, 1):
        shared, fused = stage_operand(sch, main, index, "shared.dyn", k0, k_major[index])
        vec = kind.vector[0] if k_major[index] else kind.vector[1]
        _, f_ty, f_tx, f_vec = sch.split(fused, [None, num_warps, 32, vec])
        sch.bind(f_tx, "threadIdx.x")
        sch.bind(f_ty, "threadIdx.y")
        sch.vectorize(f_vec)
        sch.storage_align(shared, 0, axis=-2, factor=kind.align[0], offset=kind.align[1])
        if not async_copy:
            sch.annotate(shared, "tirx.manifest_shared_memory_local_stage", 1)
            sch.annotate(shared, "double_buffer_scope", 0)
        staged.append(shared)
    for shared in staged:
        auto_inline_producers(sch, shared)


def _operand_fragments(sch: s_tir.Schedule, main, kind: TensorCoreKind, k1):
    """The A and B fragments of each fragment K step."""
    a_scope, b_scope, _ = kind.scopes
    a_mat = sch.cache_read(main, 0, a_scope)
    b_mat = sch.cache_read(main, 1, b_scope)
    sch.compute_at(a_mat, k1)
    sch.compute_at(b_mat, k1)
    return a_mat, b_mat


def _accumulator(sch: s_tir.Schedule, main, kind: TensorCoreKind, warp):
    """The accumulator fragments, stored per warp to a shared tile that the epilogue reads: the
    fragment store block, the shared tile's block, and the store's loops over 16x16 fragments."""
    acc_s2g = sch.cache_write(main, 0, "shared.dyn")
    sch.storage_align(acc_s2g, 0, -2, 16, 4)
    store = sch.cache_write(main, 0, kind.scopes[2])
    sch.reverse_compute_at(store, warp)
    sch.reverse_compute_at(acc_s2g, warp)
    si, sj = sch.get_loops(store)[-2:]
    si0, si1 = sch.split(si, [None, 16])
    sj0, sj1 = sch.split(sj, [None, 16])
    sch.reorder(si0, sj0, si1, sj1)
    # The epilogue goes in before blockize: after it, every primitive on this scope fails
    # ("not a stage pipeline") because the un-padding consumer's region cover is lost.
    auto_inline_consumer_chain(sch, acc_s2g)
    return store, acc_s2g, (si0, sj0)


def _tensorize(sch: s_tir.Schedule, main, kind: TensorCoreKind, a_mat, b_mat, store, init) -> list:
    """Fragment loads, fill (of the accumulator by block ``init``), multiply-accumulate and store as
    the kind's intrinsics; the fill's loops."""
    intrin = tensor_core_intrinsics(kind.mma)
    frag_k = kind.fragment_k
    if kind.mma:  # fragments held as (lane, register) in warp-scope buffers
        sch.transform_layout(a_mat, ("write", 0), lambda s, r, c: (s, r // 16, c // frag_k,
                                                                   *kind.mma.a_layout(r % 16, c % frag_k)))
        sch.transform_layout(b_mat, ("write", 0), lambda s, r, c: (s, r // 16, c // frag_k,
                                                                   *kind.mma.b_layout(r % 16, c % frag_k)))
        sch.transform_layout(store, ("read", 0), lambda s, r, c: (s, r // 16, c // 16,
                                                                  *c_layout(r % 16, c % 16)))
    for mat, name in ((a_mat, "load_a"), (b_mat, "load_b")):
        li, lj = sch.get_loops(mat)[-2:]
        li0, li1 = sch.split(li, [None, 16])
        lj0, lj1 = sch.split(lj, [None, frag_k])
        sch.reorder(li0, lj0, li1, lj1)
        sch.unroll(li0)
        sch.unroll(lj0)
        sch.tensorize(li1, intrin[name])
    init_loops = sch.get_loops(init)
    sch.tensorize(init_loops[-2], intrin["init"])
    sch.tensorize(sch.get_loops(store)[-2], intrin["store"])
    sch.tensorize(sch.get_loops(main)[-3], intrin["compute"])
    return init_loops


def _pipeline(sch: s_tir.Schedule, loops: _Loops, async_copy: bool) -> None:
    """Software pipelines over the stages (k0) and, within one, over the fragment K steps (k1)."""
    if async_copy:
        sch.annotate(loops.k0, "software_pipeline_async_stages", [0])
        # A and B tile copies in stage 0, all fragment loads and MMAs (the k1 pipeline) in stage 1
        sch.annotate(loops.k0, "software_pipeline_stage", [0, 0, 1, 1, 1])
        sch.annotate(loops.k0, "software_pipeline_order", [0, 1, 2, 3, 4])
    else:
        sch.annotate(loops.k0, "software_pipeline_order", [0, 3, 1, 4, 5, 2, 6])
        sch.annotate(loops.k0, "software_pipeline_stage", [0, 0, 0, 0, 0, 1, 1])
    sch.annotate(loops.k1, "software_pipeline_order", [0, 1, 2])
    sch.annotate(loops.k1, "software_pipeline_stage", [0, 0, 1])
