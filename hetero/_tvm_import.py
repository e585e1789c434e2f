"""Import TVM without PyTorch and without ml_dtypes.

TVM's FFI (tvm_ffi 0.1.14) imports torch whenever it is installed, to exchange tensors with it, and may
build a DLPack extension for it: `import hetero` took 7.3 s beside torch on the H200 machine against
1.5 s without. It also imports ml_dtypes where installed (onnx and others install it), for numpy's
bfloat16 and float8 types: with ml_dtypes 0.7.0 and numpy 2.4.6 that import alone took 1.4 s of
`import hetero`'s 2.1 s on the 2-core machine (numpy registering its casts; ml_dtypes 0.5.4: 10 ms).
hetero hands TVM no torch tensor (its PyTorch engine converts through numpy) and no bfloat16 or float8
array, so while TVM is imported, and only then, both are made to look absent; a later import (the
PyTorch engine's, onnx's) imports them as usual. Where one was imported first, TVM finds it and nothing
changes.

And TVM's `_ffi_api` modules each list every global function (52 lists of 2077 names, one FFI call a
name) to pick their own: while TVM is imported, the list is made once, and again only when functions
were added.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from collections.abc import Callable
from types import ModuleType

_HIDDEN = ("torch", "ml_dtypes")


class _Absent(importlib.abc.MetaPathFinder):
    def __init__(self, packages: list[str]):
        self.packages = packages

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - the finder protocol
        if name.split(".")[0] in self.packages:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def _listed_once(registry: ModuleType) -> Callable[[], list[str]]:
    """tvm_ffi's list_global_func_names, listing again only when the number of functions changed."""
    listed: list[str] = []

    def list_global_func_names() -> list[str]:
        names = registry.get_global_func("ffi.FunctionListGlobalNamesFunctor")()
        count = names(-1)
        if count != len(listed):
            listed[:] = [names(i) for i in range(count)]
        return list(listed)

    return list_global_func_names


def import_tvm() -> None:
    if "tvm" in sys.modules:
        return
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    hidden = [package for package in _HIDDEN if package not in sys.modules]
    absent = _Absent(hidden) if hidden else None
    if absent is not None:
        sys.meta_path.insert(0, absent)
    try:
        import tvm_ffi.registry

        original = tvm_ffi.registry.list_global_func_names
        tvm_ffi.registry.list_global_func_names = _listed_once(tvm_ffi.registry)
        try:
            import tvm  # noqa: F401
        finally:
            tvm_ffi.registry.list_global_func_names = original
    finally:
        if absent is not None:
            sys.meta_path.remove(absent)
