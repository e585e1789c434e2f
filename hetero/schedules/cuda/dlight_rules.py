"""dlight's GPU rules, for the kernels hetero's own rules do not take."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule

from ..base.rule import Rule


class DlightRule(Rule):
    """A dlight ``ScheduleRule`` as a hetero rule, named ``dlight.<its class>``.

    dlight's rules raise on kernels they misjudge (its ``Matmul`` on some fused convs), and any
    exception of theirs means the kernel goes to the next rule: ``errors`` is every exception.
    The fallback, the last resort, raises instead (``last_resort``): a kernel that not even it
    schedules would fail the build later, less clearly.
    """

    def __init__(self, rule: ScheduleRule, last_resort: bool = False):
        self.rule = rule
        self.name = f"dlight.{type(rule).__name__}"
        self.errors = () if last_resort else (Exception,)

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | list | None:
        return self.rule.apply(func, target, False)

