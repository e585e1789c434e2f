"""The TIR lowering the tensor-core kernels need, registered by name for ``relax.build``'s
``tir_pipeline``, and the check that a scheduled kernel lowers on its own."""

from __future__ import annotations

import functools
import threading

import tvm
import tvm_ffi
from tvm import tirx

from .wgmma.target import KERNEL_ATTR

MMA_PIPELINE = "hetero-mma"  # mma.sync fragments held in warp memory
WMMA_PIPELINE = "hetero-wmma"  # TVM's wmma fragments


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
    last buffer.  The wgmma kernels, written in tirx rather than scheduled, take TVM's tirx lowering."""
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    lower, finalize_host, finalize_device = default_s_tir_pipeline()
    config_changes = {"tirx.use_async_copy": True, **({"tirx.disable_cse_tir": True} if warp_fragments else {})}

    lower_tirx = tvm.tirx.compilation_pipeline.tirx_pipeline()[0]

    @tvm.transform.module_pass(opt_level=0, name="hetero.TensorCoreLowering")
    def lower_for_tensor_cores(mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        written = {gv: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and f.attrs
                   and f.attrs.get(KERNEL_ATTR, False)}
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


_registered = False
_REGISTER_LOCK = threading.Lock()


def register_tir_pipelines() -> None:
    """Make MMA_PIPELINE and WMMA_PIPELINE known to TVM by name (once; any thread may ask first)."""
    global _registered
    with _REGISTER_LOCK:
        if not _registered:
            for name, warp_fragments in ((MMA_PIPELINE, True), (WMMA_PIPELINE, False)):
                tvm.tirx.compilation_pipeline.register_tir_pipeline(
                    name, functools.partial(_tensorcore_tir_pipeline, warp_fragments=warp_fragments))
            _registered = True


def generate_code(func: tirx.PrimFunc, target: tvm.target.Target, pipeline: str) -> None:
    """Lower ``func`` on its own with the TIR ``pipeline`` and generate its CUDA code: TVM raises
    where it cannot, as it would for the whole module."""
    register_tir_pipelines()
    func = func.with_attr("global_symbol", "main").with_attr("target", target)
    tvm.tirx.build(tvm.IRModule({"main": func}), target=target, pipeline=pipeline)
