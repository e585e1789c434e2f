"""Import TVM without PyTorch.

TVM's FFI (tvm_ffi 0.1.14) imports torch whenever it is installed, to exchange tensors with it, and may
build a DLPack extension for it: `import hetero` took 7.3 s beside torch on the H200 machine against
1.5 s without. hetero hands TVM no torch tensor (its PyTorch engine converts through numpy), so while
TVM is imported, and only then, torch is made to look absent; a later `import torch` (the PyTorch
engine's) imports it as usual. Where torch was imported first, TVM finds it and nothing changes.
"""

from __future__ import annotations

import importlib.abc
import os
import sys


class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - the finder protocol
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def import_tvm() -> None:
    if "tvm" in sys.modules:
        return
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    absent = None if "torch" in sys.modules else _Absent()
    if absent is not None:
        sys.meta_path.insert(0, absent)
    try:
        import tvm  # noqa: F401
    finally:
        if absent is not None:
            sys.meta_path.remove(absent)
