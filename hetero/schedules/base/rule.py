"""The rule protocol: one way to schedule one kind of kernel, tried in a literal list's order.

As in TVM's dlight, a pipeline holds an ordered list of rules and each kernel (PrimFunc) gets the
schedule of the first rule that applies.  A rule that does not apply returns None; a rule that
raises one of its ``errors`` is taken as not applying (TVM raises when a schedule primitive does not
fit a kernel), while any other exception is a bug in the rule and propagates.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Sequence

import tvm
from tvm import s_tir, tirx

logger = logging.getLogger(__name__)

# what TVM raises when a schedule primitive or a lowering does not fit a kernel
TVM_ERRORS: tuple[type[Exception], ...] = (RuntimeError, ValueError, TypeError, IndexError, AssertionError)

SCHEDULED = "tirx.is_scheduled"


class Rule:
    """One schedule rule.  Subclasses set ``name`` and implement :meth:`schedule`."""

    name: str = ""
    errors: tuple[type[Exception], ...] = TVM_ERRORS  # what means "not for this kernel"

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | tirx.PrimFunc | None:
        """A schedule of ``func`` for ``target`` (or a kernel written out in full), or None."""
        raise NotImplementedError

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc | None:
        """``func`` scheduled by this rule, or None where the rule does not apply."""
        try:
            result = self.schedule(func, target)
        except self.errors as exc:
            lines = str(exc).strip().splitlines()
            logger.debug("%s does not schedule a kernel: %s", self.name, lines[-1] if lines else type(exc).__name__)
            return None
        if isinstance(result, list):  # dlight's rules may return a design space: its first schedule
            result = result[0] if result else None
        if isinstance(result, s_tir.Schedule):
            return result.mod["main"]
        return result

    def __repr__(self) -> str:
        return f"<rule {self.name}>"


def first_applying(rules: Sequence[Rule], func: tirx.PrimFunc,
                   target: tvm.target.Target) -> tuple[Rule, tirx.PrimFunc] | None:
    """The first of ``rules`` that schedules ``func``, and the scheduled function."""
    with target:  # the current target is per thread, and some of TVM's analysis reads it
        for rule in rules:
            scheduled = rule.apply(func, target)
            if scheduled is not None:
                return rule, scheduled
    return None


@tvm.transform.module_pass(opt_level=0, name="hetero.ScheduleKernels")
class ScheduleKernels:
    """Every kernel not yet scheduled gets the schedule of the first rule of ``rules`` that applies;
    kernels no rule takes are left as they are.  Kernels are scheduled in ``workers`` threads: TVM
    releases the GIL while it schedules and lowers, and each kernel's schedule depends on that kernel
    alone, so the result is the same as one by one.  ``applied`` maps each kernel's name to the
    name of the rule that scheduled it (None: no rule did)."""

    def __init__(self, rules: Sequence[Rule], target: tvm.target.Target, workers: int | None = None):
        self.rules = list(rules)
        self.target = target
        self.workers = workers or os.cpu_count() or 1
        self.applied: dict[str, str | None] = {}

    def _schedule(self, func: tirx.PrimFunc) -> tuple[str | None, tirx.PrimFunc | None]:
        found = first_applying(self.rules, func, self.target)
        if found is None:
            return None, None
        rule, scheduled = found
        return rule.name, scheduled.with_attr(SCHEDULED, True)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        todo = [(gv, func) for gv, func in mod.functions_items()
                if isinstance(func, tirx.PrimFunc) and not (func.attrs and func.attrs.get(SCHEDULED, False))]
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            results = list(pool.map(lambda item: self._schedule(item[1]), todo))
        for (gv, _), (rule, func) in zip(todo, results):
            self.applied[gv.name_hint] = rule
            if func is not None:
                mod[gv] = func
        return mod
