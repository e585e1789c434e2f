"""The wgmma conv kernel: one TVMScript (tirx) kernel per conv, written out rather than scheduled."""

from __future__ import annotations

from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import tirx
from tvm.script import tirx as T

from ...base.tvmscript import PARSE_LOCK
from .match import ConvGemm
from .operands import MMA_TYPES, OPERAND_BYTES, ROW_BYTES, STAGES
from .target import KERNEL_ATTR

WGMMA_K_BYTES = 32  # the K of one wgmma instruction (k8 in TF32, k16 in float16)
BM = 128  # rows of a block tile: two warpgroups of 64
THREADS = 256
SWIZZLE_128B = 3  # encode_matrix_descriptor's code for the 128-byte swizzle
LBO = 1  # leading byte offset, unused by swizzled K-major operands
SBO = 1024 >> 4  # stride byte offset, 16-byte units: 8 rows of 128 bytes
MAX_SHARED_BYTES = 227 * 1024


@dataclass(frozen=True)
class Tile:
    """A wgmma kernel's block tile, described as hetero's other GEMM tiles are."""

    bm: int
    bn: int
    bk: int  # K elements per stage


def pick_block_n(channels: int, rows: int, num_sms: int) -> int | None:
    """The widest wgmma N (256, 128, 64) dividing ``channels`` (the GEMM's N) whose 128-row tiles
    still give every one of ``num_sms`` SMs a block over ``rows`` (M); None if none does, and
    ``mma.sync``'s smaller tiles, picked by their waves, take the conv (densenet-121 ran 2% slower
    on an H100 with its 7x7 and 14x14 1x1 convs in 25 and 98 blocks of 128x128)."""
    return next((n for n in (256, 128, 64) if channels % n == 0 and -(-rows // BM) * (channels // n) >= num_sms),
                None)


def conv_kernel(func: tirx.PrimFunc, conv: ConvGemm, bn: int) -> tirx.PrimFunc:
    """``func`` (the fused PrimFunc ``conv`` was read from) computed by the wgmma kernel in tiles of
    128 x ``bn``: same parameters, marked scheduled and as needing TVM's tirx lowering (``KERNEL_ATTR``)."""
    with PARSE_LOCK:
        kernel = _kernel(conv, bn)
    # the same parameters, declared anew: tirx lowers buffers that carry a layout, as its own do
    params = [tirx.decl_buffer(p.shape, p.dtype, name=p.name) for p in func.params]
    renamed = list(zip(func.params, params))
    for own, original in zip(kernel.params, (conv.data, conv.weight, conv.out)):
        renamed.append((own, next(new for old, new in renamed if old.same_as(original))))

    def rename(var):
        return next((new for old, new in renamed if var.same_as(old)), var)

    body = tvm_ffi.structural_map(kernel.body, [(tirx.Var, rename)])
    attrs = {**dict(func.attrs or {}), "tirx.is_scheduled": True, KERNEL_ATTR: True}
    attrs.pop("s_tir", None)  # a tirx kernel, not an s_tir schedule
    return tirx.PrimFunc(params, body, attrs=tvm.ir.make_node("ir.DictAttrs", **attrs))


@dataclass(frozen=True)
class _Geometry:
    """The numbers the kernel of a conv is written with, for block tiles of BM x ``bn``."""

    batch: tirx.Var
    height: int
    width: int
    in_channels: int
    channels: int
    taps_y: int
    taps_x: int
    out_h: int
    out_w: int
    stride_y: int
    stride_x: int
    pad_y: int
    pad_x: int
    dil_y: int
    dil_x: int
    dtype: str
    bn: int

    @classmethod
    def of(cls, conv: ConvGemm, bn: int) -> _Geometry:
        height, width, in_channels = (int(d) for d in conv.data.shape[1:])
        channels, taps_y, taps_x, _ = (int(d) for d in conv.weight.shape)
        out_h, out_w = (int(d) for d in conv.out.shape[1:3])
        return cls(conv.data.shape[0], height, width, in_channels, channels, taps_y, taps_x, out_h, out_w,
                   *conv.stride, *conv.pad, *conv.dilation, str(conv.data.dtype), bn)

    @property
    def bytes(self) -> int:
        return OPERAND_BYTES[self.dtype]

    @property
    def row_k(self) -> int:
        """K elements in one 128-byte row of a shared tile: the K of a stage."""
        return ROW_BYTES // self.bytes

    @property
    def chunk(self) -> int:
        """Elements in one 16-byte cp.async."""
        return 16 // self.bytes

    @property
    def k_tiles(self) -> int:
        return self.taps_y * self.taps_x * self.in_channels // self.row_k

    @property
    def pixels(self) -> int:
        """Output pixels per image."""
        return self.out_h * self.out_w

    @property
    def rows(self) -> tirx.PrimExpr:
        """The GEMM's M: output pixels of the batch."""
        return self.batch * self.pixels

    @property
    def grid_n(self) -> int:
        """Block tiles along N."""
        return self.channels // self.bn

    @property
    def acc_regs(self) -> int:
        """Accumulator registers per thread (wgmma m64nNk8: N / 2)."""
        return self.bn // 2

    @property
    def a_tile(self) -> int:
        """Elements of A per stage."""
        return BM * self.row_k

    @property
    def stage(self) -> int:
        """Elements of A and B per stage."""
        return self.a_tile + self.bn * self.row_k

    @property
    def shared(self) -> int:
        """Elements of shared memory: the ring, and 1 KiB so that it can start 1024-byte aligned."""
        return STAGES * self.stage + 1024 // self.bytes

    @property
    def a_copies(self) -> int:
        """16-byte copies of A per thread and stage."""
        return self.a_tile // self.chunk // THREADS

    @property
    def b_copies(self) -> int:
        """16-byte copies of B per thread and stage."""
        return self.bn * self.row_k // self.chunk // THREADS

    @property
    def mma(self) -> str:
        """The wgmma instruction."""
        return f"wgmma.mma_async.sync.aligned.m64n{self.bn}{MMA_TYPES[self.dtype][0]}"

    @property
    def trailing(self) -> tuple:
        """The instruction's operands after the scales."""
        return MMA_TYPES[self.dtype][1]

    @property
    def element_shift(self) -> int:
        """log2 of the element size: bytes to elements."""
        return self.bytes.bit_length() - 1


def _kernel(conv: ConvGemm, bn: int) -> tirx.PrimFunc:
    """The wgmma kernel of ``conv`` on parameters of its own: data, weight, out."""
    g = _Geometry.of(conv, bn)
    if g.shared * g.bytes > MAX_SHARED_BYTES:
        raise ValueError(f"{g.shared * g.bytes} bytes of shared memory")
    epilogue = conv.epilogue

    # fmt: off
    @T.prim_func(check_well_formed=False)
    def kernel(data: T.Buffer((g.batch, g.height, g.width, g.in_channels), g.dtype),
               weight: T.Buffer((g.channels, g.taps_y, g.taps_x, g.in_channels), g.dtype),
               out: T.Buffer((g.batch, g.out_h, g.out_w, g.channels), str(conv.out.dtype))):
        T.device_entry()
        bx = T.cta_id([T.ceildiv(g.rows, BM) * g.grid_n])
        tx = T.thread_id([THREADS])
        smem = T.alloc_buffer((g.shared,), g.dtype, scope="shared.dyn", align=1024)
        acc = T.alloc_local((g.acc_regs,), "float32")
        row_image = T.alloc_local((g.a_copies,), "int32")  # per A row this thread loads: image offset,
        row_y = T.alloc_local((g.a_copies,), "int32")  # top input row and left input column of its
        row_x = T.alloc_local((g.a_copies,), "int32")  # window (rows past the end: far outside)
        desc_a: T.uint64  # TVMScript declares the descriptors here
        desc_b: T.uint64
        bm = bx // g.grid_n  # consecutive blocks share their A rows
        bn_at = bx % g.grid_n
        wg = tx // 128
        pad = T.meta_var(T.Cast("int32", ((T.uint32(1024) - (T.cuda.cvta_generic_to_shared(smem.data) & T.uint32(1023))) & T.uint32(1023)) >> T.uint32(g.element_shift)))

        for i in T.unroll(g.a_copies):
            m = T.meta_var(bm * BM + (i * THREADS + tx) // 8)
            pixel = T.meta_var(m % g.pixels)
            row_image[i] = m // g.pixels * (g.height * g.width * g.in_channels)
            row_y[i] = T.if_then_else(m < g.rows, pixel // g.out_w * g.stride_y - g.pad_y, -(1 << 20))
            row_x[i] = pixel % g.out_w * g.stride_x - g.pad_x

        @T.inline
        def load_tile(kt, s):
            tap = T.meta_var(kt * g.row_k // g.in_channels)
            ky = T.meta_var(tap // g.taps_x * g.dil_y)
            kx = T.meta_var(tap % g.taps_x * g.dil_x)
            channel = T.meta_var(kt * g.row_k % g.in_channels + tx % 8 * g.chunk)
            for i in T.unroll(g.a_copies):
                row = T.meta_var((i * THREADS + tx) // 8)
                y = T.meta_var(row_y[i] + ky)
                x = T.meta_var(row_x[i] + kx)
                inside = T.meta_var(0 <= y and y < g.height and 0 <= x and x < g.width)  # noqa: PLR1716 -- TVMScript
                T.ptx.cp.async_.cg.shared.global_(
                    smem.ptr_to([pad + s * g.stage + row * g.row_k + T.bitwise_xor(tx % 8, row % 8) * g.chunk]),
                    data.ptr_to([0, 0, 0, T.if_then_else(inside, row_image[i] + (y * g.width + x) * g.in_channels + channel, 0)]),
                    16, T.if_then_else(inside, T.uint32(16), T.uint32(0)))
            for i in T.unroll(g.b_copies):
                row = T.meta_var((i * THREADS + tx) // 8)
                T.ptx.cp.async_.cg.shared.global_(
                    smem.ptr_to([pad + s * g.stage + g.a_tile + row * g.row_k + T.bitwise_xor(tx % 8, row % 8) * g.chunk]),
                    weight.ptr_to([0, 0, 0, (bn_at * g.bn + row) * (g.taps_y * g.taps_x * g.in_channels) + kt * g.row_k + tx % 8 * g.chunk]), 16)

        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_a), smem.ptr_to([pad + wg * (64 * g.row_k)]), LBO, SBO, SWIZZLE_128B)  # noqa: F821 -- declared above, in TVMScript
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_b), smem.ptr_to([pad + g.a_tile]), LBO, SBO, SWIZZLE_128B)  # noqa: F821
        for i in T.serial(g.acc_regs):
            acc[i] = T.float32(0)
        for p in T.unroll(STAGES - 2):
            load_tile(p, p)
            T.ptx.cp.async_.commit_group()
        # At the top of iteration kt the copies of tiles up to kt + STAGES - 3 are committed and this
        # warpgroup's wgmma groups up to tile kt - 2 are complete.
        for kt in T.serial(g.k_tiles):
            T.ptx.cp.async_.wait_group(STAGES - 3)
            T.ptx.fence.proxy.async_.shared__cta()  # cp.async writes through the generic proxy, wgmma reads through the async one
            T.cuda.cta_sync()  # tile kt is in place, and stage (kt - 2) % STAGES is free again
            s = T.meta_var(kt % STAGES)
            T.ptx.wgmma.fence.sync.aligned()
            for kk in T.unroll(ROW_BYTES // WGMMA_K_BYTES):
                T.ptx[g.mma](
                    *[acc[i] for i in range(g.acc_regs)],
                    desc_a + T.Cast("uint64", (s * g.stage * g.bytes + kk * WGMMA_K_BYTES) >> 4),  # noqa: F821
                    desc_b + T.Cast("uint64", (s * g.stage * g.bytes + kk * WGMMA_K_BYTES) >> 4),  # noqa: F821
                    True, 1, 1, *g.trailing)
            T.ptx.wgmma.commit_group.sync.aligned()
            if kt + STAGES - 2 < g.k_tiles:
                load_tile(kt + STAGES - 2, (kt + STAGES - 2) % STAGES)
            T.ptx.cp.async_.commit_group()  # possibly empty: the group count stays uniform
            T.ptx.wgmma.wait_group.sync.aligned(1)
        T.ptx.wgmma.wait_group.sync.aligned(0)
        # The accumulator of wgmma m64nNk8: thread t (warp w, lane l of its warpgroup) holds rows
        # 16w + l/4 and 16w + l/4 + 8, columns 8j + 2(l%4) and the next, for j < N/8.
        for half in T.unroll(2):
            m = T.meta_var(bm * BM + wg * 64 + (tx % 128) // 32 * 16 + (tx % 32) // 4 + half * 8)
            if m < g.rows:
                for j in T.unroll(g.acc_regs // 4):
                    for e in T.unroll(2):
                        o = T.meta_var(bn_at * g.bn + j * 8 + (tx % 4) * 2 + e)
                        image = T.meta_var(m // g.pixels)
                        y = T.meta_var(m % g.pixels // g.out_w)
                        x = T.meta_var(m % g.out_w)
                        out[image, y, x, o] = epilogue(acc[j * 4 + half * 2 + e], image, y, x, o)
    # fmt: on
    return kernel

