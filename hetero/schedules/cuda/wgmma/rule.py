"""The wgmma conv rule: a fused conv PrimFunc replaced by the wgmma kernel, where one fits."""

from __future__ import annotations

import tvm
from tvm import tirx

from ...base.analysis import estimate
from ...base.rule import Rule
from ..lowering import generate_code
from ..tiles import DEFAULT_NUM_SMS, Trace
from .kernel import BM, Tile, conv_kernel, pick_block_n
from .match import match_conv


class WgmmaConv(Rule):
    """Convs that :func:`.match.match_conv` reads and that make a block for each of ``num_sms`` SMs
    in tiles of 128 rows (:func:`.kernel.pick_block_n`) as one wgmma kernel each.  With ``verify``
    the kernel is only used when it generates code on its own, as the tensor-core GEMM checks its
    schedules.  For sm_90a targets (:func:`.target.supports`) in TF32 and float16."""

    name = "wgmma-conv"

    def __init__(self, num_sms: int = DEFAULT_NUM_SMS, verify: bool = True, trace: Trace | None = None):
        self.num_sms = num_sms
        self.verify = verify
        self.trace = trace

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc | None:
        conv = match_conv(func)
        if conv is None:
            return None
        extents = conv.extents()
        bn = pick_block_n(estimate(extents[2]), estimate(extents[1]), self.num_sms)
        if bn is None:
            return None
        if self.trace is not None:
            self.trace(self.name, Tile(BM, bn, conv.row), extents)
        kernel = conv_kernel(func, conv, bn)
        if self.verify:
            generate_code(kernel, target, "tirx")
        return kernel
