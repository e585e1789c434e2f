"""Tuning-free CPU schedules for the Relax CPU pipeline of TVM 0.27.

TVM 0.27's ``relax.backend.cpu_generic`` pipeline legalizes every operator to
TIR and applies no schedule at all, so every kernel runs as a single-threaded
scalar loop nest.  :func:`.pipeline.cpu_pipeline` is that same pipeline with one
extra pass, :class:`hetero.schedules.base.rule.ScheduleKernels`, inserted after
legalization and fusion, which schedules every PrimFunc with the first rule of
:data:`RULES` that applies (each rule in a module of its own):

* :class:`.conv2d.Conv2D` -- NCHW conv2d (groups 1, any kernel/stride/padding):
  weights packed to output-channel slabs once, when the engine loads (the
  packing block is split out of the kernel and lifted into
  ``main_transform_params``), output channels vectorised, a register tile of
  output columns x channel vectors, bias/residual/relu epilogue applied per
  tile;
* :class:`.dense.Dense` -- matmul with (K, N) weights: reduction split across
  cores (rfactor), so batch 1 is parallel and weight rows stream;
* :class:`.window.Window` -- depthwise / grouped conv2d and pooling: output
  columns vectorised, window unrolled, padded input produced per (n, c) task
  (column-deinterleaved for stride > 1 so vector loads stay contiguous);
* :class:`.generic.Generic` -- anything else: inline elementwise blocks, fuse and
  parallelise outer spatial loops, vectorise the innermost spatial loop
  (reduction loops moved outside it);
* :class:`.parallel_only.ParallelOnly`, and finally the unscheduled function: a
  rule that TVM refuses is skipped, so an unexpected PrimFunc never fails the build.

What several rules share is in :mod:`.common`.  All schedules keep the batch
dimension symbolic.  Also applied: the :func:`.pipeline.mark_trivial_noalias` fix
for a TVM codegen pitfall, see there.

Runtime note: TVM's thread pool uses half the logical CPUs by default on
x86 (it assumes hyper-threading): one thread on a 2-vCPU machine.  hetero's
engine raises that (``hetero.engines.tvm``); set ``TVM_NUM_THREADS`` elsewhere.
"""

from ..base.rule import Rule
from .conv2d import Conv2D
from .dense import Dense
from .generic import Generic
from .parallel_only import ParallelOnly
from .window import Window

__all__ = ["RULES", "Conv2D", "Dense", "Generic", "ParallelOnly", "Window"]

RULES: list[Rule] = [
    Conv2D(),
    Dense(),
    Window(),
    Generic(),
    ParallelOnly(),
]
