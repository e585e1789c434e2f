"""The one convolution matcher: a 2-D convolution's multiply-accumulate block, in any layout.

Every schedule that treats convolutions differently from other reductions (the CPU's register-tiled
conv, the Hopper wgmma kernel) asks :func:`match_conv` which operand is the data and which the
weight, and then checks the layout it needs.  The GEMM schedules (``cuda/gemm.py``) need no more than
dlight's GEMM normalisation, which takes convs and matmuls alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.expr import TensorLoad

from .analysis import OTHER, REDUCTION, SPATIAL, is_var, iter_kinds, multiply_accumulate, uses_var


@dataclass(frozen=True)
class ConvMac:
    """``out[spatial] += data[..] * weight[channel, ..]``: a conv's multiply-accumulate block."""

    store: tirx.BufferStore
    data: TensorLoad
    weight: TensorLoad
    spatial: list[tirx.Var]  # the block's spatial iterators, in the output's axis order
    reduction: list[tirx.Var]  # its reduction iterators, in block order


def match_conv(block: tirx.SBlock, channel_axis: int) -> ConvMac | None:
    """``block`` as a 2-D conv whose output channel is output axis ``channel_axis`` (1 in NCHW, 3 in
    NHWC), or None.  The weight is the operand indexed first by the output channel and otherwise by
    reduction iterators only (OIHW and OHWI both); the data is the other, which the output channel
    does not index."""
    kinds = iter_kinds(block)
    if REDUCTION not in kinds or OTHER in kinds:
        return None
    mac = multiply_accumulate(block)
    if mac is None:
        return None
    store, a, b = mac
    names = [iv.var for iv in block.iter_vars]
    spatial = [v for v, kind in zip(names, kinds) if kind == SPATIAL]
    reduction = [v for v, kind in zip(names, kinds) if kind == REDUCTION]
    if len(store.indices) != 4 or len(spatial) != 4:
        return None
    if not all(is_var(index, var) for index, var in zip(store.indices, spatial)):
        return None
    channel = spatial[channel_axis]
    for weight, data in ((b, a), (a, b)):
        if len(weight.indices) != 4 or not is_var(weight.indices[0], channel):
            continue
        if any(uses_var(index, var) for index in weight.indices[1:] for var in spatial):
            continue
        if any(uses_var(index, channel) for index in data.indices):
            continue
        return ConvMac(store, data, weight, spatial, reduction)
    return None


def evaluate(expr, values: dict[str, int]) -> int | None:
    """An integer index expression with the variables named in ``values`` set; None if other
    variables remain."""
    bound = tvm_ffi.structural_map(
        expr, [(tirx.Var, lambda v: tirx.IntImm("int32", values[v.name]) if v.name in values else v)])
    value = tvm.sym.Analyzer().simplify(bound)
    return int(value) if isinstance(value, tirx.IntImm) else None


def affine(expr, names: list[str]) -> tuple[int, list[int]] | None:
    """Constant and coefficients of an index affine in the variables ``names``, or None: for a conv's
    data index ``y * stride + ry * dilation - pad``, ``(-pad, [stride, dilation])``."""
    zero = dict.fromkeys(names, 0)
    points = [evaluate(expr, zero), *(evaluate(expr, {**zero, name: 1}) for name in names)]
    if None in points:
        return None
    return points[0], [point - points[0] for point in points[1:]]
