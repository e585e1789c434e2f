"""The CPU pipeline: TVM's cpu_generic pipeline with hetero's rules scheduling every kernel after fusion."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.backend.cpu_generic import pipeline as _cpu_generic

from ..base.rule import Rule, ScheduleKernels
from . import RULES


def _buffer_param_count(func: tirx.PrimFunc) -> int:
    count = 0
    for param in func.params:
        if isinstance(getattr(param, "ty", None), tirx.buffer.BufferType):
            count += 1
    return count


@tvm.transform.module_pass(opt_level=0, name="MarkTrivialNoAlias")
def mark_trivial_noalias(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Mark PrimFuncs with at most one buffer parameter ``tirx.noalias``.

    TVM 0.27's LLVM codegen gives every buffer of *every* function in the
    module the same TBAA alias class as soon as one function of the module
    lacks ``tirx.noalias``.  VMShapeLower's ``shape_func`` (a single
    shape-heap buffer) is such a function; without this pass LLVM cannot keep
    the register-tiled conv accumulators in registers (stores after every
    FMA, ~2.3x slower conv kernels).  With a single buffer parameter the
    no-alias promise is trivially true.
    """
    updates = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and "tirx.noalias" in func.attrs:
            continue
        if _buffer_param_count(func) <= 1:
            updates[gvar] = func.with_attr("tirx.noalias", True)
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


def fusion_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """What :func:`cpu_pipeline` runs before scheduling: library dispatch, legalization, fusion.

    MetaSchedule's tasks are taken from exactly this IR (hetero.tune), so that its records match the
    functions a later build schedules.
    """
    return _cpu_generic.library_dispatch_passes(target) + _cpu_generic.legalize_passes(target)


def cpu_pipeline(
    target: tvm.target.Target, rules: Sequence[Rule] | None = None, records: str | None = None
) -> tvm.transform.Pass:
    """cpu_generic's default pipeline plus :class:`ScheduleKernels` with ``rules`` after fusion,
    then the weight packing they mark split out of the kernels and lifted into
    ``main_transform_params`` (run once by hetero.compile.module_weights).

    ``rules`` overrides :data:`RULES` (for experiments, e.g. a variant of the conv rule; ``[]``
    gives the unscheduled default pipeline plus the no-alias fix).  ``records``, a MetaSchedule
    database folder, schedules the functions it has records for; the rules schedule the rest.
    """
    rules = RULES if rules is None else list(rules)

    @tvm.transform.module_pass(opt_level=0, name="HeteroCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target, (s_tir.meta_schedule.database.JSONDatabase(work_dir=records) if records
                      else contextlib.nullcontext()):
            seq = tvm.transform.Sequential(
                fusion_passes(target)
                + ([relax.transform.MetaScheduleApplyDatabase()] if records else [])
                + [ScheduleKernels(rules, target), relax.transform.SplitLayoutRewritePreproc(),
                   relax.transform.LiftTransformParams()]
                + _cpu_generic.dataflow_lower_passes(target)
                + _cpu_generic.finalize_passes(target)
                + [mark_trivial_noalias]
            )
            mod = seq(mod)
        return mod

    return _pipeline
