"""How the wgmma kernel holds its operands: the types it takes (with their wgmma shapes), K in swizzled rows
of 128 bytes, a ring of STAGES tiles in shared memory.  :mod:`.match` checks a conv against these and
:mod:`.kernel` is written with them."""

from __future__ import annotations

ROW_BYTES = 128  # one swizzled row of a tile: the K of one stage (32 floats, 64 halves)
STAGES = 4
OPERAND_BYTES = {"float32": 4, "float16": 2}
# the wgmma shape suffix of each operand type, and the operands after the scales: float16 takes
# transpose immediates (0: K-major, as hetero's GEMMs hold both operands), TF32 has none
MMA_TYPES = {"float32": ("k8.f32.tf32.tf32", ()), "float16": ("k16.f32.f16.f16", (0, 0))}
