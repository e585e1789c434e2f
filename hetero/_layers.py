"""Shared building blocks for the network builders in :mod:`hetero.models`.

A :class:`Graph` wraps a Relax ``BlockBuilder`` that is inside the dataflow
block of the function being built.  Every layer method emits Relax ops and
declares the layer's weights as function parameters, together with a recipe
that produces their values from a numpy ``Generator``.  Building the graph and
generating the weights are therefore separate steps: the graph (and the shapes
of all weights) is cheap, the weights (138M floats for vgg-16) are made only
when :meth:`Graph.init_weights` runs.

Weights are He-normal (std ``sqrt(2 / fan_in)``, which keeps the second moment
of activations constant through conv/linear + ReLU stacks).  BatchNorm layers
get random but plausible statistics (gamma ~ 1, beta ~ 0, mean ~ 0, var ~ 1)
and are folded on the host into the preceding conv, so the graph holds only
conv + bias.  The one exception is a pre-activation BatchNorm (DenseNet), which
sits on a concatenation of several convs' outputs and has no single conv to be
folded into; it becomes a per-channel scale and shift.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import tvm
from tvm import relax

__all__ = ["Graph"]

IntPair = int | tuple[int, int]
Init = Callable[[np.random.Generator], Sequence[np.ndarray]]


def _pair(v: IntPair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int,
               gain: float = 2.0) -> np.ndarray:
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= np.float32(math.sqrt(gain / fan_in))
    return w


def _bn_scale_shift(rng: np.random.Generator, c: int, eps: float,
                    gamma_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Random BatchNorm statistics, reduced to ``y = x * scale + shift``."""
    gamma = rng.uniform(0.8, 1.2, c) * gamma_scale
    beta = rng.normal(0.0, 0.05, c)
    mean = rng.normal(0.0, 0.05, c)
    var = rng.uniform(0.8, 1.2, c)
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


class Graph:
    """A Relax function body under construction, plus the recipe for its weights."""

    def __init__(self, bb: relax.BlockBuilder, dtype: str = "float32") -> None:
        self.bb = bb
        self.dtype = dtype
        self.bn_eps = 1e-5
        self.weights: list[relax.Var] = []
        self._inits: list[tuple[Init, list[tuple[int, ...]]]] = []
        self._counts: Counter[str] = Counter()

    # ---------------------------------------------------------------- plumbing
    @staticmethod
    def shape(x: relax.Expr) -> list:
        """Shape of ``x``: ints for static dims, the PrimExpr for symbolic ones."""
        return [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in x.ty.shape.values]

    def channels(self, x: relax.Expr) -> int:
        return self.shape(x)[1]

    def emit(self, expr: relax.Expr) -> relax.Var:
        return self.bb.emit(expr)

    def _declare(self, kind: str, shapes: dict[str, tuple[int, ...]], init: Init) -> list[relax.Var]:
        """Declare the weights of one layer (function parameters) and how to make them."""
        idx = self._counts[kind]
        self._counts[kind] += 1
        vs = [relax.Var(f"{kind}{idx}.{suffix}", relax.TensorType(shape, self.dtype))
              for suffix, shape in shapes.items()]
        self.weights.extend(vs)
        self._inits.append((init, list(shapes.values())))
        return vs

    def num_weights(self) -> int:
        return sum(math.prod(s) for _, shapes in self._inits for s in shapes)

    def init_weights(self, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """Values of all declared weights, in declaration (= parameter) order."""
        out: list[np.ndarray] = []
        for init, shapes in self._inits:
            arrays = init(rng)
            assert [a.shape for a in arrays] == shapes, ([a.shape for a in arrays], shapes)
            for a in arrays:
                a = np.ascontiguousarray(a, dtype=self.dtype)
                a.flags.writeable = False  # shared through the per-process cache
                out.append(a)
        return tuple(out)

    # ------------------------------------------------------------------ layers
    def conv(self, x: relax.Expr, cout: int, kernel: IntPair, stride: IntPair = 1,
             padding: IntPair = 0, groups: int = 1, *, bn: bool = True, bias: bool = True,
             relu: bool = True, bn_gamma: float = 1.0) -> relax.Var:
        """conv2d [+ folded BatchNorm] [+ bias] [+ ReLU].

        With ``bn`` the BatchNorm is folded into the weight and a bias; without
        it the conv has a plain bias unless ``bias=False``.  ``bn_gamma``
        scales the BatchNorm's gamma (used to damp residual branches).
        """
        cin = self.channels(x)
        kh, kw = _pair(kernel)
        wshape = (cout, cin // groups, kh, kw)
        fan_in = (cin // groups) * kh * kw
        eps = self.bn_eps
        has_bias = bn or bias

        def init(rng: np.random.Generator) -> list[np.ndarray]:
            w = _he_normal(rng, wshape, fan_in)
            if bn:
                scale, shift = _bn_scale_shift(rng, cout, eps, bn_gamma)
                return [w * scale.astype(np.float32)[:, None, None, None], shift.reshape(cout, 1, 1)]
            if bias:
                return [w, rng.normal(0.0, 0.01, (cout, 1, 1))]
            return [w]

        shapes = {"weight": wshape}
        if has_bias:
            shapes["bias"] = (cout, 1, 1)
        vs = self._declare("conv", shapes, init)
        y = self.emit(relax.op.nn.conv2d(x, vs[0], strides=_pair(stride), padding=_pair(padding),
                                         groups=groups))
        if has_bias:
            y = self.emit(relax.op.add(y, vs[1]))
        return self.relu(y) if relu else y

    def batch_norm(self, x: relax.Expr) -> relax.Var:
        """Inference BatchNorm that cannot be folded into a conv: per-channel scale and shift."""
        c = self.channels(x)
        eps = self.bn_eps

        def init(rng: np.random.Generator) -> list[np.ndarray]:
            scale, shift = _bn_scale_shift(rng, c, eps, 1.0)
            return [scale.reshape(c, 1, 1), shift.reshape(c, 1, 1)]

        scale, shift = self._declare("bn", {"scale": (c, 1, 1), "shift": (c, 1, 1)}, init)
        return self.emit(relax.op.add(self.emit(relax.op.multiply(x, scale)), shift))

    def linear(self, x: relax.Expr, cout: int, *, relu: bool = False) -> relax.Var:
        """Fully connected layer; the weight is stored (in, out) so the graph is matmul + add.

        A hidden layer (``relu``) gets He gain 2; the logits layer gain 1.
        """
        cin = self.shape(x)[1]
        gain = 2.0 if relu else 1.0

        def init(rng: np.random.Generator) -> list[np.ndarray]:
            return [_he_normal(rng, (cin, cout), cin, gain), rng.normal(0.0, 0.01, cout)]

        w, b = self._declare("fc", {"weight": (cin, cout), "bias": (cout,)}, init)
        y = self.emit(relax.op.add(self.emit(relax.op.matmul(x, w)), b))
        return self.relu(y) if relu else y

    def relu(self, x: relax.Expr) -> relax.Var:
        return self.emit(relax.op.nn.relu(x))

    def add(self, a: relax.Expr, b: relax.Expr) -> relax.Var:
        return self.emit(relax.op.add(a, b))

    def concat(self, xs: Sequence[relax.Expr]) -> relax.Var:
        return self.emit(relax.op.concat(list(xs), axis=1))

    def max_pool(self, x: relax.Expr, kernel: int, stride: int, padding: int = 0, *,
                 ceil_mode: bool = False) -> relax.Var:
        return self.emit(relax.op.nn.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode))

    def avg_pool(self, x: relax.Expr, kernel: int, stride: int, padding: int = 0) -> relax.Var:
        # count_include_pad=True is PyTorch's default (used by Inception v3's pool branches)
        return self.emit(relax.op.nn.avg_pool2d(x, kernel, stride, padding, count_include_pad=True))

    def flatten(self, x: relax.Expr) -> relax.Var:
        return self.emit(relax.op.reshape(x, (self.shape(x)[0], -1)))

    def global_pool(self, x: relax.Expr) -> relax.Var:
        """Global average pool to (n, C)."""
        return self.flatten(self.emit(relax.op.nn.adaptive_avg_pool2d(x, 1)))

    def classifier(self, x: relax.Expr, classes: int = 1000) -> relax.Var:
        """Global average pool, then the logits layer."""
        return self.linear(self.global_pool(x), classes)
