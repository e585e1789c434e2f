"""Tensor-core intrinsics on ``mma.sync`` for the tensor-core GEMM: TF32 (``m16n8k8``) and float16
(``m16n8k16``), both accumulating in float32.

TVM 0.27's CUDA codegen has no ``precision::tf32`` wmma fragment; its legacy ``ptx_mma`` takes
``tf32`` operands.  Its own float16 ``mma`` intrinsics unroll the two n8 halves of a 16x16 tile
with constant offsets, which leaves the fragments in local memory (below), and its float16 wmma
fragments need two warps along N (no tile for N = 32).  These intrinsics drive ``ptx_mma`` the
way TVM's do: each warp holds its fragments in ``warp``-scope buffers laid out as (lane, register)
-- the register layouts of PTX ISA 9.7.16.5.1 -- which ``LowerWarpMemory`` turns into per-thread
registers.

A 16x16 output tile takes a 16xK A fragment (rows x K), a 16xK B fragment (columns x K, i.e.
B stored transposed, as hetero's GEMMs have it) and two ``m16n8kK`` instructions.  Fragments are
loaded with ``ldmatrix.x4.b16``: each of its four 8x8 b16 matrices is an 8 x C matrix of the
operand (C = 4 floats or 8 halves: one 16-byte row), each lane receiving 32-bit word lane % 4
of row lane // 4 -- the mma fragment layout of both types.  (Plain per-lane stores
would also do, but ``LowerWarpMemory`` cannot place their registers: TVM's simplifier does not
prove ``(4 * lane + 129) // 128 == 1``, the index stays dynamic and nvcc moves the fragments to
local memory.  For the same reason the loop over the two n8 halves of an mma stays rolled in TIR,
where a bounded loop variable, unlike a constant, lets the simplifier place the registers; nvcc
unrolls it.)  TF32 operands reach the tensor cores as float32 bits, which they read as TF32 by
dropping the low 13 mantissa bits; hetero rounds them to TF32 before that, where they are
computed (:func:`.rewrites.tf32.round_to_tf32`).

The accumulator has TVM's 16x16 float32 ``mma`` layout, and its fill and store are TVM's
``mma_fill_16x16_f32`` and ``mma_store_16x16_f32_shared_dyn_simple_``, defined here again under
hetero's names: TVM's live in ``tvm.s_tir.tensor_intrin.cuda``, whose import parses a few hundred
TVMScript intrinsics (seconds on a small machine, :func:`..base.tvmscript.tensor_intrinsics`), and
this path needs none of the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.runtime import convert
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.tirx import IntImm

from ..base.tvmscript import PARSE_LOCK

lift = convert

WARP = 32
C_REGS = 8  # registers per lane of a 16x16 float32 accumulator (TVM's mma layout)
INIT = "hetero_mma_fill_16x16_f32"  # TVM's mma_fill_16x16_f32
STORE = "hetero_mma_store_16x16_f32_shared_dyn"  # TVM's mma_store_16x16_f32_shared_dyn_simple_


@dataclass(frozen=True)
class MmaType:
    """The operand type of an ``mma.sync``: its TVM and PTX names and its bytes."""

    dtype: str
    ptx: str
    bytes: int

    @property
    def per_register(self) -> int:
        """Elements in one 32-bit register."""
        return 4 // self.bytes

    @property
    def columns(self) -> int:
        """K elements in one 16-byte row of an ``ldmatrix`` 8x8 b16 matrix."""
        return 4 * self.per_register

    @property
    def k(self) -> int:
        """K of one instruction (and one fragment): two ``ldmatrix`` matrices wide."""
        return 2 * self.columns

    @property
    def regs(self) -> int:
        """Elements per lane of a 16 x K operand fragment."""
        return 16 * self.k // WARP

    def a_layout(self, i, k):
        """(lane, element) of element (row i, k) of a 16 x K A fragment."""
        return (4 * (i % 8) + k % self.columns // self.per_register,
                (k // self.columns * 2 + i // 8) * self.per_register + k % self.per_register)

    def b_layout(self, n, k):
        """(lane, element) of element (column n, k) of a 16 x K transposed-B fragment: two n8
        halves of K elements (two registers of ``mma``'s B operand) each."""
        return (4 * (n % 8) + k % self.columns // self.per_register,
                (n // 8 * 2 + k // self.columns) * self.per_register + k % self.per_register)

    def a_row_address(self, lane):
        """Row and column whose 16 bytes lane ``lane`` points ``ldmatrix.x4`` at, for an A fragment:
        matrix q = lane // 8 is rows 8 * (q % 2) + 0..7, columns C * (q // 2) + 0..C-1."""
        return lane % 8 + 8 * (lane // 8 % 2), self.columns * (lane // 16)

    def b_row_address(self, lane):
        """The same for a transposed-B fragment: matrix q is rows 8 * (q // 2) + 0..7 (N), columns
        C * (q % 2) + 0..C-1 (K)."""
        return lane % 8 + 8 * (lane // 16), self.columns * (lane // 8 % 2)

    def names(self) -> dict[str, str]:
        """The intrinsic group, named as TVM's ``get_*_intrin_group`` name theirs."""
        return {"init": INIT, "load_a": f"hetero_mma_{self.ptx}_load_a", "load_b": f"hetero_mma_{self.ptx}_load_b",
                "compute": f"hetero_mma_{self.ptx}_compute", "store": STORE}


TF32 = MmaType("float32", "tf32", 4)
FLOAT16 = MmaType("float16", "fp16", 2)


def c_layout(i, j):
    """(lane, register) of element (i, j) of a 16x16 float32 accumulator: TVM's
    ``shared_16x16_to_ldmatrix_32x8_layout``, which TVM's fill and store intrinsics (INIT, STORE)
    assume."""
    return 4 * (i % 8) + (j % 8) // 2, 4 * (j // 8) + (i // 8) * 2 + (j % 2)


def c_element(lane, register):
    """Row and column of a 16x16 accumulator that ``register`` of ``lane`` holds: the inverse of
    :func:`c_layout` (TVM's ``ldmatrix_32x8_to_shared_16x16_layout``)."""
    return 8 * (register % 4 // 2) + (lane // 4), 8 * (register // 4) + (lane % 4) * 2 + (register % 2)


def _load_intrin(mma: MmaType, layout, row_address):
    k, regs, dtype = mma.k, mma.regs, mma.dtype

    @T.prim_func(s_tir=True)
    def load_desc(warp_handle: T.handle, shared_handle: T.handle) -> None:
        shared = T.match_buffer(shared_handle, (16, k), dtype, align=64, offset_factor=k,
                                scope="shared.dyn")
        warp = T.match_buffer(warp_handle, (WARP, regs), dtype, align=64, offset_factor=k, scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:16, 0:k])
            T.writes(warp[0:WARP, 0:regs])
            for ax0, ax1 in T.grid(16, k):
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
        shared = T.match_buffer(shared_handle, (16, k), dtype, align=64, offset_factor=k,
                                scope="shared.dyn", strides=[s0, s1])
        warp = T.match_buffer(warp_handle, (WARP, regs), dtype, align=64, offset_factor=k, scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:16, 0:k])
            T.writes(warp[0:WARP, 0:regs])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                row, col = T.meta_var(row_address(tx))
                T.evaluate(T.ptx_legacy.ldmatrix(
                    False, 4, ".b16", warp.data, warp.elem_offset + tx * lift(regs),
                    shared.access_ptr("r"), row * s0 + col, dtype=dtype))

    return load_desc, load_impl


def _compute_intrin(mma: MmaType):
    k, regs, dtype = mma.k, mma.regs, mma.dtype

    def widened(value):
        return value if dtype == "float32" else T.Cast("float32", value)

    @T.prim_func(s_tir=True)
    def mma_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, regs), dtype, align=64, offset_factor=k, scope="warp")
        B = T.match_buffer(b, (WARP, regs), dtype, align=64, offset_factor=k, scope="warp")
        C = T.match_buffer(c, (WARP, C_REGS), "float32", align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:C_REGS], A[0:WARP, 0:regs], B[0:WARP, 0:regs])
            T.writes(C[0:WARP, 0:C_REGS])
            for i, j, kk in T.grid(16, 16, k):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, kk])
                    lane_c, reg_c = T.meta_var(c_layout(vi, vj))
                    lane_a, reg_a = T.meta_var(mma.a_layout(vi, vk))
                    lane_b, reg_b = T.meta_var(mma.b_layout(vj, vk))
                    T.reads(C[lane_c, reg_c], A[lane_a, reg_a], B[lane_b, reg_b])
                    T.writes(C[lane_c, reg_c])
                    C[lane_c, reg_c] += widened(A[lane_a, reg_a]) * widened(B[lane_b, reg_b])

    @T.prim_func(s_tir=True)
    def mma_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, regs), dtype, align=64, offset_factor=k, scope="warp")
        B = T.match_buffer(b, (WARP, regs), dtype, align=64, offset_factor=k, scope="warp")
        C = T.match_buffer(c, (WARP, C_REGS), "float32", align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:C_REGS], A[0:WARP, 0:regs], B[0:WARP, 0:regs])
            T.writes(C[0:WARP, 0:C_REGS])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                for half in T.serial(2):  # rolled: see the module docstring
                    T.evaluate(T.ptx_legacy.mma(
                        f"m16n8k{k}", "row", "col", mma.ptx, mma.ptx, "fp32",
                        A.data, A.elem_offset + tx * lift(regs),
                        B.data, B.elem_offset + tx * lift(regs) + half * (regs // 2),
                        C.data, C.elem_offset + tx * lift(C_REGS) + half * 4,
                        False, dtype="float32"))

    return mma_desc, mma_impl


def _fill_intrin():
    """TVM's ``get_mma_fill_intrin("float32", 8)``, statement for statement: the tensorized kernel
    holds its implementation's names (``C_warp``, ``tx``), which the generated code keeps."""
    zero = IntImm("int32", 0).astype("float32")

    @T.prim_func(s_tir=True)
    def mma_fill_desc(a: T.handle) -> None:
        C_warp = T.match_buffer(a, [WARP, C_REGS], dtype="float32", scope="warp")

        with T.sblock("root"):
            T.reads()
            T.writes(C_warp[0:WARP, 0:C_REGS])
            for i0, i1 in T.grid(16, 16):
                with T.sblock("C_warp"):
                    i, j = T.axis.remap("SS", [i0, i1])
                    thread_id, local_id = T.meta_var(c_layout(i, j))
                    T.reads()
                    T.writes(C_warp[thread_id, local_id])
                    C_warp[thread_id, local_id] = zero

    @T.prim_func(s_tir=True)
    def mma_fill_impl(a: T.handle) -> None:
        C_warp = T.match_buffer(a, [WARP, C_REGS], dtype="float32", scope="warp", offset_factor=1)

        with T.sblock("root"):
            T.reads()
            T.writes(C_warp[0:WARP, 0:C_REGS])

            for tx in T.thread_binding(0, WARP, "threadIdx.x"):  # noqa: B007 -- binds the warp's lanes
                T.evaluate(T.cuda.mma_fill_legacy(C_REGS, C_warp.data, C_warp.elem_offset, dtype="float32"))

    return mma_fill_desc, mma_fill_impl


def _store_intrin():
    """TVM's ``get_mma_store_intrin("float32", 8, "shared.dyn", False)``, statement for statement:
    each lane stores its 8 registers to their places in a 16x16 shared tile."""

    @T.prim_func(s_tir=True)
    def mma_store_desc(a: T.handle, c: T.handle) -> None:
        C_warp = T.match_buffer(a, [WARP, C_REGS], dtype="float32", scope="warp")
        C = T.match_buffer(c, [16, 16], dtype="float32", scope="shared.dyn")

        with T.sblock("root"):
            T.reads(C_warp[0:WARP, 0:C_REGS])
            T.writes(C[0:16, 0:16])
            for i0, i1 in T.grid(16, 16):
                with T.sblock("C_warp"):
                    v0, v1 = T.axis.remap("SS", [i0, i1])
                    thread_id, local_id = T.meta_var(c_layout(v0, v1))
                    T.reads(C_warp[thread_id, local_id])
                    T.writes(C[v0, v1])
                    C[v0, v1] = C_warp[thread_id, local_id]

    @T.prim_func(s_tir=True)
    def mma_store_impl(a: T.handle, c: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()

        C_warp = T.match_buffer(a, [WARP, C_REGS], dtype="float32", scope="warp", offset_factor=1)
        C = T.match_buffer(c, [16, 16], dtype="float32", scope="shared.dyn", offset_factor=1, strides=[s0, s1])

        with T.sblock("root"):
            T.reads(C_warp[0:WARP, 0:C_REGS])
            T.writes(C[0:16, 0:16])

            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                for local_id in T.serial(C_REGS):
                    row, col = T.meta_var(c_element(tx, local_id))
                    C[row, col] = C_warp[tx, local_id]

    return mma_store_desc, mma_store_impl


def register(mma: MmaType) -> dict[str, str]:
    """Register ``mma``'s intrinsics and the accumulator's (each once) and name the group."""
    names = mma.names()
    with PARSE_LOCK:  # engines of several GPUs compile in parallel threads, and kernels schedule in threads
        if not _registered:
            TensorIntrin.register(INIT, *_fill_intrin())
            TensorIntrin.register(STORE, *_store_intrin())
        if mma not in _registered:
            TensorIntrin.register(names["load_a"], *_load_intrin(mma, mma.a_layout, mma.a_row_address))
            TensorIntrin.register(names["load_b"], *_load_intrin(mma, mma.b_layout, mma.b_row_address))
            TensorIntrin.register(names["compute"], *_compute_intrin(mma))
            _registered.add(mma)
    return names


_registered: set[MmaType] = set()
