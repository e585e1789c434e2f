"""The Relax -> VM pipeline for CUDA targets: hetero's rewrites, then its rules and dlight's."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, tirx

from ..base.analysis import estimate
from ..base.rule import Rule, ScheduleKernels, first_applying
from . import wgmma
from .dlight_rules import DlightRule
from .indices import narrow_batch_indices
from .lowering import register_tir_pipelines
from .rewrites import PRECISIONS, prepare_module, with_weights_prepared_once
from .simt_gemm import SimtGemm
from .small_reduction import SmallReduction
from .tensorcore_gemm import MMA_F16, MMA_TF32, TensorCoreGemm, tensor_core_kind
from .tiles import DEFAULT_NUM_SMS, Trace
from .wgmma.rule import WgmmaConv

__all__ = [
    "PRECISIONS",
    "KernelSchedule",
    "describe_schedules",
    "effective_precision",
    "fused_module",
    "gpu_pipeline",
    "gpu_rules",
    "tir_pipeline",
]


def effective_precision(target: tvm.target.Target, precision: str) -> str:
    """The precision ``target`` computes ``precision`` in: ``"tf32"`` is ``"fp32"`` on GPUs without
    TF32 tensor cores (before sm_80), whose CUDA cores would gain nothing from rounding the
    operands and lose their precision."""
    return "fp32" if precision == "tf32" and tensor_core_kind(target, precision) is None else precision


def tir_pipeline(precision: str, target: tvm.target.Target) -> str:
    """The TIR lowering (``tir_pipeline`` of ``relax.build``) that :func:`gpu_pipeline`'s kernels
    need in ``precision`` on ``target``, registered with TVM by the time it is returned."""
    kind = tensor_core_kind(target, precision)
    if kind is None:
        return "default"
    register_tir_pipelines()
    return kind.tir_pipeline


def gpu_rules(target: tvm.target.Target, precision: str = "fp32", num_sms: int = DEFAULT_NUM_SMS,
              tensor_cores: bool | None = None, verify: bool = True, trace: Trace | None = None,
              software_pipeline: bool = True, async_copy: bool = True, use_wgmma: bool = True) -> list[Rule]:
    """The schedule rules of :func:`gpu_pipeline`, in the order they are tried: on sm_90a in TF32 and
    float16, the wgmma conv kernels first (``use_wgmma``); the tensor-core GEMM where ``target``
    has tensor cores for ``precision`` (``tensor_cores``, default: where it has); the CUDA-core
    GEMM; small reductions; dlight's rules.

    With ``verify``, a tensor-core schedule is only used when its function generates code on its
    own (~0.1 s a kernel): TVM 0.27 fails to lower some tile/shape combinations, and one kernel
    that fails would fail the whole build.  ``trace(rule, config, extents)`` is told each GEMM
    tile picked (see :func:`describe_schedules`).
    """
    from tvm.s_tir import dlight as dl

    kind = tensor_core_kind(target, precision)
    if tensor_cores is None:
        tensor_cores = kind is not None
    tensor_cores = tensor_cores and kind is not None
    on_wgmma = tensor_cores and use_wgmma and kind in (MMA_TF32, MMA_F16) and wgmma.supports(target)
    return [
        *([WgmmaConv(num_sms, verify, trace)] if on_wgmma else []),
        *([TensorCoreGemm(kind, num_sms, async_copy, verify, trace)] if tensor_cores else []),
        SimtGemm(num_sms, software_pipeline, trace),
        SmallReduction(),
        DlightRule(dl.gpu.Matmul()),
        DlightRule(dl.gpu.GEMV()),
        DlightRule(dl.gpu.Reduction()),
        DlightRule(dl.gpu.GeneralReduction()),
        DlightRule(dl.gpu.Fallback(), last_resort=True),
    ]


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
        mod = with_weights_prepared_once(mod, precision, layout)
        return tvm.transform.Sequential(_fusion_passes(target))(mod)


@dataclass(frozen=True)
class KernelSchedule:
    """How :func:`gpu_pipeline` schedules one fused PrimFunc."""

    name: str
    rule: str  # the rule that scheduled it, e.g. "simt-gemm", "dlight.Fallback"
    tile: object | None = None  # SimtConfig / TensorCoreConfig / wgmma Tile for the GEMM rules
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
        applied = first_applying(rules, func, target)
        if applied is None:
            continue
        rule = applied[0]
        mine = [p for p in picked if p[0] == rule.name]  # earlier rules may have picked, then failed
        if mine:
            _, cfg, ext = mine[-1]
            out.append(KernelSchedule(gv.name_hint, rule.name, cfg, estimate(ext[1]),
                                      estimate(ext[2]), estimate(ext[3])))
        else:
            out.append(KernelSchedule(gv.name_hint, rule.name))
    return out


def gpu_pipeline(target: tvm.target.Target, precision: str = "fp32", *, layout: str = "NHWC",
                 num_sms: int = DEFAULT_NUM_SMS, tensor_cores: bool | None = None,
                 software_pipeline: bool = True, async_copy: bool = True, weights_once: bool = True,
                 narrow_index: bool = True, records: str | None = None,
                 use_wgmma: bool = True) -> tvm.transform.Pass:
    """The Relax -> VM pipeline for a CUDA ``target`` with hetero's rewrites and schedules.

    ``precision`` is ``"fp32"``, ``"tf32"`` (GEMM operands rounded to TF32, on TF32 tensor cores
    from sm_80 on) or ``"fp16"`` (float16 storage and tensor cores, float32 accumulation); inputs
    and outputs stay float32.  ``layout="NCHW"`` skips the NHWC conversion,
    ``tensor_cores=False`` the tensor-core schedule (default: on for fp16 on sm_70 and newer),
    ``software_pipeline=False`` the register-prefetch pipelining of the CUDA-core GEMM's K loop,
    ``async_copy=False`` the ``cp.async`` tile loads of the tensor-core GEMMs,
    ``weights_once=False`` the lifting of weight-only work out of ``main`` (so it runs per call),
    ``narrow_index=False`` the int32 index arithmetic (:func:`.indices.narrow_batch_indices`),
    ``use_wgmma=False`` the wgmma conv kernels of sm_90a in TF32 and float16 (:mod:`.wgmma`).
    ``records``, a MetaSchedule database folder (hetero.tune), schedules the kernels it has records
    for; hetero's rules schedule the rest.
    ``num_sms`` (streaming multiprocessors) steers the tile choice.
    The kernels need :func:`tir_pipeline`'s lowering, which this registers with TVM.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    precision = effective_precision(target, precision)
    register_tir_pipelines()
    from tvm.relax.backend.cuda import pipeline as cuda

    @tvm.transform.module_pass(opt_level=0, name="hetero.GPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target, (s_tir.meta_schedule.database.JSONDatabase(work_dir=records) if records
                      else contextlib.nullcontext()):
            mod = (with_weights_prepared_once if weights_once else prepare_module)(mod, precision, layout)
            seq = tvm.transform.Sequential(
                _fusion_passes(target)
                + ([relax.transform.MetaScheduleApplyDatabase()] if records else [])
                + ([narrow_batch_indices()] if narrow_index else [])
                + [
                    ScheduleKernels(gpu_rules(target, precision, num_sms, tensor_cores,
                                              software_pipeline=software_pipeline,
                                              async_copy=async_copy, use_wgmma=use_wgmma), target),
                ]
                + cuda.dataflow_lower_passes(target)
                + cuda.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
