"""hetero.schedules.cuda: the Relax rewrites are checked numerically on the CPU (they are target
independent); the CUDA schedules are checked by building for an sm_90 target (no GPU needed) and
by looking at which rule, tile and instructions each kernel got."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.ir.expr import TensorLoad

from hetero.compile import module_weights
from hetero.devices import DEFAULT_PRECISION, Device, parse_devices, with_precision
from hetero.layers.relax import RelaxGraph
from hetero.models import get_network
from hetero.schedules.base.rule import ScheduleKernels
from hetero.schedules.base.tvmscript import tensor_intrinsics
from hetero.schedules.cuda import mma
from hetero.schedules.cuda.indices import MAX_BATCH_FUNCTION, narrow_batch_indices, recorded_max_batch
from hetero.schedules.cuda.pipeline import (
    describe_schedules,
    effective_precision,
    fused_module,
    gpu_pipeline,
    gpu_rules,
    tir_pipeline,
)
from hetero.schedules.cuda.rewrites import prepare_module, with_weights_prepared_once
from hetero.schedules.cuda.rewrites.split_k import SPLIT_K_MIN_K
from hetero.schedules.cuda.rewrites.tf32 import tf32_rounded
from hetero.schedules.cuda.tensorcore_gemm import copies_async
from hetero.schedules.cuda.tiles import SimtConfig, TensorCoreConfig, pick_simt_config, pick_tensorcore_config
from hetero.schedules.cuda.wgmma import with_wgmma
from hetero.schedules.cuda.wgmma.kernel import conv_kernel, pick_block_n
from hetero.schedules.cuda.wgmma.match import match_conv

from .conftest import ROOT


def _cuda_target(arch: str) -> tvm.target.Target:
    return tvm.target.Target({"kind": "cuda", "arch": arch, "max_threads_per_block": 1024,
                              "max_shared_memory_per_block": 49152, "thread_warp_size": 32,
                              "max_num_threads": 1024}, "llvm")


CUDA_TARGET = _cuda_target("sm_90")
HOPPER_TARGET = with_wgmma(CUDA_TARGET)  # as hetero.devices targets an sm_90 GPU: sm_90a, with wgmma
TURING_TARGET = _cuda_target("sm_75")  # float16 tensor cores without mma.sync.m16n8k16 or TF32
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not installed")

FP32_TOLERANCE = 1e-4  # max |out - ref| / max |ref|
FP16_TOLERANCE = 1e-2  # the fp16 mode's stated bound (measured ~1e-3 on these networks)


@functools.cache
def _tiny_network() -> tuple[tvm.IRModule, tuple[np.ndarray, ...]]:
    """Every layer kind the registered CNNs use, on a 3x32x32 input, symbolic batch."""
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, 3, 32, 32), "float32"))
    bb = relax.BlockBuilder()
    g = RelaxGraph(bb)
    with bb.function("main", attrs={"num_input": 1}):
        with bb.dataflow():
            y = g.conv(x, 16, 3, 2, 1)  # 3x3 stride 2, BN folded, ReLU: 16x16x16
            y = g.conv(y, 16, 3, 1, 1, groups=16)  # depthwise
            y = g.conv(y, 32, 1)  # pointwise
            z = g.conv(y, 32, 3, 1, 1, relu=False)
            y = g.relu(g.add(z, g.conv(y, 32, 1, relu=False)))  # residual with a 1x1 shortcut
            y = g.max_pool(y, 3, 2, 1)  # 8x8
            y = g.concat([g.conv(y, 8, 1, bn=False), g.conv(y, 8, (1, 3), 1, (0, 1), bias=False),
                          g.avg_pool(y, 3, 1, 1)])  # 48 channels
            y = g.relu(g.batch_norm(y))  # per-channel scale and shift
            y = g.conv(y, 64, 3, 2, 1)  # 4x4
            h = g.linear(g.flatten(y), 32, relu=True)
            out = bb.emit_output(g.add(g.linear(h, 10), g.classifier(y, 10)))
        bb.emit_func_output(out, params=[x, *g.weights])
    params = g.init_weights(np.random.default_rng(0))
    return bb.finalize(), params


def _run_on_cpu(mod: tvm.IRModule, params, batch: np.ndarray) -> np.ndarray:
    target = tvm.target.Target("llvm")
    vm = relax.VirtualMachine(relax.build(mod, target, relax_pipeline=relax.get_default_pipeline(target)),
                              tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(batch), *[tvm.runtime.tensor(p) for p in params])
    return out.numpy()


def _relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tiny_reference():
    mod, params = _tiny_network()
    batch = np.random.default_rng(1).standard_normal((3, 3, 32, 32), dtype=np.float32)
    return mod, params, batch, _run_on_cpu(mod, params, batch)


def test_nhwc_rewrite_computes_the_same_function(tiny_reference):
    mod, params, batch, ref = tiny_reference
    prepared = prepare_module(mod, "fp32")
    out = _run_on_cpu(prepared, params, batch)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert _relative_error(out, ref) < FP32_TOLERANCE
    text = prepared["main"].script()
    assert 'data_layout="NHWC"' in text and 'data_layout="NCHW"' not in text  # every conv converted
    assert prepared["main"].params[0].ty.dtype == "float32"  # signature unchanged


def test_fp16_rewrite_stays_within_the_stated_error(tiny_reference):
    mod, params, batch, ref = tiny_reference
    prepared = prepare_module(mod, "fp16")
    text = prepared["main"].script()
    assert 'out_dtype="float32"' in text  # convs and matmuls accumulate in float32
    assert "float16" in text
    out = _run_on_cpu(prepared, params, batch)
    assert out.dtype == np.float32  # inputs and outputs stay float32
    assert _relative_error(out, ref) < FP16_TOLERANCE


def test_weights_prepared_once_give_the_same_outputs(tiny_reference):
    mod, params, batch, ref = tiny_reference
    lifted = with_weights_prepared_once(mod, "fp16", "NHWC")
    lifted_out = lifted["main_transform_params"].script()
    assert "permute_dims" in lifted_out and "astype" in lifted_out  # weight transposes and casts
    assert lifted["main"].params[1].ty.dtype == "float16"  # main takes the weights already cast
    target = tvm.target.Target("llvm")
    vm = relax.VirtualMachine(relax.build(lifted, target), tvm.cpu())
    weights = module_weights(vm, [tvm.runtime.tensor(p) for p in params])
    out = vm["main"](tvm.runtime.tensor(batch), *weights).numpy()
    assert _relative_error(out, ref) < FP16_TOLERANCE


def _matmul_relu(k: int) -> tvm.IRModule:
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, k), "float32"))
    w = relax.Var("w", relax.TensorType((k, 64), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.relu(relax.op.matmul(x, w)))
        bb.emit_func_output(out)
    return bb.finalize()


def test_long_k_matmuls_are_split_and_compute_the_same():
    """A matmul with one 128x128 tile at batch 64 and K = 8192 is cut into 32 parts of 256 (a
    batched matmul, then a sum over the parts), with the same outputs to float32 rounding; one
    with K below SPLIT_K_MIN_K is left whole."""
    mod = _matmul_relu(8192)
    prepared = prepare_module(mod, "fp32", "NCHW")
    calls = [b.value for block in prepared["main"].body.blocks for b in block.bindings
             if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)]
    matmuls = [c for c in calls if c.op.name == "relax.matmul"]
    assert [[int(d) for d in c.args[1].ty.shape] for c in matmuls] == [[32, 256, 64]]
    assert "relax.sum" in [c.op.name for c in calls]
    rng = np.random.default_rng(1)
    batch, weight = rng.standard_normal((3, 8192), dtype=np.float32), rng.standard_normal((8192, 64), dtype=np.float32)
    ref = _run_on_cpu(mod, [weight], batch)
    assert _relative_error(_run_on_cpu(prepared, [weight], batch), ref) < 1e-5
    assert "R.sum" not in prepare_module(_matmul_relu(SPLIT_K_MIN_K // 2), "fp32", "NCHW")["main"].script()


def test_rewrites_keep_the_batch_symbolic():
    prepared = prepare_module(get_network("resnet-18").module, "fp16")
    x = prepared["main"].params[0]
    assert not isinstance(x.ty.shape.values[0], tvm.tirx.IntImm)
    assert not isinstance(prepared["main"].body.body.ty.shape.values[0], tvm.tirx.IntImm)


def test_bad_precision_is_rejected():
    with pytest.raises(ValueError, match="precision"):
        gpu_pipeline(CUDA_TARGET, "int8")


def test_tiles_follow_the_problem_shape():
    n = tvm.tirx.Var("n", "int64")

    def extents(rows_per_sample: int, cols: int, depth: int):
        return [tvm.tirx.IntImm("int64", 1), n * rows_per_sample, tvm.tirx.IntImm("int64", cols),
                tvm.tirx.IntImm("int64", depth)]

    big = pick_simt_config(extents(56 * 56, 256, 64))
    assert (big.bm, big.bn) == (128, 128)
    assert pick_simt_config(extents(56 * 56, 64, 576)).bn == 64  # no tile wider than N
    late = pick_simt_config(extents(7 * 7, 512, 4608))  # 3136 rows: smaller tiles fill the SMs
    assert late.bm * late.bn < 128 * 128
    assert isinstance(big, SimtConfig)
    tc = pick_tensorcore_config(extents(28 * 28, 128, 1152))
    assert isinstance(tc, TensorCoreConfig) and (tc.bm, tc.bn) == (128, 128)
    assert pick_tensorcore_config(extents(35 * 35, 96, 576)).bn == 96  # inception's 96-channel convs
    narrow = pick_tensorcore_config(extents(56 * 56, 32, 1152), k_steps=4)  # densenet's growth convs
    assert (narrow.bn, narrow.wj, narrow.tk) == (32, 1, 4)
    assert pick_tensorcore_config(extents(56 * 56, 32, 1152), single_warp_columns=False) is None  # wmma
    assert pick_tensorcore_config(extents(35 * 35, 48, 256)).bn == 48  # inception's 48 and 80
    assert pick_tensorcore_config(extents(17 * 17, 80, 192)).bn == 80
    assert pick_tensorcore_config(extents(1, 1000, 4096)) is None  # no tile divides N
    tall = pick_tensorcore_config(extents(224 * 224, 64, 576))  # vgg's first 3x3 convs
    assert (tall.bm, tall.bn) == (256, 64)
    assert pick_tensorcore_config(extents(56 * 56, 64, 256)).bm == 128  # too short a K for 256 rows
    split_dense = [tvm.tirx.IntImm("int64", 16), n, tvm.tirx.IntImm("int64", 4096),
                   tvm.tirx.IntImm("int64", 1568)]  # vgg's first dense layer, split along K
    assert pick_tensorcore_config(split_dense).bm == 64  # not padded from 64 rows to 128


@pytest.mark.parametrize("precision", ["tf32", "fp16"])
def test_gemms_32_wide_are_on_tensor_cores(precision):
    kernels = describe_schedules(_tiny_network()[0], CUDA_TARGET, precision)
    narrow = [k for k in kernels if k.n == 32 and ("conv2d" in k.name or "matmul" in k.name)]
    assert len(narrow) == 4  # three convs and the hidden dense layer
    assert {k.rule for k in narrow} == {"tensorcore-gemm"}


@pytest.mark.parametrize("precision,gemm_rule", [("fp32", "simt-gemm"), ("tf32", "tensorcore-gemm"),
                                                ("fp16", "tensorcore-gemm")])
def test_every_conv_of_resnet18_is_a_tiled_gemm(precision, gemm_rule):
    kernels = describe_schedules(get_network("resnet-18").module, CUDA_TARGET, precision)
    convs = [k for k in kernels if "conv2d" in k.name]
    assert len(convs) >= 12
    assert {k.rule for k in convs} == {gemm_rule}
    assert all(k.tile is not None and k.tile.bm >= 64 for k in convs)
    assert not any(k.rule == "dlight.Fallback" and ("conv2d" in k.name or "matmul" in k.name) for k in kernels)


def test_the_tir_lowering_follows_the_targets_tensor_cores():
    assert tir_pipeline("tf32", CUDA_TARGET) == tir_pipeline("fp16", CUDA_TARGET) != "default"
    # wmma before sm_80, lowered with TVM's common-subexpression elimination
    assert tir_pipeline("fp16", TURING_TARGET) not in ("default", tir_pipeline("fp16", CUDA_TARGET))
    assert tir_pipeline("tf32", TURING_TARGET) == tir_pipeline("fp32", CUDA_TARGET) == "default"


_MMA_PATH = """
import sys

import tvm
from tvm import relax
from tvm.tirx.compilation_pipeline import get_tir_pipeline

from hetero.schedules.cuda.pipeline import describe_schedules


def known(name):
    try:
        get_tir_pipeline(name)
    except ValueError:
        return False
    return True


assert not known("hetero-mma") and not known("hetero-wmma"), "registered on import"
n = tvm.tirx.Var("n", "int64")
x = relax.Var("x", relax.TensorType((n, 512), "float32"))
w = relax.Var("w", relax.TensorType((512, 64), "float32"))
builder = relax.BlockBuilder()
with builder.function("main", [x, w], attrs={"num_input": 1}):
    with builder.dataflow():
        out = builder.emit_output(relax.op.nn.relu(relax.op.matmul(x, w)))
    builder.emit_func_output(out)
target = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "max_threads_per_block": 1024,
                            "max_shared_memory_per_block": 49152, "thread_warp_size": 32}, "llvm")
for precision in ("tf32", "fp16"):
    rules = {k.rule for k in describe_schedules(builder.get(), target, precision)}
    assert "tensorcore-gemm" in rules, (precision, rules)
assert known("hetero-mma"), "the lowering its kernels were checked with"
assert "tvm.s_tir.tensor_intrin.cuda" not in sys.modules, "TVM's CUDA intrinsics imported"
"""


def test_mma_kernels_need_no_import_of_tvms_cuda_intrinsics_and_register_their_lowering_when_asked():
    """Importing the CUDA pipeline registers nothing with TVM; scheduling and checking TF32 and
    float16 GEMMs on mma.sync registers the TIR lowering they need and never imports TVM's module of
    CUDA intrinsics (whose TVMScript takes ~20 s to parse).  In a fresh interpreter: other tests
    import that module."""
    result = subprocess.run([sys.executable, "-c", _MMA_PATH], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def test_tf32_is_fp32_on_gpus_without_tf32_tensor_cores():
    assert effective_precision(CUDA_TARGET, "tf32") == "tf32"
    assert effective_precision(TURING_TARGET, "tf32") == "fp32"  # no rounding that buys no speed
    assert effective_precision(TURING_TARGET, "fp16") == "fp16"
    cpu = parse_devices("cpu")[0]
    gpus = [Device(f"gpu{i}", "cuda", i, "test GPU", target) for i, target in enumerate((CUDA_TARGET, TURING_TARGET))]
    assert [d.precision for d in with_precision([cpu, *gpus], DEFAULT_PRECISION)] == ["fp32", "tf32", "fp32"]
    assert [d.precision for d in with_precision([cpu, *gpus], "fp16")] == ["fp32", "fp16", "fp16"]


def test_depthwise_convs_reduce_in_registers():
    kernels = describe_schedules(get_network("mobilenet").module, CUDA_TARGET, "fp32")
    by_rule: dict[str, list[str]] = {}
    for k in kernels:
        if "conv2d" in k.name:
            by_rule.setdefault(k.rule, []).append(k.name)
    # identical layers share one kernel: 9 distinct depthwise and 10 distinct other convs
    assert len(by_rule.get("small-reduction", [])) == 9  # the depthwise convs
    assert len(by_rule.get("simt-gemm", [])) == 10  # the first conv and the pointwise convs
    assert set(by_rule) == {"small-reduction", "simt-gemm"}


def test_scheduling_in_threads_gives_what_scheduling_one_by_one_gives():
    rules = gpu_rules(CUDA_TARGET, "tf32")
    one_by_one, in_threads = ScheduleKernels(rules, CUDA_TARGET, workers=1), ScheduleKernels(rules, CUDA_TARGET, workers=4)
    with CUDA_TARGET:
        sequential = one_by_one(fused_module(_tiny_network()[0], CUDA_TARGET, "tf32"))
        threaded = in_threads(fused_module(_tiny_network()[0], CUDA_TARGET, "tf32"))
    funcs = [f for _, f in threaded.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert funcs and all(f.attrs.get("tirx.is_scheduled", False) for f in funcs)
    assert tvm_ffi.structural_equal(threaded, sequential)
    assert in_threads.applied == one_by_one.applied and "tensorcore-gemm" in in_threads.applied.values()


def _cuda_source(executable) -> str:
    return "\n".join(m.inspect_source() for m in executable.mod.imports[0].imports
                     if m.kind == "cuda")


def test_an_sm_90_gpu_is_compiled_as_sm_90a_and_others_as_they_are():
    assert HOPPER_TARGET.attrs["arch"] == "sm_90a" and HOPPER_TARGET.host.kind.name == "llvm"
    assert with_wgmma(TURING_TARGET).attrs["arch"] == "sm_75"
    assert with_wgmma(tvm.target.Target("llvm")).kind.name == "llvm"


@pytest.mark.parametrize("precision,row", [("tf32", 32), ("fp16", 64)])
def test_wgmma_takes_the_convs_it_can_on_sm_90a_on_tensor_cores(precision, row):
    vgg = get_network("vgg-16").module
    kernels = {k.name: k for k in describe_schedules(vgg, HOPPER_TARGET, precision) if "conv2d" in k.name}
    wgmma = sorted((k.n, k.tile.bn) for k in kernels.values() if k.rule == "wgmma-conv")
    # every 3x3 conv but the first (3 input channels): block tiles as wide as wgmma's N allows
    assert wgmma == [(64, 64), (128, 128), (128, 128), (256, 256), (256, 256), (512, 256), (512, 256), (512, 256)]
    assert {k.tile.bk for k in kernels.values() if k.rule == "wgmma-conv"} == {row}  # 128 bytes of K a stage
    assert [k.rule for k in kernels.values() if k.k == 27] == ["tensorcore-gemm"]


@pytest.mark.parametrize("precision,target", [("fp32", HOPPER_TARGET), ("tf32", CUDA_TARGET), ("fp16", CUDA_TARGET)])
def test_wgmma_needs_sm_90a_and_tensor_core_precision(precision, target):
    """No rule of the pipeline's schedules a kernel with wgmma: describe_schedules and gpu_pipeline
    schedule with exactly these rules (on vgg-16 they took the convs above)."""
    assert "wgmma-conv" not in [rule.name for rule in gpu_rules(target, precision)]
    assert "wgmma-conv" in [rule.name for rule in gpu_rules(HOPPER_TARGET, "tf32")]


@pytest.mark.parametrize("channels,rows,expected", [
    (512, 12544, 256),  # vgg's 14x14 convs at batch 64: 98 x 2 blocks of 128 x 256
    (256, 12544, 128),  # 98 blocks of 128 x 256 would leave SMs idle: 196 of 128 x 128
    (512, 3136, 64),  # resnet-50's 7x7 stage: 25 row blocks, eight tiles across
    (128, 3136, None),  # densenet-121's 7x7 bottlenecks: 50 blocks at most, left to mma.sync's tiles
])
def test_wgmma_tiles_narrow_until_every_sm_has_a_block(channels, rows, expected):
    assert pick_block_n(channels, rows, num_sms=132) == expected


def _fused_conv(network: str, name_prefix: str) -> tvm.tirx.PrimFunc:
    fused = narrow_batch_indices()(fused_module(get_network(network).module, HOPPER_TARGET, "tf32"))
    return next(f for gv, f in fused.functions_items() if gv.name_hint.startswith(name_prefix))


def test_a_conv_is_read_with_its_stride_padding_and_epilogue():
    # resnet-50's first 3x3 conv of stride 2 (56x56 -> 28x28), with bias, relu and TF32 rounding
    func = _fused_conv("resnet-50", "fused_conv2d6_")
    conv = match_conv(func)
    assert (conv.stride, conv.pad, conv.dilation) == ((2, 2), (1, 1), (1, 1))
    assert [tuple(int(d) for d in b.shape[1:]) for b in (conv.data, conv.weight, conv.out)] == [
        (56, 56, 128), (3, 3, 128), (28, 28, 128)]
    position = [tvm.tirx.Var(name, "int32") for name in "byxo"]
    stored = conv.epilogue(tvm.tirx.Var("acc", "float32"), *position)
    sources = []
    tvm_ffi.structural_walk(stored, [(TensorLoad, lambda load: sources.append(load.source))])
    bias = func.params[2]  # the epilogue reads parameters only: the conv's own result is the accumulator
    assert len(sources) == 1 and sources[0].same_as(bias)
    assert "4294959104" in str(stored) and "T.max" in str(stored)  # rounded to TF32 after the relu


def test_convs_the_kernel_cannot_take_are_left_to_the_schedules():
    assert match_conv(_fused_conv("vgg-16", "fused_conv2d_add_relu")) is None  # 3 input channels
    assert match_conv(_fused_conv("vgg-16", "max_pool2d")) is None  # no conv at all


@needs_nvcc
@pytest.mark.parametrize("precision,instruction", [("tf32", "m64n256k8.f32.tf32.tf32"), ("fp16", "m64n256k16.f32.f16.f16")])
def test_a_wgmma_conv_kernel_assembles_for_sm_90a(tmp_path, precision, instruction):
    # resnet-18's last 3x3 conv, with a residual add in its epilogue
    fused = narrow_batch_indices()(fused_module(get_network("resnet-18").module, HOPPER_TARGET, precision))
    func = next(f for gv, f in fused.functions_items()
                if gv.name_hint.startswith("fused_conv2d9_") and len(f.params) == 5)
    kernel = conv_kernel(func, match_conv(func), 256)
    assert len(kernel.params) == len(func.params) == 5
    executable = tvm.tirx.build(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}),
                                target=HOPPER_TARGET, pipeline="tirx")
    source = executable.imports[0].inspect_source()
    assert f"wgmma.mma_async.sync.aligned.{instruction}" in source
    assert "cp.async.cg.shared.global [%0], [%1], 16, %2;" in source  # zero-filled where the conv pads
    (tmp_path / "conv.cu").write_text(source)
    result = subprocess.run(["nvcc", "-arch=sm_90a", "-cubin", "-o", str(tmp_path / "conv.cubin"),
                             str(tmp_path / "conv.cu")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


@needs_nvcc
@pytest.mark.parametrize("network,precision,target", [
    # float16 on squeezenet's GEMMs, narrow (its squeeze convs: N = 16 to 64) and wide (N up to 256); a float16
    # build of resnet-18 (N = 64 to 512) added no assertion that these do not make
    ("squeezenet_v1.1", "fp16", CUDA_TARGET), ("resnet-18", "fp32", CUDA_TARGET), ("resnet-18", "tf32", CUDA_TARGET),
    # wmma on the tiny network (every layer kind): the same assertions as on squeezenet, half its scheduling time
    ("tiny", "fp16", TURING_TARGET),
], ids=["squeezenet_v1.1-fp16", "resnet-18-fp32", "resnet-18-tf32", "tiny-fp16-sm_75"])
def test_cuda_build(network, precision, target):
    module = _tiny_network()[0] if network == "tiny" else get_network(network).module
    executable = relax.build(module, target,
                             relax_pipeline=gpu_pipeline(target, precision),
                             tir_pipeline=tir_pipeline(precision, target))
    source = _cuda_source(executable)
    assert "__global__" in source
    if target is TURING_TARGET:
        assert "wmma::mma_sync" in source and "mma.sync" not in source  # wmma before sm_80
        assert "wmma::accumulator, 16, 16, 16, float>" in source  # float32 accumulation
    elif precision in ("tf32", "fp16"):
        operand = {"tf32": "tf32", "fp16": "f16"}[precision]
        assert f"mma.sync.aligned.m16n8k{8 if precision == 'tf32' else 16}.row.col.f32.{operand}.{operand}.f32" in source
        # every fragment buffer lowered to the thread's own registers (a warp-scope buffer left
        # unlowered would hold the whole warp's fragment, 32 times as many elements)
        fragments = [int(size) for size in re.findall(r"(?:float|half) \w+_warp_ptr\[(\d+)\]", source)]
        assert fragments and max(fragments) <= 64
    if precision == "tf32":
        # activations are rounded to TF32 in the kernels that compute them (mask 0xFFFFE000)
        assert "(uint)4294959104" in source
    if precision == "fp32":
        assert "*(float4*)" in source  # vectorized loads and stores
        assert "mma.sync" not in source
    assert "(int64_t)" not in source  # index arithmetic narrowed to int32 (narrow_batch_indices)
    copy_bytes = {int(size) for size in re.findall(r"ptx_cp_async\w*_(\d+)_\d+_\d+\(", source)}
    # tensor-core GEMMs with long K loops fill their tiles with 16-byte cp.async, and only them
    assert copy_bytes == ({16} if precision in ("tf32", "fp16") else set())


@pytest.mark.parametrize("k_major,k,expected", [
    ((True, True), 2304, True),  # a 3x3 conv over 256 channels
    ((True, False), 2304, False),  # weights fetched transposed: no contiguous 16-byte copies
    ((True, True), 27, False),  # vgg-16's first conv: K not a whole number of vectors
    ((True, True), 32, False),  # one K tile, fewer than the ring holds
    ((True, True), 64, True),
])
def test_async_copies_only_where_they_apply(k_major, k, expected):
    assert copies_async(list(k_major), tvm.tirx.IntImm("int64", k), bk=32, vector=4) is expected


@pytest.mark.parametrize("fragment", [mma.TF32, mma.FLOAT16], ids=["tf32", "fp16"])
@pytest.mark.parametrize("operand", ["a", "b"])
def test_ldmatrix_fills_each_register_with_its_fragment_elements(fragment, operand):
    """ldmatrix.x4.b16: matrix q is read from the rows lanes 8q..8q+7 point at, and lane L receives
    the 32 bits (L // 4, L % 4) of it in register q: one float or two halves.  Those must be the
    elements the PTX m16n8k8.tf32 / m16n8k16.f16 layout puts in lane L's register q, for every
    lane and register, once each."""
    layout, row_address = getattr(fragment, f"{operand}_layout"), getattr(fragment, f"{operand}_row_address")
    per = fragment.per_register
    seen = set()
    for register in range(fragment.regs // per):
        for lane in range(mma.WARP):
            row, first_col = row_address(8 * register + lane // 4)
            for e in range(per):
                element = (row, first_col + (lane % 4) * per + e)
                assert layout(*element) == (lane, register * per + e)
                seen.add(element)
    assert seen == {(r, c) for r in range(16) for c in range(fragment.k)}


def test_float16_operand_layout_is_tvms():
    """TVM's own float16 mma intrinsics lay out the A operand the same way (an independent check
    of the PTX layout transcribed in hetero.schedules.cuda.mma)."""
    tvms = tensor_intrinsics().cuda
    assert all(mma.FLOAT16.a_layout(i, k) == tvms.shared_16x16_to_ldmatrix_32x8_layout(i, k)
               for i in range(16) for k in range(16))


def test_accumulator_layout_fill_and_store_are_tvms():
    """The accumulator's layout, fill and store are TVM's (its mma_fill_16x16_f32 and
    mma_store_16x16_f32_shared_dyn_simple_), defined again so that mma.sync kernels do not import
    TVM's module of CUDA intrinsics: descriptions and implementations the same, names included."""
    from tvm.s_tir import TensorIntrin

    tvms = tensor_intrinsics().cuda
    assert all(mma.c_layout(i, j) == tvms.shared_16x16_to_ldmatrix_32x8_layout(i, j) for i in range(16) for j in range(16))
    assert all(mma.c_element(*mma.c_layout(i, j)) == (i, j) == tvms.ldmatrix_32x8_to_shared_16x16_layout(*mma.c_layout(i, j))
               for i in range(16) for j in range(16))
    names = mma.register(mma.TF32)
    for ours, theirs in ((names["init"], "mma_fill_16x16_f32"), (names["store"], "mma_store_16x16_f32_shared_dyn_simple_")):
        own, tvms = TensorIntrin.get(ours), TensorIntrin.get(theirs)
        assert ours != theirs
        assert tvm_ffi.structural_equal(own.desc, tvms.desc) and tvm_ffi.structural_equal(own.impl, tvms.impl)
        assert own.impl.script() == tvms.impl.script()


def _nearest_tf32(values: np.ndarray) -> np.ndarray:
    """The TF32 number nearest each float32 (ties away from zero), from the two TF32 neighbours."""
    bits = values.view(np.uint32)
    down = (bits & np.uint32(0xFFFFE000)).view(np.float32)
    up = ((bits & np.uint32(0xFFFFE000)) + np.uint32(0x2000)).view(np.float32)
    return np.where(np.abs(values - down) < np.abs(up - values), down, up)


def test_tf32_rounding_gives_the_nearest_tf32():
    """tf32_rounded gives the TF32 number nearest each float32 (ties away from zero), which the
    tensor cores then read exactly; truncation, what they do alone, would not."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def rounded(x: T.Buffer((4096,), "float32"), y: T.Buffer((4096,), "float32")):
        for i in range(4096):
            y[i] = tf32_rounded(x[i])

    rng = np.random.default_rng(0)
    values = (rng.standard_normal(4096) * np.exp2(rng.integers(-20, 20, 4096))).astype(np.float32)
    values[:4] = [1 + 2.0**-11, -(1 + 2.0**-11), 1 + 3 * 2.0**-12, 0.0]  # two ties, a round-up, zero
    kernel = tvm.tirx.build(rounded, target="llvm")
    read = tvm.runtime.empty((4096,), "float32")
    kernel(tvm.runtime.tensor(values), read)
    expected = _nearest_tf32(values)
    np.testing.assert_array_equal(read.numpy(), expected)
    assert np.any((values.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32) != expected)

    # NaNs stay NaN, also one whose payload lies in the bits rounding clears; infinities stay
    special = np.array([0x7FC00000, 0x7F800001, 0xFF800FFF, 0x7F800000, 0xFF800000] * 820, np.uint32)[:4096]
    kernel(tvm.runtime.tensor(special.view(np.float32)), read)
    np.testing.assert_array_equal(np.isnan(read.numpy()), np.isnan(special.view(np.float32)))
    np.testing.assert_array_equal(read.numpy()[3:5], special.view(np.float32)[3:5])


def test_tf32_rewrite_rounds_every_gemm_operand(tiny_reference):
    """Every convolution and matmul reads TF32 numbers, the weights rounded once (in
    main_transform_params); the outputs move by TF32 rounding only."""
    mod, params, batch, ref = tiny_reference
    prepared = prepare_module(mod, "tf32")
    operands = []

    def gemm_operands(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and (
                expr.op.name == "relax.matmul" or (expr.op.name == "relax.nn.conv2d" and expr.attrs.groups == 1)):
            operands.extend(expr.args)

    relax.analysis.post_order_visit(prepared["main"], gemm_operands)
    assert len(operands) >= 16
    bound = {binding.var: binding.value for block in prepared["main"].body.blocks for binding in block.bindings}

    def rounded(var):
        return bound[var].op.name == "relax.call_tir" and "tf32_round" in bound[var].args[0].name_hint

    def rounded_before(var):  # rounded, or moved or picked from a rounded value
        while bound[var].op.name in ("relax.nn.max_pool2d", "relax.reshape", "relax.permute_dims"):
            var = bound[var].args[0]
        return rounded(var)

    pooled = [o for o in operands if bound[o].op.name == "relax.nn.max_pool2d"]
    assert pooled  # the max pool's input is rounded (in the conv that computes it), not its output
    assert all(rounded_before(o) for o in operands)

    lifted = with_weights_prepared_once(mod, "tf32", "NHWC")
    assert "tf32_round" in lifted["main_transform_params"].script()
    vm = relax.VirtualMachine(relax.build(lifted, tvm.target.Target("llvm")), tvm.cpu())
    weights = module_weights(vm, [tvm.runtime.tensor(p) for p in params])
    out = vm["main"](tvm.runtime.tensor(batch), *weights).numpy()
    assert 0 < _relative_error(out, ref) < 1e-2


def _fused_on_cpu(mod: tvm.IRModule) -> tvm.IRModule:
    return tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                     relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)


def test_int32_indices_compute_the_same_and_record_the_batch_they_hold(tiny_reference):
    mod, params, batch, _ = tiny_reference
    fused = _fused_on_cpu(mod)
    narrowed = narrow_batch_indices()(fused)
    kernels = [f for f in narrowed.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels and not any("int64" in f.script() for f in kernels)
    outputs = []
    for module in (fused, narrowed):
        vm = relax.VirtualMachine(relax.build(module, "llvm", relax_pipeline=relax.pipeline.default_build_pipeline()),
                                  tvm.cpu())
        outputs.append(vm["main"](tvm.runtime.tensor(batch), *[tvm.runtime.tensor(p) for p in params]).numpy())
    np.testing.assert_array_equal(outputs[1], outputs[0])
    # The largest buffer per sample is 32 channels x 18 x 18 floats (16x16 maps padded for a 3x3 conv
    # and the max pool): its byte offsets, which cp.async takes as int, bound the batch before its
    # element indices do (less 256 samples for rows a GEMM pads to its tallest tile, 256 x 64)
    largest = 32 * 18 * 18
    assert recorded_max_batch(vm) == (2**31 - 1) // (largest * 4) < (2**31 - 1) // largest - 256


def test_indices_stay_64_bit_where_one_call_could_not_hold_a_useful_batch(tiny_reference):
    fused = _fused_on_cpu(tiny_reference[0])
    kept = narrow_batch_indices(max_elements=32 * 18 * 18 * 128)(fused)  # limit 0
    assert MAX_BATCH_FUNCTION not in [gv.name_hint for gv in kept.functions]
    assert any("int64" in f.script() for f in kept.functions.values() if isinstance(f, tvm.tirx.PrimFunc))


def test_kernels_scheduled_from_tuning_records_keep_their_indices(tiny_reference):
    fused = _fused_on_cpu(tiny_reference[0])
    gv, func = next((gv, f) for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
                    and "int64" in f.script())
    fused[gv] = func.with_attr("tirx.is_scheduled", True)  # as MetaScheduleApplyDatabase marks them
    narrowed = narrow_batch_indices()(fused)
    assert tvm_ffi.structural_equal(narrowed[gv], fused[gv])
    others = [f for g, f in narrowed.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and g != gv]
    assert others and not any("int64" in f.script() for f in others)
