"""Index arithmetic in int32 for every kernel, and the largest batch for which that is exact."""

from __future__ import annotations

import functools

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.tirx.analysis import undefined_vars

from ..base.analysis import estimate
from .tiles import SIMT_CONFIGS, TENSORCORE_CONFIGS

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
            count = -(-estimate(elements, probe) // probe)
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
        # a kernel of int64 data (a BERT's token ids and mask) keeps int64 indices: the pass refuses its buffers
        narrowable = tvm.IRModule({gv: func for gv, func in unscheduled.functions_items()
                                   if all(buffer.dtype != "int64" for buffer in _buffers(func))})
        for gv, func in tirx.transform.ForceNarrowIndexToInt32()(narrowable).functions_items():
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
