"""TVMScript parsed by one thread at a time, and TVM's tensor intrinsics imported without its slow path.

Kernels are scheduled in parallel threads (:class:`.rule.ScheduleKernels`), and some rules write their
kernels or intrinsics in TVMScript, whose parser calls ``ast.parse``.  CPython 3.11 can fail two
``ast.parse`` calls made at once in different threads ("AST constructor recursion depth mismatch",
python/cpython#106905): a build of resnet-34 in TF32 for sm_90a failed so.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
from types import ModuleType

PARSE_LOCK = threading.RLock()

TENSOR_INTRINSICS = "tvm.s_tir.tensor_intrin"

# The file names Python's frozen import machinery runs under, and the modules that code is.
_IMPORT_MACHINERY_FILES = {f"<frozen {name}>": name for name in ("importlib._bootstrap", "importlib._bootstrap_external")}


def tensor_intrinsics() -> ModuleType:
    """TVM's tensor intrinsics (``tvm.s_tir.tensor_intrin``, its ``cuda`` submodule and the CPU ones),
    imported once.

    Their import parses ~500 TVMScript functions, and each ``T.prim_func`` takes ``inspect.stack()``,
    which looks up the module of every frame on the stack by its file name. The frames of the import
    machinery itself (``<frozen importlib._bootstrap>``) are in no module's ``__file__``, so each of those
    look-ups scans all of ``sys.modules``: 18,000 scans of ~1,200 modules took 40 s of the 48 s this
    import cost on 2 cores, and more the more modules were loaded. While it runs, inspect's file-to-module
    map is told which modules those frozen files are (importlib's own), and the entries are taken out again.
    """
    with PARSE_LOCK:
        if TENSOR_INTRINSICS in sys.modules:
            return sys.modules[TENSOR_INTRINSICS]
        added = {file: name for file, name in _IMPORT_MACHINERY_FILES.items() if file not in inspect.modulesbyfile}
        inspect.modulesbyfile.update(added)
        try:
            return importlib.import_module(TENSOR_INTRINSICS)
        finally:
            for file in added:
                inspect.modulesbyfile.pop(file, None)
