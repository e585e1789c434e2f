"""TF32 tensor-core intrinsics (``mma.sync.m16n8k8.tf32``) for :mod:`hetero.gpu_schedule`.

TVM 0.27 ships wmma intrinsics for float16 only, and its CUDA codegen has no ``precision::tf32``
fragment; its legacy ``ptx_mma`` does take ``tf32`` operands.  These intrinsics drive it the way
TVM's own float16 ``mma`` intrinsics do: each warp holds its fragments in ``warp``-scope buffers
laid out as (lane, register) -- the register layout that PTX ISA 9.7.16.5.1 gives for
``.m16n8k8.tf32`` -- which ``LowerWarpMemory`` turns into per-thread registers.

A 16x16 output tile takes a 16x8 A fragment (rows x K), a 16x8 B fragment (columns x K, i.e.
B stored transposed, as hetero's GEMMs have it) and two ``m16n8k8`` instructions.  Fragments are
loaded with ``ldmatrix.x4.b16``: read as 32-bit elements, its four 8x8 b16 matrices are four 8x4
float matrices, each lane receiving element (lane // 4, lane % 4) of each -- the TF32 fragment
layout.  (Plain per-lane stores would also do, but ``LowerWarpMemory`` cannot place their
registers: TVM's simplifier does not prove ``(4 * lane + 129) // 128 == 1``, the index stays
dynamic and nvcc moves the fragments to local memory.  For the same reason the loop over the
two n8 halves of an mma stays rolled in TIR, where a bounded loop variable, unlike a constant,
lets the simplifier place the registers; nvcc unrolls it.)  The operands reach the tensor cores
as float32 bits, which they read as TF32 by dropping the low 13 mantissa bits; hetero rounds them
to TF32 before that, where they are computed (``gpu_schedule.round_to_tf32``).  The
accumulator uses TVM's 16x16 float32 ``mma`` layout, so TVM's fill and store intrinsics serve as
they are.
"""

from __future__ import annotations

import threading

from tvm.runtime import convert
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

lift = convert

WARP = 32
FRAGMENT_K = 8  # K of one m16n8k8 instruction
A_REGS = 4  # registers per lane of a 16x8 fragment
C_REGS = 8  # registers per lane of a 16x16 float32 accumulator (TVM's mma layout)

LOAD_A = "hetero_mma_tf32_load_a"
LOAD_B = "hetero_mma_tf32_load_b"
COMPUTE = "hetero_mma_tf32_compute"
INIT = "mma_fill_16x16_f32"  # TVM's, registered by tvm.s_tir.tensor_intrin.cuda
STORE = "mma_store_16x16_f32_shared_dyn_simple_"  # idem


def a_layout(i, k):
    """(lane, register) of element (row i, k) of a 16x8 A fragment."""
    return (i % 8) * 4 + k % 4, (k // 4) * 2 + i // 8


def b_layout(n, k):
    """(lane, register) of element (column n, k) of a 16x8 transposed-B fragment: two n8 halves
    of two registers each."""
    return (n % 8) * 4 + k % 4, (n // 8) * 2 + k // 4


def c_layout(i, j):
    """(lane, register) of element (i, j) of a 16x16 float32 accumulator: TVM's own, which its fill and
    store intrinsics (INIT, STORE) assume.  Its module is imported by the time a schedule asks
    (``gpu_schedule`` imports it once, quickly); on its own the import takes seconds."""
    from tvm.s_tir.tensor_intrin.cuda import shared_16x16_to_ldmatrix_32x8_layout  # pylint: disable=import-outside-toplevel

    return shared_16x16_to_ldmatrix_32x8_layout(i, j)


def a_row_address(lane):
    """Row and column whose 4 floats lane ``lane`` points ``ldmatrix.x4`` at, for an A fragment:
    matrix q = lane // 8 is rows 8 * (q % 2) + 0..7, columns 4 * (q // 2) + 0..3."""
    return lane % 8 + 8 * (lane // 8 % 2), 4 * (lane // 16)


def b_row_address(lane):
    """The same for a transposed-B fragment: matrix q is rows 8 * (q // 2) + 0..7 (N), columns
    4 * (q % 2) + 0..3 (K)."""
    return lane % 8 + 8 * (lane // 16), 4 * (lane // 8 % 2)


def _load_intrin(layout, row_address, scope: str):
    @T.prim_func(s_tir=True)
    def load_desc(warp_handle: T.handle, shared_handle: T.handle) -> None:
        shared = T.match_buffer(shared_handle, (16, FRAGMENT_K), "float32", align=64,
                                offset_factor=FRAGMENT_K, scope=scope)
        warp = T.match_buffer(warp_handle, (WARP, A_REGS), "float32", align=64,
                              offset_factor=FRAGMENT_K, scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:16, 0:FRAGMENT_K])
            T.writes(warp[0:WARP, 0:A_REGS])
            for ax0, ax1 in T.grid(16, FRAGMENT_K):
                with T.sblock("shared_warp"):
                    v0, v1 = T.axis.remap("SS", [ax0, ax1])
                    T.reads(shared[v0, v1])
                    lane, reg = T.meta_var(layout(v0, v1))
                    T.writes(warp[lane, reg])
                    warp[lane, reg] = shared[v0, v1]

    @T.prim_func(s_tir=True)
    def load_impl(warp_handle: T.handle, shared_handle: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        shared = T.match_buffer(shared_handle, (16, FRAGMENT_K), "float32", align=64,
                                offset_factor=FRAGMENT_K, scope=scope, strides=[s0, s1])
        warp = T.match_buffer(warp_handle, (WARP, A_REGS), "float32", align=64,
                              offset_factor=FRAGMENT_K, scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:16, 0:FRAGMENT_K])
            T.writes(warp[0:WARP, 0:A_REGS])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                row, col = T.meta_var(row_address(tx))
                T.evaluate(T.ptx_legacy.ldmatrix(
                    False, 4, ".b16", warp.data, warp.elem_offset + tx * lift(A_REGS),
                    shared.access_ptr("r"), row * s0 + col, dtype="float32"))

    return load_desc, load_impl


def _compute_intrin():
    @T.prim_func(s_tir=True)
    def mma_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, A_REGS), "float32", align=64, offset_factor=FRAGMENT_K,
                           scope="warp")
        B = T.match_buffer(b, (WARP, A_REGS), "float32", align=64, offset_factor=FRAGMENT_K,
                           scope="warp")
        C = T.match_buffer(c, (WARP, C_REGS), "float32", align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:C_REGS], A[0:WARP, 0:A_REGS], B[0:WARP, 0:A_REGS])
            T.writes(C[0:WARP, 0:C_REGS])
            for i, j, k in T.grid(16, 16, FRAGMENT_K):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    lane_c, reg_c = T.meta_var(c_layout(vi, vj))
                    lane_a, reg_a = T.meta_var(a_layout(vi, vk))
                    lane_b, reg_b = T.meta_var(b_layout(vj, vk))
                    T.reads(C[lane_c, reg_c], A[lane_a, reg_a], B[lane_b, reg_b])
                    T.writes(C[lane_c, reg_c])
                    C[lane_c, reg_c] += A[lane_a, reg_a] * B[lane_b, reg_b]

    @T.prim_func(s_tir=True)
    def mma_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, A_REGS), "float32", align=64, offset_factor=FRAGMENT_K,
                           scope="warp")
        B = T.match_buffer(b, (WARP, A_REGS), "float32", align=64, offset_factor=FRAGMENT_K,
                           scope="warp")
        C = T.match_buffer(c, (WARP, C_REGS), "float32", align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:C_REGS], A[0:WARP, 0:A_REGS], B[0:WARP, 0:A_REGS])
            T.writes(C[0:WARP, 0:C_REGS])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                for half in T.serial(2):  # rolled: see the module docstring
                    T.evaluate(T.ptx_legacy.mma(
                        "m16n8k8", "row", "col", "tf32", "tf32", "fp32",
                        A.data, A.elem_offset + tx * lift(A_REGS),
                        B.data, B.elem_offset + tx * lift(A_REGS) + half * 2,
                        C.data, C.elem_offset + tx * lift(C_REGS) + half * 4,
                        False, dtype="float32"))

    return mma_desc, mma_impl


def register() -> dict[str, str]:
    """Register the intrinsics (once) and name the group, as TVM's ``get_*_intrin_group`` do."""
    with _REGISTER_LOCK:  # engines of several GPUs compile in parallel threads
        if not _registered:
            TensorIntrin.register(LOAD_A, *_load_intrin(a_layout, a_row_address, "shared.dyn"))
            TensorIntrin.register(LOAD_B, *_load_intrin(b_layout, b_row_address, "shared.dyn"))
            TensorIntrin.register(COMPUTE, *_compute_intrin())
            _registered.append(True)
    return {"init": INIT, "load_a": LOAD_A, "load_b": LOAD_B, "compute": COMPUTE, "store": STORE}


_registered: list[bool] = []
_REGISTER_LOCK = threading.Lock()
