"""Long-K matmuls cut along K, so that they make enough blocks to fill the GPU."""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ...base.analysis import estimate, static
from ..tiles import DEFAULT_NUM_SMS
from .tensors import map_functions, tensor_shape

# A GEMM with fewer tiles than SMs and a K this long is split along K (split_k).
SPLIT_K_MIN_K = 4096
_SPLIT_K_TILE = 128  # the tile edge split_k counts blocks with
_SPLIT_K_MIN_PART = 256  # the shortest K a split leaves each part
_K_TILE = 32  # K of a tensor-core GEMM's shared-memory stage (the CUDA-core GEMM's 16 divides it)


def _k_splits(call: relax.Call, num_sms: int) -> int:
    """Into how many parts ``split_k`` cuts the K of ``call`` (1: not a long-K matmul)."""
    if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul" and len(call.args) == 2):
        return 1
    shapes = [tensor_shape(a) for a in call.args]
    if any(shape is None or len(shape) != 2 for shape in shapes):
        return 1
    (m, k), (_, n) = shapes
    k, n = static(k), static(n)
    if k is None or n is None or k < SPLIT_K_MIN_K:
        return 1
    blocks = math.ceil(estimate(m) / _SPLIT_K_TILE) * math.ceil(n / _SPLIT_K_TILE)
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
        (m, k), (_, n) = tensor_shape(x), tensor_shape(w)
        part = static(k) // splits
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
    return map_functions(mod, lambda f: _SplitK().visit_expr(f))
