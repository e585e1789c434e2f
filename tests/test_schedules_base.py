"""hetero.schedules.base: the rule protocol's error semantics and the one convolution matcher."""

from __future__ import annotations

import pytest
import tvm
from tvm import relax, s_tir, tirx

from hetero.devices import cpu_target
from hetero.schedules.base.analysis import REDUCTION, iter_kinds
from hetero.schedules.base.conv import affine, match_conv
from hetero.schedules.base.rule import Rule, ScheduleKernels

TARGET = cpu_target()


def _legalized(build) -> dict[str, tirx.PrimFunc]:
    """The PrimFuncs of a one-op Relax function `build(x, w)` over (1, 8, 10, 10)-shaped data."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 10, 10), "float32"))
    w = relax.Var("w", relax.TensorType((16, 8, 3, 3), "float32"))
    with bb.function("main", [x, w]):
        bb.emit_func_output(bb.emit(build(x, w)))
    legal = relax.transform.LegalizeOps()(bb.get())
    return {gv.name_hint: f for gv, f in legal.functions_items() if isinstance(f, tirx.PrimFunc)}


def _reduction_block(func: tirx.PrimFunc) -> tirx.SBlock:
    sch = s_tir.Schedule(func)
    blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    return next(b for b in blocks if REDUCTION in iter_kinds(b))


NCHW = _legalized(lambda x, w: relax.op.nn.conv2d(x, w, strides=2, padding=1))
NHWC = _legalized(lambda x, w: relax.op.nn.conv2d(relax.op.permute_dims(x, [0, 2, 3, 1]),
                                                 relax.op.permute_dims(w, [0, 2, 3, 1]), padding=1,
                                                 data_layout="NHWC", kernel_layout="OHWI"))


@pytest.mark.parametrize("funcs,channel_axis,other_axis", [(NCHW, 1, 3), (NHWC, 3, 1)], ids=["NCHW", "NHWC"])
def test_the_conv_matcher_tells_data_from_weight_in_either_layout(funcs, channel_axis, other_axis):
    func = next(f for name, f in funcs.items() if name.startswith("conv2d"))
    block = _reduction_block(func)
    mac = match_conv(block, channel_axis)
    assert mac is not None
    assert mac.weight.source.same_as(func.params[1])  # the weight parameter, not the padded data
    assert not mac.data.source.same_as(func.params[1])
    assert len(mac.spatial) == 4 and len(mac.reduction) == 3
    assert match_conv(block, other_axis) is None  # that axis is not what indexes the weight first


def test_the_conv_matcher_takes_no_matmul():
    funcs = _legalized(lambda x, w: relax.op.matmul(relax.op.reshape(x, (100, 8)), relax.op.reshape(w, (8, 144))))
    matmul = next(f for name, f in funcs.items() if name.startswith("matmul"))
    assert match_conv(_reduction_block(matmul), 1) is None


def test_affine_reads_stride_dilation_and_padding():
    y, ry = tirx.Var("y", "int32"), tirx.Var("ry", "int32")
    assert affine(y * 2 + ry * 3 - 1, ["y", "ry"]) == (-1, [2, 3])
    assert affine(y * 2 + ry, ["y"]) is None  # ry left free: no constant


def _schedule(rules: list[Rule]) -> ScheduleKernels:
    schedule = ScheduleKernels(rules, TARGET)
    schedule(tvm.IRModule({"conv": next(iter(NCHW.values()))}))
    return schedule


class _Raises(Rule):
    name = "raises"

    def __init__(self, error: Exception):
        self.error = error

    def schedule(self, func, target):
        raise self.error


class _Takes(Rule):
    name = "takes"

    def schedule(self, func, target):
        return s_tir.Schedule(func)


def test_a_rule_that_raises_tvms_errors_does_not_apply_and_the_next_is_tried():
    assert _schedule([_Raises(RuntimeError("does not fit")), _Takes()]).applied == {"conv": "takes"}
    assert _schedule([_Raises(ValueError("does not fit"))]).applied == {"conv": None}


def test_a_bug_in_a_rule_is_not_taken_for_a_rule_that_does_not_apply():
    # the error crosses TVM's pass boundary, which may change its type: that it arrives at all is the point
    with pytest.raises(Exception, match="typo"):
        _schedule([_Raises(NameError("typo")), _Takes()])
