"""TVMScript parsed by one thread at a time.

Kernels are scheduled in parallel threads (:class:`.rule.ScheduleKernels`), and some rules write their
kernels or intrinsics in TVMScript, whose parser calls ``ast.parse``.  CPython 3.11 can fail two
``ast.parse`` calls made at once in different threads ("AST constructor recursion depth mismatch",
python/cpython#106905): a build of resnet-34 in TF32 for sm_90a failed so.
"""

from __future__ import annotations

import threading

PARSE_LOCK = threading.RLock()
