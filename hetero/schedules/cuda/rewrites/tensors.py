"""What the Relax rewrites read of an expression's type, and how they map a module's functions."""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax


def tensor_shape(expr: relax.Expr) -> list | None:
    """The extents of a tensor-typed ``expr``, None if its shape is not known."""
    ty = expr.ty
    if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr):
        return list(ty.shape.values)
    return None


def tensor_dtype(expr: relax.Expr) -> str | None:
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def map_functions(mod: tvm.IRModule, fn: Callable[[relax.Function], relax.Function]) -> tvm.IRModule:
    """``mod`` with ``fn`` applied to each Relax function, in a new module: never the caller's."""
    mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = fn(func)
    return mod
