"""Layers of the built-in networks, written once (:mod:`.base`) and emitted as Relax, ONNX or PyTorch.

Only :mod:`.base` is imported here; :mod:`.relax` needs TVM, :mod:`.onnx` the onnx
package and :mod:`.torch` PyTorch, each imported where it is used.
"""

from .base import Builder, Graph

__all__ = ["Builder", "Graph"]
