"""The layers of hetero's built-in networks, written once over a few abstract primitives.

A :class:`Graph` is handed to a network builder (``fn(g, x) -> logits``, see
:mod:`hetero.models`), which composes it from the layer methods here: ``conv``
(with folded BatchNorm, bias, ReLU), ``batch_norm``, ``linear``, ``relu``, ``add``,
``concat``, ``max_pool``, ``avg_pool``, ``flatten``, ``global_pool``,
``classifier``.  Every layer method is expressed in the primitives an emitter
implements (``_conv2d``, ``_add``, ``_multiply``, ``_matmul``, ``_relu``,
``_concat``, ``_max_pool``, ``_avg_pool``, ``_global_avg_pool``, ``_flatten``,
``_shape``, ``_param``), so one builder gives the same network in every form:
Relax (:mod:`hetero.layers.relax`), ONNX (:mod:`hetero.layers.onnx`) and
PyTorch (:mod:`hetero.layers.torch`).

Each layer declares its weights, in order, by name (``conv3.weight``) and with
a recipe that produces their values from a numpy ``Generator``.  Building the
graph and generating the weights are therefore separate steps: the graph (and
the shapes of all weights) is cheap, the weights (138M floats for vgg-16) are
made only when :meth:`Graph.init_weights` runs, once, whatever the form.

Weights are He-normal (std ``sqrt(2 / fan_in)``, which keeps the second moment
of activations constant through conv/linear + ReLU stacks).  BatchNorm layers
get random but plausible statistics (gamma ~ 1, beta ~ 0, mean ~ 0, var ~ 1)
and are folded on the host into the preceding conv, so the graph holds only
conv + bias.  The one exception is a pre-activation BatchNorm (DenseNet), which
sits on a concatenation of several convs' outputs and has no single conv to be
folded into; it becomes a per-channel scale and shift.

This module imports only numpy: the emitters import their own packages.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

__all__ = ["Builder", "Graph", "IntPair"]

T = TypeVar("T")  # an emitter's tensor: a Relax expression, an ONNX value name, a torch.Tensor
IntPair = int | tuple[int, int]
Init = Callable[[np.random.Generator], Sequence[np.ndarray]]
Builder = Callable[["Graph", Any], Any]  # fn(g, x) -> logits


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


class Graph(ABC, Generic[T]):
    """A network under construction in some emitter's form, plus the recipe for its weights.

    Subclasses implement the primitives (the abstract methods, named with one
    leading underscore); the layers are defined only in this class.  Tensors are
    NCHW with the batch first.
    """

    def __init__(self, dtype: str = "float32") -> None:
        self.dtype = dtype
        self.bn_eps = 1e-5
        self.weight_names: list[str] = []  # in declaration (= parameter) order
        self.weight_shapes: list[tuple[int, ...]] = []
        self._inits: list[tuple[Init, list[tuple[int, ...]]]] = []
        self._counts: dict[str, int] = {}

    # ------------------------------------------------------ primitives (emitters)
    @abstractmethod
    def _param(self, name: str, shape: tuple[int, ...]) -> T:
        """The tensor of the next declared weight, called in declaration order."""

    @abstractmethod
    def _shape(self, x: T) -> list:
        """Shape of ``x``: ints for static dims, the emitter's own object for the batch."""

    @abstractmethod
    def _conv2d(self, x: T, w: T, stride: tuple[int, int], padding: tuple[int, int],
                groups: int) -> T:
        """2-D convolution, OIHW weight, symmetric ``padding`` (h, w), no bias."""

    @abstractmethod
    def _add(self, a: T, b: T) -> T:
        """Elementwise sum with numpy broadcasting."""

    @abstractmethod
    def _multiply(self, a: T, b: T) -> T:
        """Elementwise product with numpy broadcasting."""

    @abstractmethod
    def _matmul(self, a: T, b: T) -> T:
        """(n, k) @ (k, m)."""

    @abstractmethod
    def _relu(self, x: T) -> T: ...

    @abstractmethod
    def _concat(self, xs: list[T]) -> T:
        """Concatenation along the channels (axis 1)."""

    @abstractmethod
    def _max_pool(self, x: T, kernel: int, stride: int, padding: int, ceil_mode: bool) -> T: ...

    @abstractmethod
    def _avg_pool(self, x: T, kernel: int, stride: int, padding: int) -> T:
        """Average pool counting the padding (``count_include_pad=True``, PyTorch's default)."""

    @abstractmethod
    def _global_avg_pool(self, x: T) -> T:
        """(n, C, H, W) -> (n, C, 1, 1)."""

    @abstractmethod
    def _flatten(self, x: T) -> T:
        """(n, ...) -> (n, -1)."""

    # ---------------------------------------------------------------- plumbing
    def shape(self, x: T) -> list:
        """Shape of ``x``: ints for static dims, the emitter's object for the (symbolic) batch."""
        return self._shape(x)

    def channels(self, x: T) -> int:
        return self.shape(x)[1]

    def _declare(self, kind: str, shapes: dict[str, tuple[int, ...]], init: Init) -> list[T]:
        """Declare the weights of one layer, named ``{kind}{index}.{suffix}``, and how to make them."""
        idx = self._counts.get(kind, 0)
        self._counts[kind] = idx + 1
        names = [f"{kind}{idx}.{suffix}" for suffix in shapes]
        self.weight_names.extend(names)
        self.weight_shapes.extend(shapes.values())
        self._inits.append((init, list(shapes.values())))
        return [self._param(name, shape) for name, shape in zip(names, shapes.values())]

    def num_weights(self) -> int:
        return sum(math.prod(s) for s in self.weight_shapes)

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
    def conv(self, x: T, cout: int, kernel: IntPair, stride: IntPair = 1,
             padding: IntPair = 0, groups: int = 1, *, bn: bool = True, bias: bool = True,
             relu: bool = True, bn_gamma: float = 1.0) -> T:
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
        y = self._conv2d(x, vs[0], _pair(stride), _pair(padding), groups)
        if has_bias:
            y = self._add(y, vs[1])
        return self.relu(y) if relu else y

    def batch_norm(self, x: T) -> T:
        """Inference BatchNorm that cannot be folded into a conv: per-channel scale and shift."""
        c = self.channels(x)
        eps = self.bn_eps

        def init(rng: np.random.Generator) -> list[np.ndarray]:
            scale, shift = _bn_scale_shift(rng, c, eps, 1.0)
            return [scale.reshape(c, 1, 1), shift.reshape(c, 1, 1)]

        scale, shift = self._declare("bn", {"scale": (c, 1, 1), "shift": (c, 1, 1)}, init)
        return self._add(self._multiply(x, scale), shift)

    def linear(self, x: T, cout: int, *, relu: bool = False) -> T:
        """Fully connected layer; the weight is stored (in, out) so the graph is matmul + add.

        A hidden layer (``relu``) gets He gain 2; the logits layer gain 1.
        """
        cin = self.shape(x)[1]
        gain = 2.0 if relu else 1.0

        def init(rng: np.random.Generator) -> list[np.ndarray]:
            return [_he_normal(rng, (cin, cout), cin, gain), rng.normal(0.0, 0.01, cout)]

        w, b = self._declare("fc", {"weight": (cin, cout), "bias": (cout,)}, init)
        y = self._add(self._matmul(x, w), b)
        return self.relu(y) if relu else y

    def relu(self, x: T) -> T:
        return self._relu(x)

    def add(self, a: T, b: T) -> T:
        return self._add(a, b)

    def concat(self, xs: Sequence[T]) -> T:
        return self._concat(list(xs))

    def max_pool(self, x: T, kernel: int, stride: int, padding: int = 0, *,
                 ceil_mode: bool = False) -> T:
        return self._max_pool(x, kernel, stride, padding, ceil_mode)

    def avg_pool(self, x: T, kernel: int, stride: int, padding: int = 0) -> T:
        # count_include_pad=True is PyTorch's default (used by Inception v3's pool branches)
        return self._avg_pool(x, kernel, stride, padding)

    def flatten(self, x: T) -> T:
        return self._flatten(x)

    def global_pool(self, x: T) -> T:
        """Global average pool to (n, C)."""
        return self.flatten(self._global_avg_pool(x))

    def classifier(self, x: T, classes: int = 1000) -> T:
        """Global average pool, then the logits layer."""
        return self.linear(self.global_pool(x), classes)
