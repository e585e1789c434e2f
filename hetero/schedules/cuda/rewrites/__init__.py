"""Relax rewrites before legalization: target independent, so they are checked numerically on the CPU.

:func:`prepare_module` runs them in order: NHWC layout (:mod:`.layout`), float16 (:mod:`.float16`)
or TF32-rounded GEMM operands (:mod:`.tf32`), long-K matmuls split along K (:mod:`.split_k`).
"""

from __future__ import annotations

import tvm
from tvm import relax

from .float16 import to_float16
from .layout import to_nhwc
from .split_k import split_k
from .tf32 import round_to_tf32

PRECISIONS = ("fp32", "tf32", "fp16")


def prepare_module(mod: tvm.IRModule, precision: str = "fp32", layout: str = "NHWC") -> tvm.IRModule:
    """The Relax-level rewrites of the CUDA pipeline (target independent).

    The result computes the same function as ``mod`` (to float16 rounding for ``"fp16"``, to TF32
    rounding of the GEMMs' operands for ``"tf32"``), with
    the same signature, so it can be built for ``llvm`` and compared with ``mod`` on the CPU.
    ``layout`` is ``"NHWC"`` (the default) or ``"NCHW"`` (keep the network's layout).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be NHWC or NCHW, got {layout!r}")
    seq: list[tvm.transform.Pass] = []
    if layout == "NHWC":
        seq += to_nhwc()
    if precision == "fp16":
        seq.append(to_float16)
    if precision == "tf32":
        seq.append(round_to_tf32)
    seq += [split_k, relax.transform.Normalize(), relax.transform.DeadCodeElimination()]
    return tvm.transform.Sequential(seq)(mod)


def with_weights_prepared_once(mod: tvm.IRModule, precision: str, layout: str) -> tvm.IRModule:
    """:func:`prepare_module`, then everything computed from the weights alone (OHWI transposes,
    float16 casts, bias reshapes) moved out of ``main`` into ``main_transform_params``, which an
    engine runs once (hetero.compile.module_weights) instead of on every call."""
    return relax.transform.LiftTransformParams()(prepare_module(mod, precision, layout))
