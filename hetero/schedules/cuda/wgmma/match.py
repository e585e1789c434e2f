"""Reading a fused conv PrimFunc as the wgmma kernel's conv: its operands, stride, padding, dilation
and the elementwise epilogue that follows it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad

from ...base.analysis import REDUCTION, SPATIAL, iter_kinds
from ...base.conv import affine
from ...base.conv import match_conv as match_conv_block
from .operands import MMA_TYPES, OPERAND_BYTES, ROW_BYTES, STAGES

_ITER_KINDS = [SPATIAL] * 4 + [REDUCTION] * 3  # n, y, x, o; ry, rx, rc


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
        return ROW_BYTES // OPERAND_BYTES[str(self.data.dtype)]

    def extents(self) -> list:
        """(batch, M, N, K) of the GEMM, as hetero's schedules normalise theirs."""
        taps_y, taps_x, in_channels = (int(d) for d in self.weight.shape[1:])
        return [tirx.IntImm("int32", 1), self.out.shape[0] * self.out.shape[1] * self.out.shape[2],
                tirx.IntImm("int32", int(self.weight.shape[0])), tirx.IntImm("int32", taps_y * taps_x * in_channels)]


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
    convs = [i for i, node in enumerate(nodes) if iter_kinds(node) == _ITER_KINDS]
    if len(convs) != 1 or convs[0] > 1:
        return None
    at = convs[0]
    conv, names = nodes[at], _names(nodes[at])  # n, y, x, o, ry, rx, rc
    mac = match_conv_block(conv, 3)
    if mac is None or str(mac.store.buffer.dtype) != "float32":
        return None
    accumulator = mac.store.buffer
    source, weight = mac.data.source, mac.weight.source
    if [str(i) for i in mac.weight.indices] != names[3:]:
        return None
    if str(mac.data.indices[0]) != names[0] or str(mac.data.indices[3]) != names[6]:
        return None
    rows, columns = affine(mac.data.indices[1], [names[1], names[4]]), affine(mac.data.indices[2], [names[2], names[5]])
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
        offsets = [affine(index, [name]) for index, name in zip(copied.indices, _names(nodes[0]))]
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
    if dtype not in MMA_TYPES or str(weight.dtype) != dtype or int(data.shape[3]) != in_channels:
        return None
    row = ROW_BYTES // OPERAND_BYTES[dtype]
    if in_channels % row or channels % 64 or taps_y * taps_x * in_channels // row < STAGES:
        return None
    epilogue = _epilogue(final.body.value, accumulator, spatial) if final is not conv else (lambda acc, *_: acc)
    return ConvGemm(data, weight, out, (stride_y, stride_x), pad, (dilation_y, dilation_x), epilogue)


def _epilogue(value, accumulator: tirx.Buffer, spatial: list[str]) -> Callable:
    """``value`` (what the last block stores) as a function of the accumulator and the position:
    its loads of the conv's result become the accumulator, its block variables the position."""

    def apply(acc, *position):
        where = dict(zip(spatial, position))
        return tvm_ffi.structural_map(value, [
            (TensorLoad, lambda load: acc if load.source.same_as(accumulator) else load),
            (tirx.Var, lambda v: where.get(v.name, v))])

    return apply
