"""Tuning-free CUDA schedules for CNN inference (issue 4).

TVM 0.27's default CUDA pipeline (``relax.backend.cuda.get_default_pipeline``) legalizes every
operator to TIR and schedules it with dlight.  dlight's ``Matmul`` rule does take NCHW convs as
implicit GEMMs, but with one small tile (32x64, 4x4 per thread), shared-memory reads that
bank-conflict, and im2col loads that NCHW makes uncoalesced; its float16 tensor-core variant
raises on fused convs; depthwise convs go to ``GeneralReduction``, which spends a warp on a
9-element reduction.  The wheel has no cuDNN/cuBLAS/CUTLASS, so everything has to be TIR.

:func:`gpu_pipeline` is the default pipeline with three changes.

1. Relax rewrites before legalization (:func:`prepare_module`; target independent, so they are
   checked numerically on the CPU):

   * ``x + b`` with a ``(C, 1, 1)`` operand gets it reshaped to ``(1, C, 1, 1)``; then
     ``ConvertLayout`` turns the whole graph NHWC (weights OHWI), so an im2col row (kh, kw, c)
     and a weight row are contiguous along c; transposes that only move unit axes become free
     reshapes;
   * ``fp16``: the function runs in float16 -- parameters are cast where first used (a bias after
     its reshapes, so the cast fuses into the conv epilogue), convs and matmuls accumulate in
     float32 (``out_dtype``) and are cast back, averages run in float32, and the result is cast
     to float32: the signature (float32 in and out) does not change.

2. Schedule rules tried before dlight's (a rule that fails returns "no schedule", never raises):

   * :func:`schedule_gemm_tensorcore` (float16 operands, or float32 read as TF32, on
     ``mma.sync`` fragments held in registers): every conv / matmul as an implicit GEMM
     ``C[M, N] += A[M, K] * B[N, K]`` with float32 accumulation, K tiles of 32, shared tiles
     filled by ``cp.async`` a stage ahead (register-staged and double-buffered where that
     does not apply), software pipeline, fused epilogue;
   * :func:`schedule_gemm_simt` (float32): the same GEMM on CUDA cores, 8x8 outputs per thread
     (2x2 virtual threads of 4x4), float4 global loads, shared tiles stored transposed so every
     inner-loop shared read is a conflict-free float4, the next K tile prefetched to registers
     while the current one is computed;
   * tiles are picked per kernel (:func:`pick_simt_config`, :func:`pick_tensorcore_config`) from
     its static N, K and its M estimated at batch 64: the largest tile that still gives every SM
     two blocks.  The batch stays symbolic (M = n*H*W, padded to the tile);
   * :func:`schedule_small_reduction`: depthwise convs and pools, one output per thread with the
     (<= 64 element) reduction in registers, threads along the channel (coalesced in NHWC).

3. dlight's rules last, each wrapped so that one that raises falls through to the next.

Usage::

    relax.build(network.module, target, relax_pipeline=gpu_pipeline(target, "fp16"),
                tir_pipeline=tir_pipeline("fp16", target))

:func:`describe_schedules` tells which rule and tile each kernel gets, without building.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import inspect
import linecache
import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir.dlight.gpu.matmul import (
    auto_inline_consumer_chain,
    auto_inline_producers,
    get_index_map,
    get_reduction_blocks,
)
from tvm.sym.analyzer import Analyzer
from tvm.tirx.analysis import undefined_vars

from . import _mma, wgmma

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_BATCH_FUNCTION",
    "PRECISIONS",
    "KernelSchedule",
    "ScheduleInParallel",
    "SimtConfig",
    "TensorCoreConfig",
    "describe_schedules",
    "effective_precision",
    "fused_module",
    "gpu_pipeline",
    "gpu_rules",
    "narrow_batch_indices",
    "pick_simt_config",
    "pick_tensorcore_config",
    "prepare_module",
    "recorded_max_batch",
    "schedule_gemm_simt",
    "schedule_gemm_tensorcore",
    "schedule_small_reduction",
    "tir_pipeline",
]

PRECISIONS = ("fp32", "tf32", "fp16")

# The batch the tile heuristics assume (the batch itself stays symbolic in every kernel).
PLANNING_BATCH = 64
# Streaming multiprocessors the tile heuristics try to fill (H100 SXM: 132).
DEFAULT_NUM_SMS = 132

# =============================================================================================
# Relax rewrites (target independent)
# =============================================================================================

_ARITH = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum",
          "relax.minimum")
_LAYOUT_OPS = ("relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.squeeze",
               "relax.flatten")
# ops whose float16 version would lose too much: run them in float32
_FP32_OPS = ("relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d", "relax.mean", "relax.sum",
             "relax.variance", "relax.nn.softmax", "relax.nn.log_softmax")


def _tensor_shape(expr: relax.Expr) -> list | None:
    ty = expr.ty
    if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr):
        return list(ty.shape.values)
    return None


def _tensor_dtype(expr: relax.Expr) -> str | None:
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _map_functions(mod: tvm.IRModule, fn: Callable[[relax.Function], relax.Function]) -> tvm.IRModule:
    mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)  # never mutate the caller's
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = fn(func)
    return mod


@mutator
class _BroadcastTo4D(PyExprMutator):
    """``x (N,C,H,W) + b (C,1,1)`` -> ``x + reshape(b, (1,C,1,1))``.

    ConvertLayout cannot give a rank-3 operand a 4-D layout, so it would convert every bias add
    back to NCHW; with both operands 4-D it permutes the (tiny) bias instead.
    """

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name in _ARITH and len(call.args) == 2):
            return call
        shapes = [_tensor_shape(a) for a in call.args]
        if any(s is None for s in shapes):
            return call
        ranks = [len(s) for s in shapes]
        if ranks[0] == ranks[1] or max(ranks) != 4 or min(ranks) == 0:
            return call
        args = list(call.args)
        low = ranks.index(min(ranks))
        args[low] = self.builder_.emit(relax.op.reshape(args[low], [1] * (4 - ranks[low]) + shapes[low]))
        return relax.Call(call.op, args, call.attrs, call.ty_args)


@tvm.transform.module_pass(opt_level=0, name="hetero.BroadcastTo4D")
def broadcast_to_4d(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    return _map_functions(mod, lambda f: _BroadcastTo4D().visit_expr(f))


@mutator
class _PermuteToReshape(PyExprMutator):
    """``permute_dims`` that keeps the order of the non-unit axes -> ``reshape`` (a free view).

    ConvertLayout leaves ``permute_dims(reshape(bias), [0, 2, 3, 1])`` from (1, C, 1, 1) to
    (1, 1, 1, C): a copy kernel per bias per call, where a reshape costs nothing.
    """

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.permute_dims"):
            return call
        shape = _tensor_shape(call.args[0])
        if shape is None:
            return call
        axes = call.attrs.axes
        axes = list(range(len(shape)))[::-1] if axes is None else [int(a) for a in axes]
        moved = [a for a in axes if _static(shape[a]) != 1]  # a symbolic extent counts as > 1
        if moved != sorted(moved):
            return call
        return relax.op.reshape(call.args[0], [shape[a] for a in axes])


@tvm.transform.module_pass(opt_level=0, name="hetero.PermuteToReshape")
def permute_to_reshape(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    return _map_functions(mod, lambda f: _PermuteToReshape().visit_expr(f))


@mutator
class _ToFloat16(PyExprMutator):
    """Run a float32 function in float16 (see :func:`to_float16`)."""

    def __init__(self, params: Sequence[relax.Var]) -> None:
        super().__init__()
        self.params = list(params)
        self.casts: dict[int, relax.Var] = {}

    def _half(self, expr: relax.Expr) -> relax.Expr:
        """``expr`` cast to float16 (each parameter once, where first used)."""
        if _tensor_dtype(expr) != "float32":
            return expr
        for index, param in enumerate(self.params):
            if expr.same_as(param):
                if index not in self.casts:
                    self.casts[index] = self.builder_.emit(relax.op.astype(expr, "float16"))
                return self.casts[index]
        return self.builder_.emit(relax.op.astype(expr, "float16"))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if not isinstance(call.op, tvm.ir.Op):
            return super().visit_call_(call)
        name = call.op.name
        # Visit the arguments here: normalising the call with some of them already float16 and
        # the others (parameters) still float32 would fail type inference.
        args = [self.visit_expr(a) for a in call.args]
        if name not in _LAYOUT_OPS:
            # A parameter reshaped or permuted stays float32 until its consumer casts it: a
            # bias cast right before its add fuses into the conv's epilogue, not a kernel.
            args = [self._half(a) if any(a.same_as(p) for p in self.params) else a for a in args]
        if any(_tensor_dtype(a) == "float16" for a in args) or name in ("relax.nn.conv2d",
                                                                         "relax.matmul"):
            args = [self._half(a) for a in args]
        if name == "relax.nn.conv2d" and all(_tensor_dtype(a) == "float16" for a in args):
            at = call.attrs
            out = self.builder_.emit(relax.op.nn.conv2d(
                args[0], args[1], at.strides, at.padding, at.dilation, at.groups, at.data_layout,
                at.kernel_layout, at.out_layout, out_dtype="float32"))
            return relax.op.astype(out, "float16")
        if name == "relax.matmul" and all(_tensor_dtype(a) == "float16" for a in args):
            out = self.builder_.emit(relax.op.matmul(args[0], args[1], out_dtype="float32"))
            return relax.op.astype(out, "float16")
        if name in _FP32_OPS and args and _tensor_dtype(args[0]) == "float16":
            args[0] = self.builder_.emit(relax.op.astype(args[0], "float32"))
            out = self.builder_.emit(relax.Call(call.op, args, call.attrs, call.ty_args))
            return relax.op.astype(out, "float16")
        return relax.Call(call.op, args, call.attrs, call.ty_args)


def _cast_result(func: relax.Function, dtype: str) -> relax.Function:
    """``func`` with its (tensor) result cast to ``dtype``, in a binding block after the body."""
    body = func.body
    if not isinstance(body, relax.SeqExpr) or _tensor_dtype(body.body) in (None, dtype):
        return func
    out = relax.Var("result", relax.TensorType(body.body.ty.shape, dtype))
    block = relax.BindingBlock([relax.VarBinding(out, relax.op.astype(body.body, dtype))])
    return relax.Function(func.params, relax.SeqExpr([*body.blocks, block], out), out.ty,
                          func.is_pure, func.attrs, func.span)


def _to_float16(func: relax.Function) -> relax.Function:
    if any(_tensor_dtype(p) not in (None, "float32") for p in func.params):
        return func  # not a float32 function: leave it alone
    if _tensor_dtype(func.body) != "float32":
        return func  # a tuple (or non-tensor) result: not handled
    func = _ToFloat16(func.params).visit_expr(func)
    return _cast_result(func, "float32")


@tvm.transform.module_pass(opt_level=0, name="hetero.ToFloat16")
def to_float16(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Run every float32 Relax function in float16, keeping its float32 signature.

    Parameters are cast to float16 once, where first used; conv2d and matmul get
    ``out_dtype="float32"`` (float32 accumulation: the tensor-core schedule uses f16 x f16 -> f32
    fragments) and their result is cast to float16, so the activations between layers are float16;
    averaging ops run in float32; the result is cast back to float32.
    """
    return _map_functions(mod, _to_float16)


def tf32_rounded(value: tirx.PrimExpr) -> tirx.PrimExpr:
    """The TF32 number nearest the float32 ``value`` (ties away from zero; 10 mantissa bits), as a
    float32: half a TF32 unit added to the bits, the 13 bits below TF32's mantissa cleared.  A NaN
    stays itself: one whose payload lies in those 13 bits alone would otherwise round to infinity."""
    bound = tirx.Var("tf32_operand", "float32")  # the value is computed once, read three times
    bits = tirx.reinterpret("uint32", bound) + tirx.const(1 << 12, "uint32")
    rounded = tirx.reinterpret("float32", bits & tirx.const(0xFFFFE000, "uint32"))
    return tirx.Let(bound, value, tirx.Select(tirx.isnan(bound), bound, rounded))


def _tf32_rounding(x):
    from tvm import te

    return te.compute(x.shape, lambda *i: tf32_rounded(x(*i)), name="tf32_round")


def _is_tensor_core_gemm(call: relax.Call) -> bool:
    if not isinstance(call.op, tvm.ir.Op):
        return False
    if call.op.name == "relax.nn.conv2d":
        return int(call.attrs.groups) == 1
    return call.op.name == "relax.matmul"


@mutator
class _RoundGemmOperands(PyExprMutator):
    """Round what the GEMMs read to TF32 (see :func:`round_to_tf32`)."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.operands: set[relax.Var] = set()  # the dataflow vars that some GEMM of the function reads
        self.rounded: dict[relax.Expr, relax.Var] = {}  # other operands (parameters), rounded where first used

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        super().visit_var_binding_(binding)
        if binding.var in self.operands:  # every later use, not only the GEMM's, reads the rounded value
            remapped = self.get_var_remap(binding.var)
            self.set_var_remap(binding.var, self._emit_rounding(binding.var if remapped is None else remapped))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not _is_tensor_core_gemm(call):
            return call
        return relax.Call(call.op, [self._rounded(a) for a in call.args], call.attrs, call.ty_args)

    def _rounded(self, arg: relax.Expr) -> relax.Expr:
        if isinstance(arg, relax.DataflowVar) or _tensor_dtype(arg) != "float32":
            return arg  # rounded where it is bound
        if arg not in self.rounded:
            self.rounded[arg] = self._emit_rounding(arg)
        return self.rounded[arg]

    def _emit_rounding(self, expr: relax.Expr) -> relax.Var:
        return self.builder_.emit(self.builder_.call_te(_tf32_rounding, expr))


# Ops whose output is TF32 wherever their input is: they move or pick values (rounding is
# monotone, so max_pool(round(x)) == round(max_pool(x)), bit for bit).
_KEEP_ROUNDING = ("relax.nn.max_pool2d", "relax.reshape", "relax.permute_dims")


def _gemm_operands(func: relax.Function) -> set[relax.Var]:
    """The dataflow vars to round: the GEMMs' float32 operands, each traced back through
    _KEEP_ROUNDING ops to the first value with other uses.  Rounded there, the rounding fuses into
    the epilogue of the conv that computes it, not into a max pool after it (and vgg's convs then
    fit two blocks per SM: benchmarks/HISTORY.md, "TF32 rounding before max pools")."""
    bindings = [binding for block in (func.body.blocks if isinstance(func.body, relax.SeqExpr) else [])
                for binding in block.bindings]
    uses: dict[relax.Var, int] = {}

    def count(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1

    for expr in [binding.value for binding in bindings] + [getattr(func.body, "body", func.body)]:
        relax.analysis.post_order_visit(expr, count)
    source = {binding.var: binding.value.args[0] for binding in bindings
              if isinstance(binding.value, relax.Call) and isinstance(binding.value.op, tvm.ir.Op)
              and binding.value.op.name in _KEEP_ROUNDING
              and isinstance(binding.value.args[0], relax.DataflowVar) and uses.get(binding.value.args[0]) == 1}

    def first_rounded(var: relax.Var) -> relax.Var:
        while var in source:
            var = source[var]
        return var

    operands = set()
    for binding in bindings:
        if isinstance(binding.value, relax.Call) and _is_tensor_core_gemm(binding.value):
            operands.update(first_rounded(a) for a in binding.value.args
                            if isinstance(a, relax.DataflowVar) and _tensor_dtype(a) == "float32")
    return operands


@tvm.transform.module_pass(opt_level=0, name="hetero.RoundToTF32")
def round_to_tf32(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Round every operand of the convolutions and matmuls to TF32, where it is computed: the
    tensor cores read float32 bits as TF32 by dropping the low 13 mantissa bits, which biases
    every product towards zero, and the bias adds up over a network's layers (vgg-16: 1.1e-2 of
    fp32; rounded, 1.1e-3).  An activation is rounded right after the op that computes it, for
    all its uses (the rounding fuses into that op's kernel, where rounding only the GEMM's use
    would cost a kernel of its own); a weight is rounded once, where the weights are prepared
    (``LiftTransformParams``), not on every call."""
    mutator_ = _RoundGemmOperands(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator_.operands, mutator_.rounded = _gemm_operands(func), {}
            mutator_.builder_.update_func(gv, mutator_.visit_expr(func))
    return mutator_.builder_.get()


# A GEMM with fewer tiles than SMs and a K this long is split along K (split_k).
SPLIT_K_MIN_K = 4096
_SPLIT_K_TILE = 128  # the tile edge split_k counts blocks with
_SPLIT_K_MIN_PART = 256  # the shortest K a split leaves each part
_K_TILE = 32  # K of a tensor-core GEMM's shared-memory stage (the CUDA-core GEMM's 16 divides it)


def _k_splits(call: relax.Call, num_sms: int) -> int:
    """Into how many parts ``split_k`` cuts the K of ``call`` (1: not a long-K matmul)."""
    if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul" and len(call.args) == 2):
        return 1
    shapes = [_tensor_shape(a) for a in call.args]
    if any(shape is None or len(shape) != 2 for shape in shapes):
        return 1
    (m, k), (_, n) = shapes
    k, n = _static(k), _static(n)
    if k is None or n is None or k < SPLIT_K_MIN_K:
        return 1
    blocks = math.ceil(_estimate(m) / _SPLIT_K_TILE) * math.ceil(n / _SPLIT_K_TILE)
    splits = 1
    while (blocks * splits < 2 * num_sms and k % (2 * splits * _K_TILE) == 0
           and k // (2 * splits) >= _SPLIT_K_MIN_PART):
        splits *= 2
    return splits


@mutator
class _SplitK(PyExprMutator):
    """Split long-K matmuls (see :func:`split_k`)."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        splits = _k_splits(call, DEFAULT_NUM_SMS)
        if splits == 1:
            return call
        x, w = call.args
        (m, k), (_, n) = _tensor_shape(x), _tensor_shape(w)
        part = _static(k) // splits
        parts_x = self.builder_.emit(relax.op.permute_dims(relax.op.reshape(x, (m, splits, part)), [1, 0, 2]))
        parts_w = self.builder_.emit(relax.op.reshape(w, (splits, part, n)))
        partial = self.builder_.emit(relax.op.matmul(parts_x, parts_w, out_dtype=call.attrs.out_dtype))
        return relax.op.sum(partial, axis=[0])


@tvm.transform.module_pass(opt_level=0, name="hetero.SplitK")
def split_k(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Cut the K of a matmul that makes fewer 128x128 tiles than the GPU has SMs at the planning
    batch, and whose K is at least SPLIT_K_MIN_K, into parts: a batched matmul of the parts, then
    a sum over them.  vgg's first dense layer (K = 25088, N = 4096) made 32 blocks for 132 SMs at
    batch 64 and took 4% of the network's time; cut in 16 it makes 512.  The weights' reshape is
    weight-only work, done once (``LiftTransformParams``)."""
    return _map_functions(mod, lambda f: _SplitK().visit_expr(f))


def prepare_module(mod: tvm.IRModule, precision: str = "fp32", layout: str = "NHWC") -> tvm.IRModule:
    """The Relax-level rewrites of :func:`gpu_pipeline` (target independent).

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
        seq += [broadcast_to_4d, relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]}),
                permute_to_reshape]
    if precision == "fp16":
        seq.append(to_float16)
    if precision == "tf32":
        seq.append(round_to_tf32)
    seq += [split_k, relax.transform.Normalize(), relax.transform.DeadCodeElimination()]
    return tvm.transform.Sequential(seq)(mod)


# =============================================================================================
# TIR schedules
# =============================================================================================


@dataclass(frozen=True)
class SimtConfig:
    """Tile of the CUDA-core GEMM: ``bm`` (I) x ``bn`` (J) outputs per block, ``bk`` per stage."""

    ty: int = 16  # threads along I
    tx: int = 16  # threads along J
    vi: int = 2  # virtual threads along I (a thread's rows are vi blocks of mi, bm/vi apart)
    vj: int = 2
    mi: int = 4  # rows per virtual thread
    mj: int = 4
    bk: int = 16
    vec: int = 4  # vector width of the global -> shared loads

    @property
    def bm(self) -> int:
        return self.ty * self.vi * self.mi

    @property
    def bn(self) -> int:
        return self.tx * self.vj * self.mj

    @property
    def threads(self) -> int:
        return self.tx * self.ty


@dataclass(frozen=True)
class TensorCoreConfig:
    """Tile of the tensor-core GEMM: a block is wi x wj warps, each ti x tj 16x16 fragments."""

    wi: int = 2  # warps along I
    wj: int = 4  # warps along J
    ti: int = 4  # 16x16 fragments per warp along I
    tj: int = 2
    tk: int = 2  # fragment K steps per shared-memory stage (16 wide in fp16, 8 in tf32)

    @property
    def bm(self) -> int:
        return 16 * self.wi * self.ti

    @property
    def bn(self) -> int:
        return 16 * self.wj * self.tj

    @property
    def threads(self) -> int:
        return 32 * self.wi * self.wj


# candidates, largest tile first
SIMT_CONFIGS = (
    SimtConfig(ty=16, tx=16, vi=2, vj=2),  # 128 x 128, 256 threads, 8x8 per thread
    SimtConfig(ty=16, tx=16, vi=2, vj=1),  # 128 x 64
    SimtConfig(ty=16, tx=16, vi=1, vj=1),  # 64 x 64
    SimtConfig(ty=16, tx=8, vi=1, vj=1),  # 64 x 32, 128 threads
    SimtConfig(ty=8, tx=8, vi=1, vj=1),  # 32 x 32, 64 threads
)
TENSORCORE_CONFIGS = (
    TensorCoreConfig(wi=2, wj=4, ti=4, tj=2),  # 128 x 128, 8 warps of 64 x 32
    TensorCoreConfig(wi=4, wj=2, ti=4, tj=2),  # 256 x 64, 8 warps of 64 x 32 (long K only)
    TensorCoreConfig(wi=4, wj=2, ti=2, tj=3),  # 128 x 96, 8 warps of 32 x 48
    TensorCoreConfig(wi=4, wj=2, ti=2, tj=2),  # 128 x 64, 8 warps of 32 x 32
    TensorCoreConfig(wi=2, wj=2, ti=2, tj=3),  # 64 x 96, 4 warps
    TensorCoreConfig(wi=2, wj=2, ti=2, tj=2),  # 64 x 64, 4 warps
    TensorCoreConfig(wi=4, wj=1, ti=2, tj=5),  # 128 x 80, 4 warps of 32 x 80 (inception)
    TensorCoreConfig(wi=4, wj=1, ti=2, tj=3),  # 128 x 48, 4 warps of 32 x 48 (inception)
    TensorCoreConfig(wi=4, wj=1, ti=2, tj=2),  # 128 x 32, 4 warps of 32 x 32 (densenet)
)
TALL_TILE_ROWS = 256
TALL_TILE_MIN_K = 512  # tiles of TALL_TILE_ROWS only over K loops this long (benchmarks/HISTORY.md, "Tiles of 256 rows")
# Not offered, because TVM 0.27 fails to lower them: tk=1 (the k1 software pipeline loses its
# fragments); with wmma (float16 before sm_80), one warp or one fragment along J or I (the staged
# epilogue mixes float16/float32 access_ptr).  GEMMs whose N no tile divides go to the CUDA-core
# schedule.


def _static(expr) -> int | None:
    return int(expr) if isinstance(expr, tirx.IntImm) else None


def _estimate(expr, batch: int = PLANNING_BATCH) -> int:
    """An extent at the planning batch: every symbolic variable (the batch) set to ``batch``."""
    if isinstance(expr, tirx.IntImm):
        return int(expr)
    analyzer = Analyzer()
    for var in undefined_vars(expr):
        analyzer.bind(var, tirx.IntImm(str(var.ty), batch))
    value = analyzer.simplify(expr)
    return int(value) if isinstance(value, tirx.IntImm) else batch


def _pick(configs, extents, num_sms: int, blocks_per_sm: int):
    """The largest tile that overshoots neither M nor N and still makes ``num_sms * blocks_per_sm``
    blocks at the planning batch (over all S matrices of a batched GEMM); failing that, the tile
    that makes the most blocks (and, of those, pads the least)."""
    s_expr, m_expr, n_expr, _ = extents
    matrices, m, n = _estimate(s_expr), _estimate(m_expr), _estimate(n_expr)
    fitting = [c for c in configs if c.bn <= max(n, min(c.bn for c in configs))
               and c.bm <= max(m, min(c.bm for c in configs))]
    best, best_key = None, None
    for cfg in fitting:
        rows, cols = math.ceil(m / cfg.bm), math.ceil(n / cfg.bn)
        if matrices * rows * cols >= num_sms * blocks_per_sm:
            return cfg
        key = (-rows * cols, rows * cfg.bm * cols * cfg.bn)
        if best_key is None or key < best_key:
            best, best_key = cfg, key
    return best


def pick_simt_config(extents, num_sms: int = DEFAULT_NUM_SMS) -> SimtConfig:
    """Tile for the GEMM with normalized extents ``(S, M, N, K)`` (M may be symbolic)."""
    cfg = _pick(SIMT_CONFIGS, extents, num_sms, blocks_per_sm=2)
    k = _estimate(extents[3])
    if k <= 8:
        cfg = SimtConfig(**{**cfg.__dict__, "bk": 8})
    return cfg


def pick_tensorcore_config(extents, num_sms: int = DEFAULT_NUM_SMS, k_steps: int = 2,
                           single_warp_columns: bool = True) -> TensorCoreConfig | None:
    """Tile for the tensor-core GEMM with normalized extents ``(S, M, N, K)`` and ``k_steps``
    fragment K steps per stage, of the tiles with one warp along J only if
    ``single_warp_columns`` (not for wmma); None when no such tile's N divides the GEMM's N (see
    TENSORCORE_CONFIGS).  A tile of TALL_TILE_ROWS only pays where K is at least TALL_TILE_MIN_K:
    over shorter K loops its fill and its epilogue outweigh it."""
    n, k = _static(extents[2]), _estimate(extents[3])
    configs = tuple(replace(c, tk=k_steps) for c in TENSORCORE_CONFIGS
                    if n is not None and n % c.bn == 0 and (c.wj > 1 or single_warp_columns)
                    and (c.bm < TALL_TILE_ROWS or k >= TALL_TILE_MIN_K))
    return _pick(configs, extents, num_sms, blocks_per_sm=2) if configs else None


# ------------------------------------------------------------------------------ GEMM analysis


def _gemm_block(sch: s_tir.Schedule):
    """The one reduction block of a GEMM-like PrimFunc (everything else spatial), or None."""
    blocks = sch.get_child_blocks(get_root_block(sch))
    reductions = get_reduction_blocks(sch, blocks)
    if reductions is None:
        return None
    main = reductions[0]
    if get_index_map(sch.get(main)) is None:
        return None
    return main


def _k_contiguous(block: tirx.SBlock, read: int) -> bool:
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


def _in_dtypes(block: tirx.SBlock) -> tuple[str, str, str]:
    return (str(block.reads[0].source.dtype), str(block.reads[1].source.dtype),
            str(block.writes[0].source.dtype))


def _normalize_gemm(sch: s_tir.Schedule, main):
    """dlight's normalisation: ``C[S, I, J] += A[S, I, K] * B[S, J, K]`` on reindexed buffers."""
    reindex_a = sch.reindex(main, ("read", 0))
    reindex_b = sch.reindex(main, ("read", 1))
    reindex_c = sch.reindex(main, ("write", 0))
    matmul_map, a_map, b_map, c_map = get_index_map(sch.get(main))
    sch.transform_layout(reindex_a, ("write", 0), a_map)
    sch.transform_layout(reindex_b, ("write", 0), b_map)
    sch.transform_layout(reindex_c, ("read", 0), c_map)
    sch.transform_block_layout(main, matmul_map)


# ------------------------------------------------------------------------------ CUDA-core GEMM


def _stage_operand(sch: s_tir.Schedule, main, index: int, scope: str, at, k_major: bool,
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


def schedule_gemm_simt(func: tirx.PrimFunc, pick: Callable | None = None,
                       pipeline: bool = True) -> s_tir.Schedule | None:
    """A GEMM-like PrimFunc (conv, matmul, + elementwise epilogue) on CUDA cores, or None.

    ``pick(extents) -> SimtConfig`` chooses the tile from the normalized ``(S, M, N, K)``.
    With ``pipeline`` the K loop is software pipelined: the global loads of tile k+1 go to
    registers before tile k is computed from the other half of a double-buffered shared tile.
    """
    sch = s_tir.Schedule(func)
    main = _gemm_block(sch)
    if main is None:
        return None
    block = sch.get(main)
    k_major = [_k_contiguous(block, 0), _k_contiguous(block, 1)]
    _normalize_gemm(sch, main)
    extents = [sch.get(lp).extent for lp in sch.get_loops(main)]
    cfg: SimtConfig = (pick or pick_simt_config)(extents)
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

    def fetch(index: int):
        shared, fused = _stage_operand(sch, main, index, "shared", ko, k_major[index], preserve_unit_loops=True)
        _, f_ty, f_tx, f_vec = sch.split(fused, [None, cfg.ty, cfg.tx, cfg.vec])
        sch.vectorize(f_vec)
        sch.bind(f_ty, "threadIdx.y")
        sch.bind(f_tx, "threadIdx.x")
        # Stored transposed, [k][row]: a thread's 4 rows at one k are one aligned float4, and the
        # 16 threads of a half-warp read 16 consecutive float4 (no bank conflicts).  The row pitch
        # bm + 4 (bn + 4) keeps the transposing stores at most 2-way conflicted.
        sch.transform_layout(shared, ("write", 0), lambda s, r, c: (s, c, r))
        sch.storage_align(shared, 0, axis=1, factor=32, offset=4)
        if pipeline:
            sch.annotate(shared, "tirx.manifest_shared_memory_local_stage", 1)
        return shared

    a_sh = fetch(0)
    b_sh = fetch(1)
    auto_inline_producers(sch, a_sh)
    auto_inline_producers(sch, b_sh)

    for index in (0, 1):  # registers: the thread's rows (columns) of A (B) at one k
        local = sch.cache_read(main, index, "local")
        sch.compute_at(local, ki, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(local)[-1])
    sch.unroll(ki)
    if pipeline:
        # ko's body: A global->regs, A regs->shared, B global->regs, B regs->shared, compute
        sch.annotate(ko, "software_pipeline_stage", [0, 0, 0, 0, 1])
        sch.annotate(ko, "software_pipeline_order", [0, 3, 1, 4, 2])

    auto_inline_consumer_chain(sch, l2g)
    sch.vectorize(sch.get_loops(l2g)[-1])
    sch.decompose_reduction(main, ko)
    return sch


# ------------------------------------------------------------------------------ tensor-core GEMM


def _fast_stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack()`` without the per-frame module search (``inspect.getmodule``)."""
    frame = sys._getframe(1)
    stack = []
    while frame is not None:
        code = frame.f_code
        line = linecache.getline(code.co_filename, frame.f_lineno)
        stack.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name,
                                       [line] if line else None, 0 if line else None))
        frame = frame.f_back
    return stack


def _tensor_core_intrinsics(mma: _mma.MmaType | None) -> dict[str, str]:
    """Names of ``mma``'s intrinsics (:mod:`hetero._mma`), registered once, with TVM's own CUDA
    intrinsics (the accumulator's fill and store are TVM's); for ``None`` TVM's f16 x f16 -> f32
    wmma intrinsics (B transposed, shared.dyn).

    Importing ``tvm.s_tir.tensor_intrin.cuda`` parses a few hundred TVMScript intrinsics, and the
    parser calls ``inspect.stack()`` for each: 20 s on a small machine, almost all of it in
    ``inspect.getmodule``.  The import runs with a lean ``inspect.stack`` (2 s).
    """
    with _IMPORT_LOCK:  # kernels are scheduled in parallel threads (ScheduleInParallel)
        if "tvm.s_tir.tensor_intrin.cuda" not in sys.modules:
            original = inspect.stack
            inspect.stack = _fast_stack
            try:
                import tvm.s_tir.tensor_intrin.cuda  # noqa: F401
            finally:
                inspect.stack = original
    if mma is not None:
        return _mma.register(mma)
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    return get_wmma_intrin_group(load_scope="shared.dyn", store_scope="shared.dyn",
                                 in_dtype="float16", out_dtype="float32", trans_b=True)


_IMPORT_LOCK = threading.Lock()


@dataclass(frozen=True)
class _TensorCoreKind:
    """What differs between the tensor-core GEMMs: ``mma.sync`` on fragments held in registers
    (TF32, and float16 from sm_80 on) or TVM's wmma fragments (float16 on sm_70 and sm_75)."""

    operand_dtype: str
    fragment_k: int  # K of one fragment
    k_steps: int  # fragments along K per shared-memory stage: 32 K elements in all kinds
    vector: tuple[int, int]  # global -> shared vector width: K-contiguous, transposing fetch
    align: tuple[int, int]  # shared row pitch = offset mod factor (conflict-free fragment reads)
    mma: _mma.MmaType | None  # None: wmma

    @property
    def scopes(self) -> tuple[str, str, str]:
        """Where the A, B and accumulator fragments live."""
        return ("warp",) * 3 if self.mma else ("wmma.matrix_a", "wmma.matrix_b", "wmma.accumulator")

    @property
    def tir_pipeline(self) -> str:
        """The TIR lowering its kernels need (see :func:`tir_pipeline`)."""
        return "hetero-mma" if self.mma else "hetero-wmma"


# float16: 8 x float16 = 16 bytes per load; a transposing (row-contiguous) fetch stores the vector
# element by element, which CUDA codegen only supports up to 4 lanes of float16
_MMA_F16 = _TensorCoreKind("float16", _mma.FLOAT16.k, 2, vector=(8, 4), align=(16, 8), mma=_mma.FLOAT16)
_WMMA_F16 = replace(_MMA_F16, mma=None)
_MMA_TF32 = _TensorCoreKind("float32", _mma.TF32.k, 4, vector=(4, 4), align=(16, 4), mma=_mma.TF32)


# Shared-memory tiles in a cp.async ring: one computed while the next loads.  Three (TVM's
# MultiLevelTilingTensorCore ring) took 121 KB for a 128x128 tf32 tile, one block per SM; with two,
# resnet-50 ran 13% faster in tf32 on an H200 (benchmarks/HISTORY.md, "A cp.async ring of two tiles").
ASYNC_STAGES = 2


def _copies_async(k_major: list[bool], k_extent, bk: int, vector: int) -> bool:
    """Whether a tensor-core GEMM fills its shared tiles with ``cp.async`` (see benchmarks/HISTORY.md,
    "K tiles of 32 and cp.async tile loads").  Not when an operand is fetched transposed (TVM's
    InjectPTXAsyncCopy then copies a strided vector as if it were contiguous: vgg-16's dense
    layers faulted with a misaligned address), not when K is not a whole number of vectors (the copies would shrink
    to 4 bytes), and not for K loops shorter than the ring: with one stage, vgg-16's first conv
    (K=27) took 5.7 ms instead of 0.5 and mobilenet ran 3.7x slower in tf32 on an H100."""
    k = _static(k_extent)
    return all(k_major) and k is not None and k % vector == 0 and k // bk >= ASYNC_STAGES


def schedule_gemm_tensorcore(func: tirx.PrimFunc, pick: Callable | None = None,
                             kind: _TensorCoreKind = _MMA_F16, async_copy: bool = True) -> s_tir.Schedule | None:
    """A GEMM-like PrimFunc on tensor cores (``mma.sync``, float32 accumulation), or None: float16
    operands, or with ``kind=_MMA_TF32`` float32 operands read as TF32.

    The structure is dlight's ``MatmulTensorization`` (register-staged double-buffered shared
    tiles, software pipeline, fragment loads, staged epilogue), with a tile chosen per kernel and
    its primitives reordered so that it also works for convs whose M is ``n*H*W``: dlight's order
    (blockize first) leaves TVM unable to prove that the padded tile covers the un-padded rows.
    With ``async_copy``, GEMMs that qualify (see :func:`_copies_async`) fill the shared tiles
    with ``cp.async`` instead, in a ring of ASYNC_STAGES; that needs :func:`tir_pipeline`.
    """
    sch = s_tir.Schedule(func)
    main = _gemm_block(sch)
    if main is None:
        return None
    block = sch.get(main)
    a_dtype, b_dtype, c_dtype = _in_dtypes(block)
    if (a_dtype, b_dtype, c_dtype) != (kind.operand_dtype, kind.operand_dtype, "float32"):
        return None
    k_major = [_k_contiguous(block, 0), _k_contiguous(block, 1)]
    _normalize_gemm(sch, main)
    extents = [sch.get(lp).extent for lp in sch.get_loops(main)]
    cfg: TensorCoreConfig = (pick or pick_tensorcore_config)(extents)
    if cfg is None:
        return None
    n_static = _static(extents[2])
    if n_static is None or n_static % cfg.bn:
        return None  # padding N breaks the vectorized epilogue's codegen: CUDA cores take it
    frag_k = kind.fragment_k
    bk = frag_k * cfg.tk
    async_copy = async_copy and _copies_async(k_major, extents[3], bk, kind.vector[0])

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
    num_warps = cfg.wi * cfg.wj

    def fetch(index: int):
        shared, fused = _stage_operand(sch, main, index, "shared.dyn", k0, k_major[index])
        vec = kind.vector[0] if k_major[index] else kind.vector[1]
        _, f_ty, f_tx, f_vec = sch.split(fused, [None, num_warps, 32, vec])
        sch.bind(f_tx, "threadIdx.x")
        sch.bind(f_ty, "threadIdx.y")
        sch.vectorize(f_vec)
        sch.storage_align(shared, 0, axis=-2, factor=kind.align[0], offset=kind.align[1])
        if not async_copy:
            sch.annotate(shared, "tirx.manifest_shared_memory_local_stage", 1)
            sch.annotate(shared, "double_buffer_scope", 0)
        return shared

    a_sh = fetch(0)
    b_sh = fetch(1)
    auto_inline_producers(sch, a_sh)
    auto_inline_producers(sch, b_sh)

    a_scope, b_scope, accumulator_scope = kind.scopes
    a_mat = sch.cache_read(main, 0, a_scope)
    b_mat = sch.cache_read(main, 1, b_scope)
    sch.compute_at(a_mat, k1)
    sch.compute_at(b_mat, k1)

    acc_s2g = sch.cache_write(main, 0, "shared.dyn")
    sch.storage_align(acc_s2g, 0, -2, 16, 4)
    store = sch.cache_write(main, 0, accumulator_scope)
    sch.reverse_compute_at(store, warp)
    sch.reverse_compute_at(acc_s2g, warp)
    si, sj = sch.get_loops(store)[-2:]
    si0, si1 = sch.split(si, [None, 16])
    sj0, sj1 = sch.split(sj, [None, 16])
    sch.reorder(si0, sj0, si1, sj1)
    # The epilogue goes in before blockize: after it, every primitive on this scope fails
    # ("not a stage pipeline") because the un-padding consumer's region cover is lost.
    auto_inline_consumer_chain(sch, acc_s2g)

    block_outer = sch.blockize(i_inner)
    init = sch.decompose_reduction(block_outer, k0)
    init_inner = sch.get_child_blocks(init)[0]

    intrin = _tensor_core_intrinsics(kind.mma)  # first: the accumulator layout is TVM's, from the module it imports
    if kind.mma:  # fragments held as (lane, register) in warp-scope buffers
        sch.transform_layout(a_mat, ("write", 0), lambda s, r, c: (s, r // 16, c // frag_k,
                                                                   *kind.mma.a_layout(r % 16, c % frag_k)))
        sch.transform_layout(b_mat, ("write", 0), lambda s, r, c: (s, r // 16, c // frag_k,
                                                                   *kind.mma.b_layout(r % 16, c % frag_k)))
        sch.transform_layout(store, ("read", 0), lambda s, r, c: (s, r // 16, c // 16,
                                                                  *_mma.c_layout(r % 16, c % 16)))

    for mat, name in ((a_mat, "load_a"), (b_mat, "load_b")):
        li, lj = sch.get_loops(mat)[-2:]
        li0, li1 = sch.split(li, [None, 16])
        lj0, lj1 = sch.split(lj, [None, frag_k])
        sch.reorder(li0, lj0, li1, lj1)
        sch.unroll(li0)
        sch.unroll(lj0)
        sch.tensorize(li1, intrin[name])
    init_loops = sch.get_loops(init_inner)
    sch.tensorize(init_loops[-2], intrin["init"])
    sch.tensorize(sch.get_loops(store)[-2], intrin["store"])
    sch.tensorize(sch.get_loops(main)[-3], intrin["compute"])
    if kind.mma:
        # fragments are plain register arrays here: a loop over them that nvcc leaves rolled
        # indexes them at run time, which moves them to (slow, local) memory
        for loop in (i2, j2, si0, sj0, *init_loops[-4:-2]):
            sch.unroll(loop)

    if async_copy:
        sch.annotate(k0, "software_pipeline_async_stages", [0])
        # A and B tile copies in stage 0, all fragment loads and MMAs (the k1 pipeline) in stage 1
        sch.annotate(k0, "software_pipeline_stage", [0, 0, 1, 1, 1])
        sch.annotate(k0, "software_pipeline_order", [0, 1, 2, 3, 4])
    else:
        sch.annotate(k0, "software_pipeline_order", [0, 3, 1, 4, 5, 2, 6])
        sch.annotate(k0, "software_pipeline_stage", [0, 0, 0, 0, 0, 1, 1])
    sch.annotate(k1, "software_pipeline_order", [0, 1, 2])
    sch.annotate(k1, "software_pipeline_stage", [0, 0, 1])

    fused = sch.fuse(*sch.get_loops(acc_s2g)[-2:])
    _, f_tx, f_vec = sch.split(fused, [None, 32, 4])
    sch.bind(f_tx, "threadIdx.x")
    sch.vectorize(f_vec)
    return sch


# ------------------------------------------------------------------------------ small reductions

_get_sblock_realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")



def schedule_small_reduction(func: tirx.PrimFunc, max_reduction: int = 64,
                             threads: int = 256) -> s_tir.Schedule | None:
    """One output per thread, the reduction (at most ``max_reduction`` elements) in a register.

    For depthwise convs and pools: the spatial loops are fused (channel innermost, so in NHWC a
    warp reads consecutive channels), producers (padding) inlined into the reads, the epilogue
    into the write-back.  None when the PrimFunc is not one reduction block plus spatial blocks.
    """
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(get_root_block(sch))
    reductions = get_reduction_blocks(sch, blocks)
    if reductions is None:
        return None
    main = reductions[0]
    block = sch.get(main)
    loops = sch.get_loops(main)
    if len(loops) != len(block.iter_vars):
        return None
    size = 1
    for iv in block.iter_vars:
        if iv.iter_type == tirx.IterVar.CommReduce:
            extent = _static(iv.dom.extent)
            if extent is None:
                return None
            size *= extent
    if size > max_reduction:
        return None
    # a freshly legalized block: loop i binds iter var i (trivial binding)
    realize = _get_sblock_realize(sch, main)
    spatial, reduce = [], []
    for loop, iv, value in zip(loops, block.iter_vars, realize.iter_values):
        if not value.same_as(sch.get(loop).loop_var):
            return None
        (reduce if iv.iter_type == tirx.IterVar.CommReduce else spatial).append(loop)
    if not spatial or not reduce:
        return None
    auto_inline_producers(sch, main)
    sch.reorder(*spatial, *reduce)
    fused = sch.fuse(*spatial)
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    l2g = sch.cache_write(main, 0, "local")
    sch.reverse_compute_at(l2g, tx, preserve_unit_loops=True)
    auto_inline_consumer_chain(sch, l2g)
    sch.decompose_reduction(main, reduce[0])
    for loop in reduce:
        sch.unroll(loop)
    return sch


# ------------------------------------------------------------------------------ rules & pipeline


_TVM_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AssertionError)


class _Rule(ScheduleRule):
    """A schedule function as a dlight rule.  The ``errors`` it raises mean "not for this
    function": for hetero's rules TVM's errors (schedule primitives that do not apply, kernels
    that fail to lower), so that Python's own (a NameError) are bugs and propagate; for dlight's
    rules, any."""

    def __init__(self, name: str, fn: Callable[[tirx.PrimFunc, tvm.target.Target], s_tir.Schedule | None],
                 errors: tuple[type[Exception], ...] = _TVM_ERRORS):
        self.name = name
        self.fn = fn
        self.errors = errors

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        try:
            return self.fn(func, target)
        except self.errors as exc:
            lines = str(exc).strip().splitlines()
            logger.debug("%s does not schedule a function: %s", self.name,
                         lines[-1] if lines else type(exc).__name__)
            return None


def _generate_code(func: tirx.PrimFunc, target: tvm.target.Target, pipeline: str) -> None:
    """Lower ``func`` on its own and generate its CUDA code (TVM raises where it cannot)."""
    func = func.with_attr("global_symbol", "main").with_attr("target", target)
    tvm.tirx.build(tvm.IRModule({"main": func}), target=target, pipeline=pipeline)


def _lowers(sch: s_tir.Schedule | None, target: tvm.target.Target,
            pipeline: str = "default") -> s_tir.Schedule | None:
    """``sch`` if its function lowers and generates CUDA code on its own (None stays None)."""
    if sch is not None:
        _generate_code(sch.mod["main"], target, pipeline)
    return sch


@tvm.transform.module_pass(opt_level=0, name="hetero.LowerAllWarpMemory")
def _lower_all_warp_memory(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """TVM 0.27's ``LowerWarpMemory`` lowers the first warp-scope buffer of a scope per run (the
    TF32 GEMM has three: A, B and accumulator fragments); the rest would stay 32x too large, in
    local memory.  Run it until nothing changes."""
    for _ in range(16):
        lowered = tirx.transform.LowerWarpMemory()(mod)
        if tvm_ffi.structural_equal(lowered, mod):
            break
        mod = lowered
    return mod


def _tensorcore_tir_pipeline(warp_fragments: bool):
    """TVM's s_tir lowering with ``cp.async`` on (``InjectPTXAsyncCopy``, for the asynchronous
    stage of the tensor-core GEMMs).  For fragments held in warp memory (``mma.sync``) also
    common-subexpression elimination off (it hides the ``threadIdx.x * 4`` of fragment stores
    behind let variables, which ``LowerWarpMemory`` cannot read) and warp memory lowered to the
    last buffer."""
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    lower, finalize_host, finalize_device = default_s_tir_pipeline()
    config_changes = {"tirx.use_async_copy": True, **({"tirx.disable_cse_tir": True} if warp_fragments else {})}

    lower_tirx = tvm.tirx.compilation_pipeline.tirx_pipeline()[0]

    @tvm.transform.module_pass(opt_level=0, name="hetero.TensorCoreLowering")
    def lower_for_tensor_cores(mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        written = {gv: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and f.attrs
                   and f.attrs.get(wgmma.KERNEL_ATTR, False)}  # tirx kernels take TVM's tirx lowering
        scheduled = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv not in written}, attrs=mod.attrs)
        with tvm.transform.PassContext(opt_level=ctx.opt_level, config={**dict(ctx.config), **config_changes}):
            lowered = lower(scheduled)
        if written:
            lowered.update(lower_tirx(tvm.IRModule(written, attrs=mod.attrs)))
        return lowered

    if warp_fragments:
        def finalize_device():
            return tvm.transform.Sequential([_lower_all_warp_memory, tirx.transform.StmtSimplify(),
                                             tirx.transform.LowerIntrin()])

    return lower_for_tensor_cores, finalize_host, finalize_device


for _kind in (_MMA_F16, _WMMA_F16):
    tvm.tirx.compilation_pipeline.register_tir_pipeline(
        _kind.tir_pipeline, lambda warp_fragments=_kind.mma is not None: _tensorcore_tir_pipeline(warp_fragments))


def _tensor_core_kind(target: tvm.target.Target, precision: str) -> _TensorCoreKind | None:
    """The tensor-core GEMM ``target`` runs in ``precision``: TF32 and float16 on ``mma.sync`` from
    sm_80 on, float16 on wmma on sm_70 and sm_75; None for fp32 and GPUs without them."""
    if target.kind.name != "cuda" or precision == "fp32":
        return None
    sm = _sm_version(target)
    if precision == "tf32":
        return _MMA_TF32 if sm >= 80 else None
    return _MMA_F16 if sm >= 80 else _WMMA_F16 if sm >= 70 else None


def effective_precision(target: tvm.target.Target, precision: str) -> str:
    """The precision ``target`` computes ``precision`` in: ``"tf32"`` is ``"fp32"`` on GPUs without
    TF32 tensor cores (before sm_80), whose CUDA cores would gain nothing from rounding the
    operands and lose their precision."""
    return "fp32" if precision == "tf32" and _tensor_core_kind(target, precision) is None else precision


def tir_pipeline(precision: str, target: tvm.target.Target) -> str:
    """The TIR lowering (``tir_pipeline`` of ``relax.build``) that :func:`gpu_pipeline`'s kernels
    need in ``precision`` on ``target``."""
    kind = _tensor_core_kind(target, precision)
    return kind.tir_pipeline if kind else "default"


def _sm_version(target: tvm.target.Target) -> int:
    arch = str(target.attrs.get("arch", ""))
    digits = arch.replace("sm_", "").rstrip("a")
    return int(digits) if digits.isdigit() else 0


def gpu_rules(target: tvm.target.Target, precision: str = "fp32", num_sms: int = DEFAULT_NUM_SMS,
              tensor_cores: bool | None = None, verify: bool = True,
              trace: Callable[[str, object, list], None] | None = None,
              software_pipeline: bool = True, async_copy: bool = True,
              use_wgmma: bool = True) -> list[ScheduleRule]:
    """The schedule rules of :func:`gpu_pipeline`, in the order they are tried: on sm_90a in TF32 and
    float16, hetero.wgmma's conv kernels first (``use_wgmma``).

    With ``verify``, a tensor-core schedule is only used when its function generates code on its
    own (~0.1 s a kernel): TVM 0.27 fails to lower some tile/shape combinations, and one kernel
    that fails would fail the whole build.  ``trace(rule, config, extents)`` is told each GEMM
    tile picked (see :func:`describe_schedules`).
    """
    from tvm.s_tir import dlight as dl

    kind = _tensor_core_kind(target, precision)
    if tensor_cores is None:
        tensor_cores = kind is not None

    def traced(rule: str, pick: Callable) -> Callable:
        def picker(extents):
            cfg = pick(extents, num_sms)
            if trace is not None:
                trace(rule, cfg, extents)
            return cfg
        return picker

    rules: list[ScheduleRule] = []
    if tensor_cores and kind in (_MMA_TF32, _MMA_F16) and use_wgmma and wgmma.supports(target):

        def wgmma_conv(func, tgt):
            conv = wgmma.match_conv(func)
            if conv is None:
                return None
            extents = conv.extents()
            bn = wgmma.pick_block_n(_estimate(extents[2]), _estimate(extents[1]), num_sms)
            if bn is None:
                return None
            if trace is not None:
                trace("wgmma-conv", wgmma.Tile(wgmma.BM, bn, conv.row), extents)
            kernel = wgmma.conv_kernel(func, conv, bn)
            if verify:  # as the tensor-core rule checks its schedules
                _generate_code(kernel, tgt, "tirx")
            return kernel

        rules.append(_Rule("wgmma-conv", wgmma_conv))
    if tensor_cores and kind is not None:

        def tensorcore(func, tgt):
            pick = functools.partial(pick_tensorcore_config, k_steps=kind.k_steps,
                                     single_warp_columns=kind.mma is not None)
            sch = schedule_gemm_tensorcore(func, traced("tensorcore-gemm", pick), kind, async_copy)
            return _lowers(sch, tgt, kind.tir_pipeline) if verify else sch

        rules.append(_Rule("tensorcore-gemm", tensorcore))
    rules += [
        _Rule("simt-gemm", lambda f, t: schedule_gemm_simt(f, traced("simt-gemm", pick_simt_config),
                                                           pipeline=software_pipeline)),
        _Rule("small-reduction", lambda f, t: schedule_small_reduction(f)),
    ]
    for rule in (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction()):
        rules.append(_Rule(f"dlight.{type(rule).__name__}", lambda f, t, r=rule: r.apply(f, t, False),
                           errors=(Exception,)))
    rules.append(_NamedRule("dlight.Fallback", dl.gpu.Fallback()))  # the last resort: never skipped
    return rules


class _NamedRule(ScheduleRule):
    def __init__(self, name: str, rule: ScheduleRule):
        self.name = name
        self.rule = rule

    def apply(self, func, target, tunable):
        return self.rule.apply(func, target, tunable)


def _first_applying_rule(rules: Sequence[ScheduleRule], func: tirx.PrimFunc,
                         target: tvm.target.Target) -> tuple[ScheduleRule, s_tir.Schedule] | None:
    """The first of ``rules`` that schedules ``func``, and its schedule (dlight's order)."""
    with target:  # the current target is per thread
        for rule in rules:
            space = rule.apply(func, target, False)
            if space is not None:  # a schedule, or a kernel written out (hetero.wgmma)
                return rule, space if isinstance(space, (s_tir.Schedule, tirx.PrimFunc)) else space[0]
    return None


@tvm.transform.module_pass(opt_level=0, name="hetero.ScheduleInParallel")
class ScheduleInParallel:
    """dlight's ``ApplyDefaultSchedule`` with the PrimFuncs scheduled in ``workers`` threads.

    Checking that a tensor-core schedule lowers (``gpu_rules(verify=True)``) lowers its kernel on
    its own, about half of a CUDA build's time; TVM releases the GIL while it lowers, so the
    kernels' checks overlap."""

    def __init__(self, rules: Sequence[ScheduleRule], target: tvm.target.Target, workers: int | None = None):
        self.rules = list(rules)
        self.target = target
        self.workers = workers or os.cpu_count() or 1

    def _schedule(self, func: tirx.PrimFunc) -> tirx.PrimFunc | None:
        applied = _first_applying_rule(self.rules, func, self.target)
        if applied is None:
            return None
        scheduled = applied[1] if isinstance(applied[1], tirx.PrimFunc) else applied[1].mod["main"]
        return scheduled.with_attr("tirx.is_scheduled", True)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        todo = [(gv, func) for gv, func in mod.functions_items()
                if isinstance(func, tirx.PrimFunc) and not func.attrs.get("tirx.is_scheduled", False)]
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            scheduled = list(pool.map(lambda item: self._schedule(item[1]), todo))
        for (gv, _), func in zip(todo, scheduled):
            if func is not None:
                mod[gv] = func
        return mod


# ------------------------------------------------------------------------- 32-bit indices

MAX_BATCH_FUNCTION = "hetero_max_batch"  # the largest batch one call of a narrowed module takes
_INT32_MAX = 2**31 - 1
# a GEMM's M (one row per pixel) is padded to its tile: at most this many rows
_PADDED_ROWS = max(c.bm for c in (*SIMT_CONFIGS, *TENSORCORE_CONFIGS))


def _buffers(func: tirx.PrimFunc) -> list[tirx.Buffer]:
    """Every buffer an unscheduled PrimFunc reads, writes or allocates."""
    sch = s_tir.Schedule(func)
    found, todo = [], [get_root_block(sch)]
    while todo:
        block_rv = todo.pop()
        block = sch.get(block_rv)
        found += [*block.alloc_buffers, *(region.source for region in (*block.reads, *block.writes))]
        todo += sch.get_child_blocks(block_rv)
    return found


def _batch_limit(func: tirx.PrimFunc, max_elements: int) -> int | None:
    """The largest batch at which no buffer of ``func`` has more than ``max_elements`` elements
    (padded GEMM rows included), nor more than an int32 byte offset reaches: TVM's ``cp.async``
    helper takes its source offset as an int and multiplies it by the element size in int.  vgg-16's
    tf32 module, limited to 400 samples before, faulted (illegal address) while profiled at 128 or
    256 samples: at 256 its convs read 822M floats from one buffer, 3.3 GB.  None if the shapes of
    ``func`` do not depend on the batch."""
    probe = 1 << 20
    per_sample = per_sample_bytes = 0
    for buffer in _buffers(func):
        elements = functools.reduce(lambda a, b: a * b, buffer.shape, tirx.IntImm("int64", 1))
        if undefined_vars(elements):
            count = -(-_estimate(elements, probe) // probe)
            per_sample = max(per_sample, count)
            per_sample_bytes = max(per_sample_bytes, count * buffer.dtype.bits // 8)
    if not per_sample:
        return None
    return min(max_elements // per_sample - _PADDED_ROWS, _INT32_MAX // per_sample_bytes)


def narrow_batch_indices(max_elements: int = _INT32_MAX) -> tvm.transform.Pass:
    """Index arithmetic in int32 for every kernel (``ForceNarrowIndexToInt32``), run before
    scheduling, and the batch that keeps it exact recorded as the module's
    :data:`MAX_BATCH_FUNCTION`.

    The batch is a symbolic int64, so every index, loop and ``cp.async`` predicate of a kernel
    was int64 arithmetic: 64-bit divisions and modulos by constants in the K loop of every conv,
    and registers.  In int32, vgg-16 ran 11% and resnet-34 13% faster in tf32 on an H200
    (benchmarks/HISTORY.md, "int32 index arithmetic").  A module so narrowed is exact for batches up to
    the recorded limit (vgg-16: 164); hetero's engines run larger batches in calls of that size.
    """

    @tvm.transform.module_pass(opt_level=0, name="hetero.NarrowBatchIndices")
    def narrow(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        unscheduled = tvm.IRModule({gv: func for gv, func in mod.functions_items()
                                    if isinstance(func, tirx.PrimFunc)
                                    and not func.attrs.get("tirx.is_scheduled", False)})
        limits = [limit for func in unscheduled.functions.values()
                  if (limit := _batch_limit(func, max_elements)) is not None]
        if not limits or min(limits) < 1:  # not even one sample fits: leave the int64 arithmetic
            return mod
        for gv, func in tirx.transform.ForceNarrowIndexToInt32()(unscheduled).functions_items():
            mod[gv] = func
        builder = relax.BlockBuilder()
        with builder.function(MAX_BATCH_FUNCTION, []):
            builder.emit_func_output(relax.prim_value(tirx.IntImm("int64", min(limits))))
        mod[MAX_BATCH_FUNCTION] = builder.get()[MAX_BATCH_FUNCTION]
        return mod

    return narrow


def recorded_max_batch(vm: relax.VirtualMachine) -> int | None:
    """The batch limit :func:`narrow_batch_indices` recorded in ``vm``'s module, None if none."""
    return int(vm[MAX_BATCH_FUNCTION]()) if vm.module.implements_function(MAX_BATCH_FUNCTION) else None


def _with_weights_prepared_once(mod: tvm.IRModule, precision: str, layout: str) -> tvm.IRModule:
    """:func:`prepare_module`, then everything computed from the weights alone (OHWI transposes,
    float16 casts, bias reshapes) moved out of ``main`` into ``main_transform_params``, which an
    engine runs once (hetero.compile.module_weights) instead of on every call."""
    return relax.transform.LiftTransformParams()(prepare_module(mod, precision, layout))


def _fusion_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """What :func:`gpu_pipeline` runs between the Relax rewrites and scheduling."""
    from tvm.relax.backend.cuda import pipeline as cuda

    return cuda.library_dispatch_passes(target) + [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


def fused_module(mod: tvm.IRModule, target: tvm.target.Target, precision: str = "fp32",
                 layout: str = "NHWC") -> tvm.IRModule:
    """``mod`` as :func:`gpu_pipeline` has it just before scheduling: the PrimFuncs to schedule (and
    MetaSchedule's tuning tasks)."""
    with target:
        mod = _with_weights_prepared_once(mod, precision, layout)
        return tvm.transform.Sequential(_fusion_passes(target))(mod)


@dataclass(frozen=True)
class KernelSchedule:
    """How :func:`gpu_pipeline` schedules one fused PrimFunc."""

    name: str
    rule: str  # the rule that scheduled it, e.g. "simt-gemm", "dlight.Fallback"
    tile: object | None = None  # SimtConfig / TensorCoreConfig for the GEMM rules
    m: int | None = None  # GEMM extents, M at the planning batch
    n: int | None = None
    k: int | None = None


def describe_schedules(mod: tvm.IRModule, target: tvm.target.Target, precision: str = "fp32", *,
                       layout: str = "NHWC", num_sms: int = DEFAULT_NUM_SMS,
                       tensor_cores: bool | None = None) -> list[KernelSchedule]:
    """Which rule (and tile) :func:`gpu_pipeline` gives each kernel of ``mod``; builds nothing."""
    picked: list = []
    rules = gpu_rules(target, precision, num_sms, tensor_cores,
                      trace=lambda rule, cfg, ext: picked.append((rule, cfg, ext)))
    out = []
    fused = narrow_batch_indices()(fused_module(mod, target, precision, layout))  # as gpu_pipeline schedules
    for gv, func in sorted(fused.functions_items(), key=lambda item: item[0].name_hint):
        if not isinstance(func, tirx.PrimFunc):
            continue
        picked.clear()
        applied = _first_applying_rule(rules, func, target)
        if applied is None:
            continue
        rule = applied[0]
        mine = [p for p in picked if p[0] == rule.name]  # earlier rules may have picked, then failed
        if mine:
            _, cfg, ext = mine[-1]
            out.append(KernelSchedule(gv.name_hint, rule.name, cfg, _estimate(ext[1]),
                                      _estimate(ext[2]), _estimate(ext[3])))
        else:
            out.append(KernelSchedule(gv.name_hint, rule.name))
    return out


def gpu_pipeline(target: tvm.target.Target, precision: str = "fp32", *, layout: str = "NHWC",
                 num_sms: int = DEFAULT_NUM_SMS, tensor_cores: bool | None = None,
                 software_pipeline: bool = True, async_copy: bool = True, weights_once: bool = True,
                 narrow_index: bool = True, records: str | None = None,
                 use_wgmma: bool = True) -> tvm.transform.Pass:
    """The Relax -> VM pipeline for a CUDA ``target`` with hetero's rewrites and schedules.

    ``precision`` is ``"fp32"`` or ``"fp16"`` (float16 storage and tensor cores, float32
    accumulation; inputs and outputs stay float32).  ``layout="NCHW"`` skips the NHWC conversion,
    ``tensor_cores=False`` the tensor-core schedule (default: on for fp16 on sm_70 and newer),
    ``software_pipeline=False`` the register-prefetch pipelining of the CUDA-core GEMM's K loop,
    ``async_copy=False`` the ``cp.async`` tile loads of the tensor-core GEMMs,
    ``weights_once=False`` the lifting of weight-only work out of ``main`` (so it runs per call),
    ``narrow_index=False`` the int32 index arithmetic (:func:`narrow_batch_indices`),
    ``use_wgmma=False`` the wgmma conv kernels of sm_90a in TF32 and float16 (:mod:`hetero.wgmma`).
    ``records``, a MetaSchedule database folder (hetero.tune), schedules the kernels it has records
    for; hetero's rules schedule the rest.
    ``num_sms`` (streaming multiprocessors) steers the tile choice.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    precision = effective_precision(target, precision)
    from tvm.relax.backend.cuda import pipeline as cuda

    @tvm.transform.module_pass(opt_level=0, name="hetero.GPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target, (s_tir.meta_schedule.database.JSONDatabase(work_dir=records) if records
                      else contextlib.nullcontext()):
            mod = (_with_weights_prepared_once if weights_once else prepare_module)(mod, precision, layout)
            seq = tvm.transform.Sequential(
                _fusion_passes(target)
                + ([relax.transform.MetaScheduleApplyDatabase()] if records else [])
                + ([narrow_batch_indices()] if narrow_index else [])
                + [
                    ScheduleInParallel(gpu_rules(target, precision, num_sms, tensor_cores,
                                                 software_pipeline=software_pipeline,
                                                 async_copy=async_copy, use_wgmma=use_wgmma), target),
                ]
                + cuda.dataflow_lower_passes(target)
                + cuda.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
