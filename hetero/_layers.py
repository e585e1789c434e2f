"""Moved: the layers are :mod:`hetero.layers` (written once, emitted as Relax, ONNX or PyTorch).

Kept so that ``from hetero._layers import Graph`` (the Relax graph) still works.
"""

from .layers.relax import RelaxGraph as Graph

__all__ = ["Graph"]
