"""Convolutions on Hopper's warpgroup tensor cores (``wgmma``), in TF32 and float16, for sm_90a.

hetero's other tensor-core kernels issue warp-level ``mma.sync``, which left vgg-19's 3x3 convs at
150-160 TFLOP/s in TF32 on an H200 while cuDNN's wgmma kernels ran them at about 470 (benchmarks/HISTORY.md).
Here a conv is one TVMScript (tirx) kernel on TVM 0.27's own PTX instructions (:mod:`.kernel`): an
implicit GEMM (M: output pixels, N: output channels, K: taps x input channels) whose 128 x BN block
tile is two warpgroups, each issuing ``wgmma.mma_async m64nBNk8`` (TF32) or ``k16`` (float16) on
operands in shared memory named by matrix descriptors.  Tiles of 128 bytes of K are loaded with
``cp.async`` (zero-filled where the conv pads and past the last row) into a ring of STAGES stages (:mod:`.operands`)
laid out in the 128-byte swizzle that wgmma reads; accumulation is in float32.

The kernel replaces a fused conv PrimFunc (:mod:`.match` reads the conv from it) and keeps its
parameters: the elementwise blocks that follow the conv there (casts, bias, residual, relu, TF32
rounding) are inlined into one expression, which the kernel evaluates on each accumulator as it
stores it.  :mod:`.rule` is the schedule rule; importing this package alone loads no TVMScript.
"""

from .target import ARCH, KERNEL_ATTR, supports, with_wgmma

__all__ = ["ARCH", "KERNEL_ATTR", "supports", "with_wgmma"]
