"""Tuning-free CUDA schedules for CNN inference.

TVM 0.27's default CUDA pipeline (``relax.backend.cuda.get_default_pipeline``) legalizes every
operator to TIR and schedules it with dlight.  dlight's ``Matmul`` rule does take NCHW convs as
implicit GEMMs, but with one small tile (32x64, 4x4 per thread), shared-memory reads that
bank-conflict, and im2col loads that NCHW makes uncoalesced; its float16 tensor-core variant
raises on fused convs; depthwise convs go to ``GeneralReduction``, which spends a warp on a
9-element reduction.  The wheel has no cuDNN/cuBLAS/CUTLASS, so everything has to be TIR.

:func:`.pipeline.gpu_pipeline` is the default pipeline with three changes.

1. Relax rewrites before legalization (:func:`.rewrites.prepare_module`; target independent, so
   they are checked numerically on the CPU):

   * ``x + b`` with a ``(C, 1, 1)`` operand gets it reshaped to ``(1, C, 1, 1)``; then
     ``ConvertLayout`` turns the whole graph NHWC (weights OHWI), so an im2col row (kh, kw, c)
     and a weight row are contiguous along c; transposes that only move unit axes become free
     reshapes (:mod:`.rewrites.layout`);
   * ``fp16``: the function runs in float16 -- parameters are cast where first used (a bias after
     its reshapes, so the cast fuses into the conv epilogue), convs and matmuls accumulate in
     float32 (``out_dtype``) and are cast back, averages run in float32, and the result is cast
     to float32: the signature (float32 in and out) does not change (:mod:`.rewrites.float16`);
   * ``tf32``: every GEMM operand rounded to TF32 where it is computed (:mod:`.rewrites.tf32`);
   * long-K matmuls split along K (:mod:`.rewrites.split_k`).

2. Schedule rules tried before dlight's, one per file (a rule that does not fit a kernel returns
   "no schedule", never raises):

   * :class:`.wgmma.rule.WgmmaConv` (sm_90a, TF32 and float16): a conv as one TVMScript kernel on
     Hopper's warpgroup tensor cores;
   * :class:`.tensorcore_gemm.TensorCoreGemm` (float16 operands, or float32 read as TF32, on
     ``mma.sync`` fragments held in registers, :mod:`.mma`; wmma before sm_80): every conv /
     matmul as an implicit GEMM ``C[M, N] += A[M, K] * B[N, K]`` with float32 accumulation, K
     tiles of 32, shared tiles filled by ``cp.async`` a stage ahead (register-staged and
     double-buffered where that does not apply), software pipeline, fused epilogue;
   * :class:`.simt_gemm.SimtGemm` (float32): the same GEMM on CUDA cores, 8x8 outputs per thread
     (2x2 virtual threads of 4x4), float4 global loads, shared tiles stored transposed so every
     inner-loop shared read is a conflict-free float4, the next K tile prefetched to registers
     while the current one is computed;
   * tiles are picked per kernel (:mod:`.tiles`) from its static N, K and its M estimated at
     batch 64: the largest tile that still gives every SM two blocks.  The batch stays symbolic
     (M = n*H*W, padded to the tile);
   * :class:`.small_reduction.SmallReduction`: depthwise convs and pools, one output per thread
     with the (<= 64 element) reduction in registers, threads along the channel (coalesced in
     NHWC).

3. dlight's rules last (:mod:`.dlight_rules`), each of them but the fallback skipped when it raises.

Usage::

    relax.build(network.module, target, relax_pipeline=gpu_pipeline(target, "fp16"),
                tir_pipeline=tir_pipeline("fp16", target))

:func:`.pipeline.describe_schedules` tells which rule and tile each kernel gets, without building.
"""
