"""Convolutions on Hopper's warpgroup tensor cores (``wgmma``), in TF32 and float16, for sm_90a.

hetero's other tensor-core kernels issue warp-level ``mma.sync``, which left vgg-19's 3x3 convs at
150-160 TFLOP/s in TF32 on an H200 while cuDNN's wgmma kernels ran them at about 470 (benchmarks/HISTORY.md).
Here a conv is one TVMScript (tirx) kernel on TVM 0.27's own PTX instructions: an implicit GEMM (M:
output pixels, N: output channels, K: taps x input channels) whose 128 x BN block tile is two
warpgroups, each issuing ``wgmma.mma_async m64nBNk8`` (TF32) or ``k16`` (float16) on operands in
shared memory named by matrix descriptors. Tiles of 128 bytes of K are loaded with ``cp.async``
(zero-filled where the conv pads and past the last row) into a ring of STAGES stages laid out in the
128-byte swizzle that wgmma reads; accumulation is in float32.

The kernel replaces a fused conv PrimFunc and keeps its parameters: the elementwise blocks that follow
the conv there (casts, bias, residual, relu, TF32 rounding) are inlined into one expression, which the
kernel evaluates on each accumulator as it stores it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad
from tvm.script import tirx as T

ARCH = "sm_90a"  # wgmma is an sm_90a instruction
KERNEL_ATTR = "hetero.wgmma"  # marks the kernels that need TVM's tirx lowering
ROW_BYTES = 128  # one swizzled row of a tile: the K of one stage (32 floats, 64 halves)
WGMMA_K_BYTES = 32  # the K of one wgmma instruction (k8 in TF32, k16 in float16)
BM = 128  # rows of a block tile: two warpgroups of 64
THREADS = 256
STAGES = 4
SWIZZLE_128B = 3  # encode_matrix_descriptor's code for the 128-byte swizzle
LBO = 1  # leading byte offset, unused by swizzled K-major operands
SBO = 1024 >> 4  # stride byte offset, 16-byte units: 8 rows of 128 bytes
MAX_SHARED_BYTES = 227 * 1024
_BYTES = {"float32": 4, "float16": 2}
# the wgmma shape suffix of each operand type, and the operands after the scales: float16 takes
# transpose immediates (0: K-major, as hetero's GEMMs hold both operands), TF32 has none
_MMA_TYPES = {"float32": ("k8.f32.tf32.tf32", ()), "float16": ("k16.f32.f16.f16", (0, 0))}


@dataclass(frozen=True)
class Tile:
    """A wgmma kernel's block tile, described as hetero's other GEMM tiles are."""

    bm: int
    bn: int
    bk: int  # K elements per stage


@dataclass(frozen=True)
class ConvGemm:
    """A conv2d (NHWC data, OHWI weights) read from a fused PrimFunc, and what follows it there."""

    data: tirx.Buffer
    weight: tirx.Buffer
    out: tirx.Buffer
    stride: tuple[int, int]
    pad: tuple[int, int]  # top, left
    dilation: tuple[int, int]
    epilogue: Callable  # (accumulator, image, y, x, channel) -> the value stored

    @property
    def row(self) -> int:
        """K elements in one 128-byte row of a shared tile."""
        return ROW_BYTES // _BYTES[str(self.data.dtype)]

    def extents(self) -> list:
        """(batch, M, N, K) of the GEMM, as hetero's schedules normalise theirs."""
        taps_y, taps_x, in_channels = (int(d) for d in self.weight.shape[1:])
        return [tirx.IntImm("int32", 1), self.out.shape[0] * self.out.shape[1] * self.out.shape[2],
                tirx.IntImm("int32", int(self.weight.shape[0])), tirx.IntImm("int32", taps_y * taps_x * in_channels)]


def pick_block_n(channels: int, rows: int, num_sms: int) -> int | None:
    """The widest wgmma N (256, 128, 64) dividing ``channels`` (the GEMM's N) whose 128-row tiles
    still give every one of ``num_sms`` SMs a block over ``rows`` (M); None if none does, and
    ``mma.sync``'s smaller tiles, picked by their waves, take the conv (densenet-121 ran 2% slower
    on an H100 with its 7x7 and 14x14 1x1 convs in 25 and 98 blocks of 128x128)."""
    return next((n for n in (256, 128, 64) if channels % n == 0 and -(-rows // BM) * (channels // n) >= num_sms),
                None)


def _const(expr, values: dict[str, int]) -> int | None:
    """An integer index expression evaluated with the variables named in ``values`` set; None if
    other variables remain."""
    bound = tvm_ffi.structural_map(
        expr, [(tirx.Var, lambda v: tirx.IntImm("int32", values[v.name]) if v.name in values else v)])
    value = tvm.sym.Analyzer().simplify(bound)
    return int(value) if isinstance(value, tirx.IntImm) else None


def _affine(expr, names: list[str]) -> tuple[int, list[int]] | None:
    """Constant and coefficients of an index affine in the variables ``names``, or None."""
    zero = dict.fromkeys(names, 0)
    points = [_const(expr, zero), *(_const(expr, {**zero, name: 1}) for name in names)]
    if None in points:
        return None
    return points[0], [point - points[0] for point in points[1:]]


def _uncast(expr):
    """``expr`` without a widening cast around it."""
    return expr.value if type(expr).__name__ == "Cast" else expr


def _names(block) -> list[str]:
    return [str(v.var.name) for v in block.iter_vars]


def match_conv(func: tirx.PrimFunc) -> ConvGemm | None:
    """The conv of a fused PrimFunc that the wgmma kernel computes, or None: a 2-D conv of NHWC data
    and OHWI weights in float32 (read as TF32) or float16, one group, input channels a multiple of
    one 128-byte row (32 or 64), output channels of 64, at least STAGES tiles of K, padded (by a
    block before it) or not, followed by elementwise blocks that read its result where they write
    and otherwise parameters only; its batch a variable indexed in int32 (``narrow_batch_indices``)."""
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    nodes = [sch.get(b) for b in blocks]
    convs = [i for i, node in enumerate(nodes)
             if [int(v.iter_type) for v in node.iter_vars] == [0, 0, 0, 0, 2, 2, 2]]
    if len(convs) != 1 or convs[0] > 1:
        return None
    at = convs[0]
    conv, names = nodes[at], _names(nodes[at])  # n, y, x, o, ry, rx, rc
    accumulator, value = conv.body.buffer, conv.body.value
    if type(value).__name__ != "Add" or type(value.b).__name__ != "Mul" or str(accumulator.dtype) != "float32":
        return None
    operands = [_uncast(value.b.a), _uncast(value.b.b)]  # float16 operands are widened to float32
    if not all(isinstance(operand, TensorLoad) for operand in operands):
        return None
    (source, source_at), (weight, weight_at) = ((operand.source, operand.indices) for operand in operands)
    if [str(i) for i in weight_at] != names[3:] or str(source_at[0]) != names[0] or str(source_at[3]) != names[6]:
        return None
    rows, columns = _affine(source_at[1], [names[1], names[4]]), _affine(source_at[2], [names[2], names[5]])
    if rows is None or columns is None or rows[0] or columns[0]:
        return None
    (stride_y, dilation_y), (stride_x, dilation_x) = rows[1], columns[1]
    data, pad = source, (0, 0)
    if at == 1:  # source[v] = if_then_else(inside, data[v - pad], 0), or data[v] where nothing is padded
        padding = nodes[0].body
        copied = padding.value
        if type(copied).__name__ == "Call":
            args = list(copied.args)
            if len(args) != 3 or not isinstance(args[2], tirx.FloatImm) or args[2].value != 0.0:
                return None
            copied = args[1]
        if not padding.buffer.same_as(source) or not isinstance(copied, TensorLoad):
            return None
        data = copied.source
        offsets = [_affine(index, [name]) for index, name in zip(copied.indices, _names(nodes[0]))]
        if None in offsets or offsets[0][0] or offsets[3][0]:
            return None
        pad = (-offsets[1][0], -offsets[2][0])
    for block in blocks[at + 1 : -1]:  # fold the epilogue into its last block
        sch.compute_inline(block)
    final = sch.get(sch.get_child_blocks(sch.get_sblock("root"))[-1]) if at + 1 < len(nodes) else conv
    out, spatial = final.body.buffer, _names(final)[:4]
    if not all(any(b.same_as(p) for p in func.params) for b in (data, weight, out)):
        return None
    loads = []
    tvm_ffi.structural_walk(final.body.value, [(TensorLoad, loads.append)])
    if [str(i) for i in final.body.indices] != spatial or not all(
            [str(i) for i in load.indices] == spatial if load.source.same_as(accumulator)
            else any(load.source.same_as(p) for p in func.params) for load in loads):
        return None
    channels, taps_y, taps_x, in_channels = (int(d) for d in weight.shape)
    batch = data.shape[0]
    if not isinstance(batch, tirx.Var) or str(batch.ty) != "int32":  # indexed in int32: narrowed modules only
        return None
    dtype = str(data.dtype)
    if dtype not in _MMA_TYPES or str(weight.dtype) != dtype or int(data.shape[3]) != in_channels:
        return None
    row = ROW_BYTES // _BYTES[dtype]
    if in_channels % row or channels % 64 or taps_y * taps_x * in_channels // row < STAGES:
        return None
    epilogue = _epilogue(final.body.value, accumulator, spatial) if final is not conv else (lambda acc, *_: acc)
    return ConvGemm(data, weight, out, (stride_y, stride_x), pad, (dilation_y, dilation_x), epilogue)


def _epilogue(value, accumulator: tirx.Var, spatial: list[str]) -> Callable:
    """``value`` (what the last block stores) as a function of the accumulator and the position:
    its loads of the conv's result become the accumulator, its block variables the position."""

    def apply(acc, *position):
        where = dict(zip(spatial, position))
        return tvm_ffi.structural_map(value, [
            (TensorLoad, lambda load: acc if load.source.same_as(accumulator) else load),
            (tirx.Var, lambda v: where.get(v.name, v))])

    return apply


def conv_kernel(func: tirx.PrimFunc, conv: ConvGemm, bn: int) -> tirx.PrimFunc:
    """``func`` (the fused PrimFunc ``conv`` was read from) computed by the wgmma kernel in tiles of
    128 x ``bn``: same parameters, marked scheduled and as needing TVM's tirx lowering (``KERNEL_ATTR``)."""
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


def _kernel(conv: ConvGemm, bn: int) -> tirx.PrimFunc:
    """The wgmma kernel of ``conv`` on parameters of its own: data, weight, out."""
    batch = conv.data.shape[0]
    height, width, in_channels = (int(d) for d in conv.data.shape[1:])
    channels, taps_y, taps_x, _ = (int(d) for d in conv.weight.shape)
    out_h, out_w = (int(d) for d in conv.out.shape[1:3])
    (stride_y, stride_x), (pad_y, pad_x), (dil_y, dil_x) = conv.stride, conv.pad, conv.dilation
    dtype, row_k = str(conv.data.dtype), conv.row
    chunk = 16 // _BYTES[dtype]  # elements in one 16-byte cp.async
    k_tiles = taps_y * taps_x * in_channels // row_k
    pixels = out_h * out_w
    rows = batch * pixels
    grid_n = channels // bn
    acc_regs = bn // 2  # accumulator registers per thread (wgmma m64nNk8: N / 2)
    a_tile, b_tile = BM * row_k, bn * row_k  # elements per stage
    stage = a_tile + b_tile
    shared = STAGES * stage + 1024 // _BYTES[dtype]  # + 1 KiB so the ring can start 1024-byte aligned
    a_copies, b_copies = a_tile // chunk // THREADS, b_tile // chunk // THREADS  # 16-byte copies per thread
    mma, trailing = _MMA_TYPES[dtype]
    mma = f"wgmma.mma_async.sync.aligned.m64n{bn}{mma}"
    element_shift = _BYTES[dtype].bit_length() - 1
    if shared * _BYTES[dtype] > MAX_SHARED_BYTES:
        raise ValueError(f"{shared * _BYTES[dtype]} bytes of shared memory")
    epilogue = conv.epilogue

    # fmt: off
    @T.prim_func(check_well_formed=False)
    def kernel(data: T.Buffer((batch, height, width, in_channels), dtype),
               weight: T.Buffer((channels, taps_y, taps_x, in_channels), dtype),
               out: T.Buffer((batch, out_h, out_w, channels), str(conv.out.dtype))):
        T.device_entry()
        bx = T.cta_id([T.ceildiv(rows, BM) * grid_n])
        tx = T.thread_id([THREADS])
        smem = T.alloc_buffer((shared,), dtype, scope="shared.dyn", align=1024)
        acc = T.alloc_local((acc_regs,), "float32")
        row_image = T.alloc_local((a_copies,), "int32")  # per A row this thread loads: image offset,
        row_y = T.alloc_local((a_copies,), "int32")  # top input row and left input column of its
        row_x = T.alloc_local((a_copies,), "int32")  # window (rows past the end: far outside)
        desc_a: T.uint64  # TVMScript declares the descriptors here
        desc_b: T.uint64
        bm = bx // grid_n  # consecutive blocks share their A rows
        bn_at = bx % grid_n
        wg = tx // 128
        pad = T.meta_var(T.Cast("int32", ((T.uint32(1024) - (T.cuda.cvta_generic_to_shared(smem.data) & T.uint32(1023))) & T.uint32(1023)) >> T.uint32(element_shift)))

        for i in T.unroll(a_copies):
            m = T.meta_var(bm * BM + (i * THREADS + tx) // 8)
            pixel = T.meta_var(m % pixels)
            row_image[i] = m // pixels * (height * width * in_channels)
            row_y[i] = T.if_then_else(m < rows, pixel // out_w * stride_y - pad_y, -(1 << 20))
            row_x[i] = pixel % out_w * stride_x - pad_x

        @T.inline
        def load_tile(kt, s):
            tap = T.meta_var(kt * row_k // in_channels)
            ky = T.meta_var(tap // taps_x * dil_y)
            kx = T.meta_var(tap % taps_x * dil_x)
            channel = T.meta_var(kt * row_k % in_channels + tx % 8 * chunk)
            for i in T.unroll(a_copies):
                row = T.meta_var((i * THREADS + tx) // 8)
                y = T.meta_var(row_y[i] + ky)
                x = T.meta_var(row_x[i] + kx)
                inside = T.meta_var(0 <= y and y < height and 0 <= x and x < width)  # noqa: PLR1716 -- TVMScript
                T.ptx.cp.async_.cg.shared.global_(
                    smem.ptr_to([pad + s * stage + row * row_k + T.bitwise_xor(tx % 8, row % 8) * chunk]),
                    data.ptr_to([0, 0, 0, T.if_then_else(inside, row_image[i] + (y * width + x) * in_channels + channel, 0)]),
                    16, T.if_then_else(inside, T.uint32(16), T.uint32(0)))
            for i in T.unroll(b_copies):
                row = T.meta_var((i * THREADS + tx) // 8)
                T.ptx.cp.async_.cg.shared.global_(
                    smem.ptr_to([pad + s * stage + a_tile + row * row_k + T.bitwise_xor(tx % 8, row % 8) * chunk]),
                    weight.ptr_to([0, 0, 0, (bn_at * bn + row) * (taps_y * taps_x * in_channels) + kt * row_k + tx % 8 * chunk]), 16)

        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_a), smem.ptr_to([pad + wg * (64 * row_k)]), LBO, SBO, SWIZZLE_128B)  # noqa: F821 -- declared above, in TVMScript
        T.cuda.wgmma.encode_matrix_descriptor(T.address_of(desc_b), smem.ptr_to([pad + a_tile]), LBO, SBO, SWIZZLE_128B)  # noqa: F821
        for i in T.serial(acc_regs):
            acc[i] = T.float32(0)
        for p in T.unroll(STAGES - 2):
            load_tile(p, p)
            T.ptx.cp.async_.commit_group()
        # At the top of iteration kt the copies of tiles up to kt + STAGES - 3 are committed and this
        # warpgroup's wgmma groups up to tile kt - 2 are complete.
        for kt in T.serial(k_tiles):
            T.ptx.cp.async_.wait_group(STAGES - 3)
            T.ptx.fence.proxy.async_.shared__cta()  # cp.async writes through the generic proxy, wgmma reads through the async one
            T.cuda.cta_sync()  # tile kt is in place, and stage (kt - 2) % STAGES is free again
            s = T.meta_var(kt % STAGES)
            T.ptx.wgmma.fence.sync.aligned()
            for kk in T.unroll(ROW_BYTES // WGMMA_K_BYTES):
                T.ptx[mma](
                    *[acc[i] for i in range(acc_regs)],
                    desc_a + T.Cast("uint64", (s * stage * _BYTES[dtype] + kk * WGMMA_K_BYTES) >> 4),  # noqa: F821
                    desc_b + T.Cast("uint64", (s * stage * _BYTES[dtype] + kk * WGMMA_K_BYTES) >> 4),  # noqa: F821
                    True, 1, 1, *trailing)
            T.ptx.wgmma.commit_group.sync.aligned()
            if kt + STAGES - 2 < k_tiles:
                load_tile(kt + STAGES - 2, (kt + STAGES - 2) % STAGES)
            T.ptx.cp.async_.commit_group()  # possibly empty: the group count stays uniform
            T.ptx.wgmma.wait_group.sync.aligned(1)
        T.ptx.wgmma.wait_group.sync.aligned(0)
        # The accumulator of wgmma m64nNk8: thread t (warp w, lane l of its warpgroup) holds rows
        # 16w + l/4 and 16w + l/4 + 8, columns 8j + 2(l%4) and the next, for j < N/8.
        for half in T.unroll(2):
            m = T.meta_var(bm * BM + wg * 64 + (tx % 128) // 32 * 16 + (tx % 32) // 4 + half * 8)
            if m < rows:
                for j in T.unroll(acc_regs // 4):
                    for e in T.unroll(2):
                        o = T.meta_var(bn_at * bn + j * 8 + (tx % 4) * 2 + e)
                        image = T.meta_var(m // pixels)
                        y = T.meta_var(m % pixels // out_w)
                        x = T.meta_var(m % out_w)
                        out[image, y, x, o] = epilogue(acc[j * 4 + half * 2 + e], image, y, x, o)
    # fmt: on
    return kernel


def with_wgmma(target: tvm.target.Target) -> tvm.target.Target:
    """``target`` with its arch-specific features: an sm_90 GPU compiled as sm_90a, whose code runs on
    sm_90 only (as it is: each GPU is compiled for itself) and may use wgmma."""
    if target.kind.name != "cuda" or str(target.attrs.get("arch", "")) != "sm_90":
        return target
    return tvm.target.Target({**dict(target.export()), "arch": ARCH}, target.host)


def supports(target: tvm.target.Target) -> bool:
    return target.kind.name == "cuda" and str(target.attrs.get("arch", "")) == ARCH
