"""The layers of hetero's built-in networks, written once over a few abstract primitives.

A :class:`Graph` is handed to a network builder (``fn(g, x) -> logits``, or
``fn(g, *inputs) -> (outputs...)`` for a network of named inputs, see
:mod:`hetero.models`), which composes it from the layer methods here.  The CNNs'
are ``conv`` (with folded BatchNorm, bias, ReLU), ``batch_norm``, ``linear``,
``relu``, ``add``, ``concat``, ``max_pool``, ``avg_pool``, ``flatten``,
``global_pool``, ``classifier``; a transformer encoder's are ``embedding``,
``position_embedding``, ``layer_norm``, ``attention_bias``, ``self_attention``,
``linear`` over the last axis, ``gelu``, ``tanh`` and ``first_token``.  Every
layer method is expressed in the primitives an emitter implements (the abstract
methods, named with one leading underscore), so one builder gives the same
network in every form: Relax (:mod:`hetero.layers.relax`), ONNX
(:mod:`hetero.layers.onnx`) and PyTorch (:mod:`hetero.layers.torch`).

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
folded into; it becomes a per-channel scale and shift.  A transformer's weights
are BERT's initializer instead (normal, std 0.02), which its LayerNorms keep at
scale however deep it is.

This module imports only numpy (and hetero.errors): the emitters import their own packages.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from ..errors import HeteroError

__all__ = ["MASKED", "Builder", "Graph", "IntPair"]

T = TypeVar("T")  # an emitter's tensor: a Relax expression, an ONNX value name, a torch.Tensor
IntPair = int | tuple[int, int]
Init = Callable[[np.random.Generator], Sequence[np.ndarray]]
Builder = Callable[..., Any]  # fn(g, x) -> logits, or fn(g, *inputs) -> (outputs...)
# The additive attention bias of a masked position: exp() of it is 0 in float32, and it stays finite in
# float16 (whose largest value is 65504), so a float16 build adds no inf - inf = NaN.
MASKED = -1e4


def _pair(v: IntPair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Normal float32 values of mean 0, drawn as float32 (half the time and memory of float64 draws: a
    bert-base has 110M weights)."""
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= np.float32(std)
    return w


def _he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int,
               gain: float = 2.0) -> np.ndarray:
    return _normal(rng, shape, math.sqrt(gain / fan_in))


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
        self.ln_eps = 1e-12  # BERT's
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
        """(..., n, k) @ (k, m) or (..., n, k) @ (..., k, m), batched over the leading axes."""

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

    @abstractmethod
    def _gather(self, table: T, ids: T) -> T:
        """Rows of ``table`` (rows, width) at the integer ``ids``: shape ``(*ids.shape, width)``."""

    @abstractmethod
    def _first_rows(self, table: T, x: T) -> T:
        """Rows ``0 .. s - 1`` of ``table``, ``s`` the size of ``x``'s axis 1 (its sequence, static or not)."""

    @abstractmethod
    def _layer_norm(self, x: T, gamma: T, beta: T, eps: float) -> T:
        """Normalized over the last axis, then scaled by ``gamma`` and shifted by ``beta``."""

    @abstractmethod
    def _softmax(self, x: T) -> T:
        """Softmax over the last axis."""

    @abstractmethod
    def _gelu(self, x: T) -> T:
        """Exact GELU, ``x * (1 + erf(x / sqrt(2))) / 2`` (BERT's, not the tanh approximation)."""

    @abstractmethod
    def _tanh(self, x: T) -> T: ...

    @abstractmethod
    def _transpose(self, x: T, axes: tuple[int, ...]) -> T:
        """The axes of ``x`` permuted: output axis i is input axis ``axes[i]``."""

    @abstractmethod
    def _split_last(self, x: T, parts: int) -> T:
        """(..., k) -> (..., parts, k / parts)."""

    @abstractmethod
    def _merge_last(self, x: T) -> T:
        """(..., a, b) -> (..., a * b)."""

    @abstractmethod
    def _expand_dims(self, x: T, axes: tuple[int, ...]) -> T:
        """``x`` with axes of size 1 inserted at ``axes`` (positions in the output)."""

    @abstractmethod
    def _select(self, x: T, axis: int, index: int) -> T:
        """The slice of ``x`` at ``index`` along ``axis``, that axis dropped."""

    @abstractmethod
    def _scalar(self, value: float) -> T:
        """A constant of the graph's dtype that broadcasts with any tensor."""

    @abstractmethod
    def _cast(self, x: T) -> T:
        """``x`` (integers) in the graph's dtype."""

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

    def linear(self, x: T, cout: int, *, relu: bool = False, std: float | None = None) -> T:
        """Fully connected layer over the last axis; the weight is stored (in, out) so the graph is
        matmul + add.

        Weights are He-normal unless ``std`` is given (a transformer's: normal with that std): a
        hidden layer (``relu``) gets He gain 2; the logits layer gain 1.
        """
        cin = self.shape(x)[-1]
        gain = 2.0 if relu else 1.0

        def init(rng: np.random.Generator) -> list[np.ndarray]:
            if std is None:
                weight = _he_normal(rng, (cin, cout), cin, gain)
            else:
                weight = _normal(rng, (cin, cout), std)
            return [weight, rng.normal(0.0, 0.01, cout)]

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

    # ------------------------------------------------------ transformer layers
    def embedding(self, ids: T, rows: int, width: int, *, std: float = 0.02) -> T:
        """A learned table of ``rows`` vectors of ``width``, looked up at the integer ``ids``."""

        def init(rng: np.random.Generator) -> list[np.ndarray]:
            return [_normal(rng, (rows, width), std)]

        (table,) = self._declare("embedding", {"weight": (rows, width)}, init)
        return self._gather(table, ids)

    def position_embedding(self, x: T, rows: int, *, std: float = 0.02) -> T:
        """``x`` (n, sequence, width) plus a learned vector per position, from a table of ``rows`` positions.

        Raises HeteroError where the sequence is known and longer than ``rows`` (a Relax form would read
        past the table).
        """
        _, length, width = self.shape(x)
        if isinstance(length, int) and length > rows:
            raise HeteroError(f"a sequence of {length} is longer than the {rows} positions it embeds")

        def init(rng: np.random.Generator) -> list[np.ndarray]:
            return [_normal(rng, (rows, width), std)]

        (table,) = self._declare("embedding", {"weight": (rows, width)}, init)
        return self._add(x, self._first_rows(table, x))

    def layer_norm(self, x: T) -> T:
        """LayerNorm over the last axis, with a random but plausible scale (~1) and shift (~0)."""
        width = self.shape(x)[-1]

        def init(rng: np.random.Generator) -> list[np.ndarray]:
            return [rng.normal(1.0, 0.05, width), rng.normal(0.0, 0.05, width)]

        gamma, beta = self._declare("ln", {"weight": (width,), "bias": (width,)}, init)
        return self._layer_norm(x, gamma, beta, self.ln_eps)

    def gelu(self, x: T) -> T:
        return self._gelu(x)

    def tanh(self, x: T) -> T:
        return self._tanh(x)

    def attention_bias(self, mask: T) -> T:
        """The additive bias of an attention mask (n, sequence) of 1 (attend) and 0 (padding), as BERT
        makes it: ``(1 - mask) * MASKED``, shaped (n, 1, 1, sequence) to broadcast over heads and queries."""
        bias = self._add(self._multiply(self._cast(mask), self._scalar(-MASKED)), self._scalar(MASKED))
        return self._expand_dims(bias, (1, 2))

    def self_attention(self, x: T, bias: T, heads: int, *, std: float = 0.02) -> T:
        """Multi-head self-attention of ``x`` (n, sequence, width) with an :meth:`attention_bias`: the
        query, key, value and output projections (in that order), scaled dot products per head."""
        width = self.shape(x)[-1]
        if width % heads:
            raise ValueError(f"a width of {width} does not split into {heads} heads")

        def per_head(y: T) -> T:  # (n, sequence, width) -> (n, heads, sequence, width / heads)
            return self._transpose(self._split_last(y, heads), (0, 2, 1, 3))

        q, k, v = (per_head(self.linear(x, width, std=std)) for _ in range(3))
        scores = self._multiply(self._matmul(q, self._transpose(k, (0, 1, 3, 2))),
                                self._scalar(1.0 / math.sqrt(width // heads)))
        weights = self._softmax(self._add(scores, bias))
        context = self._merge_last(self._transpose(self._matmul(weights, v), (0, 2, 1, 3)))
        return self.linear(context, width, std=std)

    def first_token(self, x: T) -> T:
        """(n, sequence, width) -> (n, width): the first position's vector (BERT's [CLS])."""
        return self._select(x, 1, 0)
