"""The network registry: standard CNNs built in TVM Relax, plus ONNX and PyTorch import.

Every network is one Relax function ``main(x, *weights) -> logits`` whose batch
dimension is a symbolic ``n``, so one compiled module serves every batch size.
Weights are function parameters, not constants (compiled modules stay small);
``Network.params`` holds their values, in parameter order.  They are random but
deterministic (a numpy Generator seeded from the network's name), He-normal so
activations keep their scale through the depth; BatchNorm is folded into the
preceding conv on the host.  Nothing is downloaded.

Builders are registered timm-style::

    @register("resnet-18")
    def resnet18(g, x):
        return _resnet(g, x, _basic_block, (2, 2, 2, 2))

and composed from the blocks in this module and the layers of
:class:`hetero.layers.Graph`, which are written once over a few primitives, so one
builder gives the network in every form an engine runs: the Relax module
(``Network.module``), an ONNX model (``Network.onnx_model()``) and a PyTorch
module (``Network.torch_module()``), all with the same weights (``Network.params``).
A network also comes from an .onnx file (``get_network(path)``: its ONNX form is
the file's model, it has no PyTorch form) or from a PyTorch module
(:func:`from_torch`).  What a network came from is its *origin*, which makes the
forms other than Relax.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import importlib.util
import math
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from .errors import HeteroError, one_line
from .layers import Graph
from .layers.relax import RelaxGraph, build_module

__all__ = [
    "FormUnavailableError",
    "Network",
    "OnnxUnavailableError",
    "TorchConversionError",
    "UnknownNetworkError",
    "from_torch",
    "get_network",
    "network_names",
    "register",
]


class UnknownNetworkError(ValueError):
    """A network name that is neither registered nor a path to an .onnx file."""


class OnnxUnavailableError(HeteroError, ImportError):
    """An .onnx model was asked for but the optional ``onnx`` package is not installed.

    An ImportError, and a HeteroError so the command lines report it in one line.
    """


class FormUnavailableError(HeteroError):
    """A network has no such form (an .onnx file has no PyTorch module), or the package that
    makes or holds the form is not installed."""


class TorchConversionError(HeteroError, ValueError):
    """A PyTorch module that cannot be exported, or imported into Relax with a symbolic batch."""


_FORM_NAMES = {"onnx": "ONNX", "torch": "PyTorch"}
Tensor = Any  # what a builder's Graph works on: a Relax expression, an ONNX value, a torch.Tensor


def _require(package: str, form: str, name: str, install: str) -> None:
    """Raise FormUnavailableError, saying ``pip install {install}``, unless ``package`` imports."""
    try:
        __import__(package)
    except ImportError:
        raise FormUnavailableError(f"the {form} form of network {name!r} needs {package}: "
                                   f"pip install {install}") from None


class _Origin:
    """What a Network was made from; makes its forms other than the Relax module.

    The base class has neither form (a Network built directly from a Relax module).
    """

    forms: tuple[str, ...] = ("relax",)
    what = "it was built directly as a Relax module"

    def onnx_model(self, net: Network):  # noqa: ANN201 - onnx.ModelProto, onnx not imported here
        raise FormUnavailableError(f"network {net.name!r} has no ONNX form: {self.what}")

    def torch_module(self, net: Network):  # noqa: ANN201 - torch.nn.Module
        raise FormUnavailableError(f"network {net.name!r} has no PyTorch form: {self.what}")


class _BuilderOrigin(_Origin):
    """A registered builder: every form is emitted from it, with the network's params."""

    forms = ("relax", "onnx", "torch")

    def __init__(self, builder: Builder) -> None:
        self.builder = builder

    def onnx_model(self, net: Network):  # noqa: ANN201
        _require("onnx", "ONNX", net.name, "'hetero[onnx]'")
        from .layers.onnx import build_model

        return build_model(self.builder, net.input_shape, net.params, name=net.name, dtype=net.dtype)

    def torch_module(self, net: Network):  # noqa: ANN201
        _require("torch", "PyTorch", net.name, "'hetero[torch]'")
        from .layers.torch import BuiltModule

        return BuiltModule(self.builder, net.input_shape, net.params, name=net.name, dtype=net.dtype)


class _OnnxOrigin(_Origin):
    """An .onnx file: its ONNX form is the file's own model, read again from the bytes kept here
    (or, for weights in external files, a copy of the model as loaded)."""

    forms = ("relax", "onnx")
    what = "it was read from an ONNX file"

    def __init__(self, raw: bytes | None, model: Any = None) -> None:
        self.raw = raw
        self.model = model

    def onnx_model(self, net: Network):  # noqa: ANN201
        _require("onnx", "ONNX", net.name, "'hetero[onnx]'")
        import onnx

        if self.raw is not None:
            return onnx.load_from_string(self.raw)
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        return model


class _TorchOrigin(_Origin):
    """A PyTorch module (:func:`from_torch`): its PyTorch form is the module itself; its ONNX
    form is exported once (torch.onnx's dynamo exporter, batch dimension ``N``)."""

    forms = ("relax", "onnx", "torch")

    def __init__(self, module: Any, example: Any) -> None:
        self.module = module
        self.example = example  # an input batch of 2, on the module's device
        self._onnx: bytes | None = None
        self._lock = threading.Lock()

    def torch_module(self, net: Network):  # noqa: ANN201
        # a copy: engines move it to their device, precision and memory format, which must not touch the user's
        return copy.deepcopy(self.module).eval()

    def onnx_model(self, net: Network):  # noqa: ANN201
        _require("onnx", "ONNX", net.name, "'hetero[onnx]'")
        _require("onnxscript", "ONNX", net.name, "onnxscript")
        import onnx
        import torch

        with self._lock:
            if self._onnx is None:
                try:
                    program = torch.onnx.export(
                        self.module.eval(), (self.example,), dynamo=True, external_data=False,
                        input_names=["x"], output_names=["y"],
                        dynamic_shapes=({0: torch.export.Dim("N", min=1)},), verbose=False)
                except Exception as err:  # unsupported ops, ...
                    raise TorchConversionError(f"cannot export network {net.name!r} to ONNX: "
                                               f"{one_line(err)}") from None
                self._onnx = program.model_proto.SerializeToString()
        return onnx.load_from_string(self._onnx)


@dataclass(frozen=True, eq=False)
class Network:
    """A network ready to compile: Relax module, weight values, per-sample shapes."""

    name: str  # registry name, or the .onnx file's stem
    module: tvm.IRModule  # one Relax function "main"(x, *weights) -> logits, batch dim symbolic
    params: tuple[np.ndarray, ...]  # weights, in the order of main's parameters after x
    input_shape: tuple[int, ...]  # ONE sample, e.g. (3, 224, 224)
    output_shape: tuple[int, ...]  # ONE sample, e.g. (1000,)
    dtype: str = "float32"
    # what the network was made from, which makes its ONNX and PyTorch forms
    origin: _Origin = field(default_factory=_Origin, repr=False)

    @functools.cached_property
    def digest(self) -> str:
        """The network's identity: a digest of its graph (constants included), shapes and weights.

        Two models with one name but other weights or another graph have other digests, so every
        cache and table entry that must not be shared between them is keyed by this, never by name.
        """
        h = hashlib.sha256()
        h.update(f"{tvm_ffi.structural_hash(self.module)} {self.input_shape} {self.output_shape} {self.dtype}".encode())
        for p in self.params:
            h.update(f"|{p.dtype} {p.shape}|".encode())
            h.update(np.ascontiguousarray(p).data)
        return h.hexdigest()[:16]

    @property
    def key(self) -> str:
        """The name people read with the digest that identifies the network, e.g. "model@3f2a...":
        what profile tables, tuning records and caches are keyed by."""
        return f"{self.name}@{self.digest}"

    @property
    def input_bytes(self) -> int:
        """Bytes of one sample's input."""
        return int(np.prod(self.input_shape)) * np.dtype(self.dtype).itemsize

    @property
    def output_bytes(self) -> int:
        """Bytes of one sample's output."""
        return int(np.prod(self.output_shape)) * np.dtype(self.dtype).itemsize

    @property
    def forms(self) -> tuple[str, ...]:
        """The forms this network has: "relax" always, "onnx" and "torch" as its origin allows
        (whether their packages are installed is not checked)."""
        return self.origin.forms

    def why_no_form(self, form: str) -> str | None:
        """Why this network has no `form` ("onnx", "torch") here, or None when it has one: what an engine
        asks before it loads (looks the package up, imports nothing)."""
        if form not in self.forms:
            return f"{self.name} has no {_FORM_NAMES[form]} form: {self.origin.what}"
        if importlib.util.find_spec(form) is None:
            return f"its {_FORM_NAMES[form]} form needs {form}: pip install 'hetero[{form}]'"
        return None

    def onnx_model(self):  # noqa: ANN201 - onnx.ModelProto; onnx is imported only here
        """The network as an ``onnx.ModelProto``: one input of shape ``(N, *input_shape)``, one
        output, symbolic batch ``N``; a new object on every call (callers may change it).

        A registered network's model is emitted from its builder (input ``x``, output ``y``,
        initializers named like the Relax weight parameters and holding ``params``); an .onnx
        file's is the file's own model; a PyTorch module's is exported by ``torch.onnx``.

        Raises FormUnavailableError when the network has no ONNX form or onnx is not installed.
        """
        return self.origin.onnx_model(self)

    def onnx_bytes(self) -> bytes:
        """The ONNX form serialized, as ONNX Runtime and OpenVINO load it. An .onnx file's is the file's own
        bytes. A registered network's is kept in hetero's cache (hetero.cache.cache_dir) under its digest, the
        digest of the code that emits it and onnx's version, so that a later run loads it without importing
        onnx, whose import of ml_dtypes 0.7 alone took 1.4 s on the 2-core machine (0.5.4: 10 ms).

        Raises FormUnavailableError as :meth:`onnx_model` does."""
        if isinstance(self.origin, _OnnxOrigin) and self.origin.raw is not None:
            return self.origin.raw
        if not isinstance(self.origin, _BuilderOrigin) or self.why_no_form("onnx"):
            return self.onnx_model().SerializeToString()
        from .cache import cache_dir, code_digest

        emitter = code_digest(sorted(Path(__file__).with_name("layers").glob("*.py")))
        kept = cache_dir() / "onnx" / f"{self.name}-{self.digest}-{emitter}-onnx{importlib.metadata.version('onnx')}"
        try:
            return kept.read_bytes()
        except OSError:
            pass
        raw = self.onnx_model().SerializeToString()
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("wb", dir=kept.parent, delete=False) as staged:
                staged.write(raw)
            os.replace(staged.name, kept)
        except OSError:  # a cache that cannot be written costs the export again next time, nothing more
            pass
        return raw

    def torch_module(self):  # noqa: ANN201 - torch.nn.Module; torch is imported only here
        """The network as a ``torch.nn.Module`` in eval mode, ``forward(x) -> logits``.

        A registered network's is a new module on every call, holding a copy of ``params``; a
        network made by :func:`from_torch` returns a copy of that module.  An .onnx file has none.

        Raises FormUnavailableError when the network has no PyTorch form or torch is not installed.
        """
        return self.origin.torch_module(self)

    @property
    def num_params(self) -> int:
        """Number of weight values (scalars) in ``params``."""
        return sum(int(p.size) for p in self.params)

    def random_input(self, batch: int, seed: int = 0) -> np.ndarray:
        """A deterministic input batch of shape ``(batch, *input_shape)``.

        Samples are drawn in order from one stream, so sample ``i`` is the same
        for every ``batch > i`` (``random_input(2)[0] == random_input(1)[0]``).
        """
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((batch, *self.input_shape), dtype=np.float32)
        return x.astype(self.dtype, copy=False)

    def __repr__(self) -> str:
        return (f"Network(name={self.name!r}, input_shape={self.input_shape}, "
                f"output_shape={self.output_shape}, dtype={self.dtype!r}, "
                f"params={len(self.params)} arrays / {self.num_params:,} values)")


# ------------------------------------------------------------------ registry

Builder = Callable[[Graph, Tensor], Tensor]


@dataclass(frozen=True)
class _Entry:
    build: Builder
    input_shape: tuple[int, ...]


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, *, input_shape: tuple[int, ...] = (3, 224, 224)) -> Callable[[Builder], Builder]:
    """Decorator: record ``fn(g: Graph, x) -> logits`` as the builder of network ``name``."""

    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"network {name!r} is registered twice")
        _REGISTRY[name] = _Entry(fn, tuple(input_shape))
        return fn

    return deco


def network_names() -> list[str]:
    """Registry names, in registration order (families together, small to large)."""
    return list(_REGISTRY)


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


@dataclass(frozen=True)
class _Built:
    module: tvm.IRModule
    graph: RelaxGraph
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


@functools.cache
def _build(name: str) -> _Built:
    """The Relax module of a registered network and its weight recipe (no weight values yet)."""
    entry = _REGISTRY[name]
    mod, g, output_shape = build_module(entry.build, entry.input_shape)
    return _Built(mod, g, entry.input_shape, output_shape)


def get_network(name_or_path: str | os.PathLike[str]) -> Network:
    """A registered network by name, or an ONNX model by a path ending in ``.onnx``.

    Cached per process: repeated calls for one registered name, or for ONNX files of the same
    content, return the same object (whose weight arrays are read-only, since they are shared).
    An ONNX file is looked up by what it holds, not by its path, so a file replaced on disk, or
    another file of the same name, is never answered with the model read before.
    """
    name_or_path = os.fspath(name_or_path)
    if name_or_path in _REGISTRY:
        return _registered(name_or_path)
    if name_or_path.lower().endswith(".onnx"):
        return _load_onnx(name_or_path)
    raise UnknownNetworkError(
        f"unknown network {name_or_path!r}; choose from: {', '.join(network_names())}"
    )


@functools.cache
def _registered(name: str) -> Network:
    built = _build(name)
    params = built.graph.init_weights(np.random.default_rng(_seed(name)))
    return Network(name, built.module, params, built.input_shape, built.output_shape,
                   origin=_BuilderOrigin(_REGISTRY[name].build))


# ---------------------------------------------------------------- MobileNet


@register("mobilenet")
def mobilenet(g: Graph, x: Tensor) -> Tensor:
    """MobileNet v1, width 1.0, 224x224: depthwise-separable convs."""
    x = g.conv(x, 32, 3, 2, 1)
    for cout, stride in [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                         *[(512, 1)] * 5, (1024, 2), (1024, 1)]:
        cin = g.channels(x)
        x = g.conv(x, cin, 3, stride, 1, groups=cin)  # depthwise
        x = g.conv(x, cout, 1)  # pointwise
    return g.classifier(x)


# --------------------------------------------------------------- SqueezeNet


def _fire(g: Graph, x: Tensor, squeeze: int, expand: int) -> Tensor:
    s = g.conv(x, squeeze, 1, bn=False)
    return g.concat([g.conv(s, expand, 1, bn=False), g.conv(s, expand, 3, 1, 1, bn=False)])


def _squeezenet(g: Graph, x: Tensor, stem: tuple[int, int],
                stages: Sequence[Sequence[tuple[int, int]]]) -> Tensor:
    """``stem`` = (channels, kernel) of the stride-2 first conv; each stage starts with a max pool."""
    x = g.conv(x, stem[0], stem[1], 2, bn=False)
    for fires in stages:
        x = g.max_pool(x, 3, 2, ceil_mode=True)
        for squeeze, expand in fires:
            x = _fire(g, x, squeeze, expand)
    x = g.conv(x, 1000, 1, bn=False)  # the classifier is a 1x1 conv + ReLU
    return g.global_pool(x)


@register("squeezenet_v1.0")
def squeezenet_v1_0(g: Graph, x: Tensor) -> Tensor:
    return _squeezenet(g, x, (96, 7), [[(16, 64), (16, 64), (32, 128)],
                                       [(32, 128), (48, 192), (48, 192), (64, 256)],
                                       [(64, 256)]])


@register("squeezenet_v1.1")
def squeezenet_v1_1(g: Graph, x: Tensor) -> Tensor:
    return _squeezenet(g, x, (64, 3), [[(16, 64), (16, 64)],
                                       [(32, 128), (32, 128)],
                                       [(48, 192), (48, 192), (64, 256), (64, 256)]])


# ------------------------------------------------------------------- ResNet


def _shortcut(g: Graph, x: Tensor, cout: int, stride: int) -> Tensor:
    if stride == 1 and g.channels(x) == cout:
        return x
    return g.conv(x, cout, 1, stride, relu=False)


def _basic_block(g: Graph, x: Tensor, width: int, stride: int, gamma: float) -> Tensor:
    y = g.conv(x, width, 3, stride, 1)
    y = g.conv(y, width, 3, 1, 1, relu=False, bn_gamma=gamma)
    return g.relu(g.add(y, _shortcut(g, x, width, stride)))


def _bottleneck(g: Graph, x: Tensor, width: int, stride: int, gamma: float) -> Tensor:
    y = g.conv(x, width, 1)
    y = g.conv(y, width, 3, stride, 1)  # stride on the 3x3 (torchvision's "v1.5")
    y = g.conv(y, width * 4, 1, relu=False, bn_gamma=gamma)
    return g.relu(g.add(y, _shortcut(g, x, width * 4, stride)))


def _resnet(g: Graph, x: Tensor, block: Callable[..., Tensor],
            depths: Sequence[int]) -> Tensor:
    x = g.conv(x, 64, 7, 2, 3)
    x = g.max_pool(x, 3, 2, 1)
    # Each residual add grows the variance by (1 + gamma^2); damping the last
    # BatchNorm of every branch keeps the total growth bounded (~e) at any depth.
    gamma = 1.0 / math.sqrt(sum(depths))
    for stage, depth in enumerate(depths):
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            x = block(g, x, 64 << stage, stride, gamma)
    return g.classifier(x)


@register("resnet-18")
def resnet18(g: Graph, x: Tensor) -> Tensor:
    return _resnet(g, x, _basic_block, (2, 2, 2, 2))


@register("resnet-34")
def resnet34(g: Graph, x: Tensor) -> Tensor:
    return _resnet(g, x, _basic_block, (3, 4, 6, 3))


@register("resnet-50")
def resnet50(g: Graph, x: Tensor) -> Tensor:
    return _resnet(g, x, _bottleneck, (3, 4, 6, 3))


# -------------------------------------------------------------- Inception v3
# A conv spec is (channels, kernel[, stride[, padding]]); every conv is conv-BN-ReLU.


def _convs(g: Graph, x: Tensor, *specs: tuple) -> Tensor:
    for spec in specs:
        x = g.conv(x, *spec)
    return x


def _split_1x3_3x1(g: Graph, x: Tensor, c: int) -> Tensor:
    return g.concat([g.conv(x, c, (1, 3), 1, (0, 1)), g.conv(x, c, (3, 1), 1, (1, 0))])


def _inception_a(g: Graph, x: Tensor, pool_features: int) -> Tensor:
    return g.concat([
        _convs(g, x, (64, 1)),
        _convs(g, x, (48, 1), (64, 5, 1, 2)),
        _convs(g, x, (64, 1), (96, 3, 1, 1), (96, 3, 1, 1)),
        _convs(g, g.avg_pool(x, 3, 1, 1), (pool_features, 1)),
    ])


def _inception_b(g: Graph, x: Tensor) -> Tensor:
    return g.concat([
        _convs(g, x, (384, 3, 2)),
        _convs(g, x, (64, 1), (96, 3, 1, 1), (96, 3, 2)),
        g.max_pool(x, 3, 2),
    ])


def _inception_c(g: Graph, x: Tensor, c7: int) -> Tensor:
    h, v = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))  # 1x7 and 7x1 (kernel, stride, padding)
    return g.concat([
        _convs(g, x, (192, 1)),
        _convs(g, x, (c7, 1), (c7, *h), (192, *v)),
        _convs(g, x, (c7, 1), (c7, *v), (c7, *h), (c7, *v), (192, *h)),
        _convs(g, g.avg_pool(x, 3, 1, 1), (192, 1)),
    ])


def _inception_d(g: Graph, x: Tensor) -> Tensor:
    return g.concat([
        _convs(g, x, (192, 1), (320, 3, 2)),
        _convs(g, x, (192, 1), (192, (1, 7), 1, (0, 3)), (192, (7, 1), 1, (3, 0)), (192, 3, 2)),
        g.max_pool(x, 3, 2),
    ])


def _inception_e(g: Graph, x: Tensor) -> Tensor:
    return g.concat([
        _convs(g, x, (320, 1)),
        _split_1x3_3x1(g, _convs(g, x, (384, 1)), 384),
        _split_1x3_3x1(g, _convs(g, x, (448, 1), (384, 3, 1, 1)), 384),
        _convs(g, g.avg_pool(x, 3, 1, 1), (192, 1)),
    ])


@register("inception_v3", input_shape=(3, 299, 299))
def inception_v3(g: Graph, x: Tensor) -> Tensor:
    """Inception v3 as in torchvision, without the auxiliary classifier."""
    g.bn_eps = 1e-3
    x = _convs(g, x, (32, 3, 2), (32, 3), (64, 3, 1, 1))
    x = g.max_pool(x, 3, 2)
    x = _convs(g, x, (80, 1), (192, 3))
    x = g.max_pool(x, 3, 2)
    for pool_features in (32, 64, 64):
        x = _inception_a(g, x, pool_features)
    x = _inception_b(g, x)
    for c7 in (128, 160, 160, 192):
        x = _inception_c(g, x, c7)
    x = _inception_d(g, x)
    x = _inception_e(g, x)
    x = _inception_e(g, x)
    return g.classifier(x)


# ---------------------------------------------------------------------- VGG


def _vgg(g: Graph, x: Tensor, depths: Sequence[int]) -> Tensor:
    for stage, depth in enumerate(depths):
        for _ in range(depth):
            x = g.conv(x, min(64 << stage, 512), 3, 1, 1, bn=False)
        x = g.max_pool(x, 2, 2)
    x = g.flatten(x)  # 512 x 7 x 7 at 224x224 (torchvision's adaptive pool to 7x7 is a no-op)
    x = g.linear(x, 4096, relu=True)
    x = g.linear(x, 4096, relu=True)
    return g.linear(x, 1000)


@register("vgg-16")
def vgg16(g: Graph, x: Tensor) -> Tensor:
    return _vgg(g, x, (2, 2, 3, 3, 3))


@register("vgg-19")
def vgg19(g: Graph, x: Tensor) -> Tensor:
    return _vgg(g, x, (2, 2, 4, 4, 4))


# ----------------------------------------------------------------- DenseNet
# Pre-activation (BN-ReLU-conv): the BN in front of each conv reads a
# concatenation of many convs' outputs, so it stays a per-channel scale+shift;
# the BN between a dense layer's 1x1 and 3x3 convs is folded into the 1x1.


def _dense_layer(g: Graph, x: Tensor, growth: int, bn_size: int) -> Tensor:
    y = g.conv(g.relu(g.batch_norm(x)), bn_size * growth, 1)
    return g.conv(y, growth, 3, 1, 1, bn=False, bias=False, relu=False)


def _transition(g: Graph, x: Tensor) -> Tensor:
    y = g.relu(g.batch_norm(x))
    y = g.conv(y, g.channels(x) // 2, 1, bn=False, bias=False, relu=False)
    return g.avg_pool(y, 2, 2)


def _densenet(g: Graph, x: Tensor, growth: int, blocks: Sequence[int],
              init_features: int, bn_size: int = 4) -> Tensor:
    x = g.conv(x, init_features, 7, 2, 3)
    x = g.max_pool(x, 3, 2, 1)
    for i, layers in enumerate(blocks):
        for _ in range(layers):
            x = g.concat([x, _dense_layer(g, x, growth, bn_size)])
        if i < len(blocks) - 1:
            x = _transition(g, x)
    return g.classifier(g.relu(g.batch_norm(x)))


@register("densenet-121")
def densenet121(g: Graph, x: Tensor) -> Tensor:
    return _densenet(g, x, 32, (6, 12, 24, 16), 64)


# --------------------------------------------------------------------- ONNX


def _int_initializers_as_constants(model, onnx):  # noqa: ANN001 - onnx types
    """Copy of ``model`` whose non-float initializers (shapes, axes, ...) are Constant nodes.

    With ``keep_params_in_input`` the frontend turns every initializer into a
    function parameter, which would make e.g. a Reshape's target shape a
    runtime value; only float tensors are weights.
    """
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                   onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    weights = [t for t in m.graph.initializer if t.data_type in float_types]
    consts = [t for t in m.graph.initializer if t.data_type not in float_types]
    if consts:
        names = {t.name for t in consts}
        nodes = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in consts]
        nodes += list(m.graph.node)
        inputs = [i for i in m.graph.input if i.name not in names]
        del m.graph.initializer[:], m.graph.node[:], m.graph.input[:]
        m.graph.initializer.extend(weights)
        m.graph.node.extend(nodes)
        m.graph.input.extend(inputs)
    return m


def _load_onnx(path: str) -> Network:
    try:
        import onnx
    except ImportError:
        raise OnnxUnavailableError(
            f"loading {path!r} needs the onnx package: pip install onnx (or pip install .[onnx])"
        ) from None

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"cannot read ONNX model {path!r}: no such file")
    try:
        raw = file.read_bytes()
        model = onnx.load(str(file))
    except Exception as err:  # protobuf decode errors, permissions, bad external data, ...
        raise ValueError(f"cannot read ONNX model {path!r}: {one_line(err)}") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        # weights in other files, which no digest of this file's bytes covers
        return _convert_onnx(model, onnx, path, _OnnxOrigin(None, model))
    content = (hashlib.sha256(raw).hexdigest(), file.stem)
    with _ONNX_LOCK:
        if content not in _ONNX_BY_CONTENT:
            _ONNX_BY_CONTENT[content] = _convert_onnx(model, onnx, path, _OnnxOrigin(raw))
        return _ONNX_BY_CONTENT[content]


# ONNX models converted in this process, by (digest of the file's bytes, file stem)
_ONNX_BY_CONTENT: dict[tuple[str, str], Network] = {}
_ONNX_LOCK = threading.Lock()


def _convert_onnx(model, onnx, path: str, origin: _Origin) -> Network:  # noqa: ANN001 - onnx types
    """The Network of a loaded ONNX model, checked to be one we can split by its batch dimension."""
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    file = Path(path)
    graph = model.graph
    if not graph.node:
        raise ValueError(f"cannot read ONNX model {path!r}: the file holds no graph")
    initialized = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialized]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(f"ONNX model {path!r} has {len(inputs)} inputs and {len(graph.output)} "
                         "outputs; only single-input, single-output models are supported")
    inp = inputs[0]
    ttype = inp.type.tensor_type
    dims = list(ttype.shape.dim)
    if not inp.type.HasField("tensor_type") or not ttype.HasField("shape") or len(dims) < 2 \
            or any(d.dim_value <= 0 for d in dims[1:]):
        shown = [d.dim_value or d.dim_param or "?" for d in dims]
        raise ValueError(f"ONNX model {path!r}: input {inp.name!r} must be a tensor (batch, ...) "
                         f"with static sizes after the batch dimension, got {shown}")
    sample = tuple(int(d.dim_value) for d in dims[1:])
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name
    except (KeyError, ValueError):
        raise ValueError(f"ONNX model {path!r}: input {inp.name!r} has an unsupported "
                         f"element type ({ttype.elem_type})") from None

    n = tvm.tirx.Var("n", "int64")
    try:
        mod = from_onnx(_int_initializers_as_constants(model, onnx),
                        shape_dict={inp.name: [n, *sample]}, keep_params_in_input=True)
    except Exception as err:  # unsupported ops, shape errors, old IR versions, ...
        raise ValueError(f"cannot convert ONNX model {path!r}: {one_line(err)}") from None
    mod, detached = detach_params(mod)
    main = mod["main"]

    ret = main.ret_ty
    out_dims = []
    if isinstance(ret, relax.TensorType) and isinstance(ret.shape, relax.ShapeExpr):
        out_dims = [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in ret.shape.values]
    if not out_dims or isinstance(out_dims[0], int) or not out_dims[0].same_as(n) \
            or not all(isinstance(d, int) for d in out_dims[1:]):
        raise ValueError(f"ONNX model {path!r}: cannot make the batch dimension symbolic "
                         f"(output shape {ret}); the model may hard-code its batch size")
    params = tuple(_readonly(p.numpy()) for p in detached.get("main", []))
    if len(params) != len(main.params) - 1:
        raise ValueError(f"ONNX model {path!r}: {len(main.params) - 1} weight parameters "
                         f"but {len(params)} values")
    return Network(file.stem, mod, params, sample, tuple(out_dims[1:]), dtype, origin)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a).reshape(a.shape)  # ascontiguousarray makes a 0-d array (a scalar weight) 1-d
    a.flags.writeable = False
    return a


# ------------------------------------------------------------------ PyTorch


def from_torch(module: Any, sample_shape: Sequence[int], name: str = "torch_model") -> Network:
    """The Network of a PyTorch module (one tensor in, one tensor out), for samples of ``sample_shape``.

    ``sample_shape`` is the shape of ONE sample, e.g. ``(3, 224, 224)``.  The module is put in
    eval mode and exported with ``torch.export`` with a dynamic batch dimension, then imported
    into Relax with its parameters as the weights (``params``; buffers such as BatchNorm
    statistics become constants of the module) and the batch a symbolic ``n``.  Its
    ``torch_module()`` is a copy of ``module``; its ``onnx_model()`` is exported by ``torch.onnx``.

    Raises TorchConversionError when the module cannot be exported or imported, or its output's
    batch dimension cannot be made symbolic (e.g. a hard-coded batch size in a reshape).
    """
    import torch  # the caller has a torch module, so torch is installed
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_exported_program

    sample = tuple(int(d) for d in sample_shape)
    if not sample or any(d <= 0 for d in sample):
        raise ValueError(f"sample_shape must be the positive sizes of one sample, got {sample_shape}")
    module.eval()
    tensors = [*module.parameters(), *module.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    device = tensors[0].device if tensors else torch.device("cpu")
    torch_dtype = floats[0].dtype if floats else torch.float32
    dtype = str(torch_dtype).removeprefix("torch.")
    # batch 2: torch.export specializes a dimension whose example size is 0 or 1
    example = torch.randn((2, *sample), generator=torch.Generator().manual_seed(0)).to(device, torch_dtype)
    try:
        exported = torch.export.export(module, (example,),
                                       dynamic_shapes=({0: torch.export.Dim("n", min=1)},))
    except Exception as err:  # data-dependent control flow, a batch size baked in, ...
        raise TorchConversionError(f"cannot export PyTorch module {name!r} with a dynamic batch "
                                   f"dimension: {one_line(err)}") from None
    try:
        mod = from_exported_program(exported, keep_params_as_input=True,
                                    unwrap_unit_return_tuple=True)
    except Exception as err:  # ops the Relax frontend does not know, ...
        raise TorchConversionError(f"cannot convert PyTorch module {name!r} to Relax: "
                                   f"{one_line(err)}") from None
    mod, detached = detach_params(mod)
    main = mod["main"]
    batch = None
    if main.params and isinstance(main.params[0].ty, relax.TensorType) \
            and isinstance(main.params[0].ty.shape, relax.ShapeExpr):
        batch = main.params[0].ty.shape.values[0]
    ret = main.ret_ty
    out_dims = []
    if isinstance(ret, relax.TensorType) and isinstance(ret.shape, relax.ShapeExpr):
        out_dims = [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in ret.shape.values]
    if not isinstance(batch, tvm.tirx.Var) or not out_dims or not isinstance(out_dims[0], tvm.tirx.Var) \
            or not out_dims[0].same_as(batch) or not all(isinstance(d, int) for d in out_dims[1:]):
        raise TorchConversionError(f"PyTorch module {name!r}: cannot make the batch dimension "
                                   f"symbolic (output {ret}); it must return one tensor "
                                   "(batch, ...) with static sizes after the batch")
    mod = _rename_batch(mod, batch)
    params = tuple(_readonly(p.numpy()) for p in detached.get("main", []))
    if len(params) != len(main.params) - 1:
        raise TorchConversionError(f"PyTorch module {name!r}: {len(main.params) - 1} weight "
                                   f"parameters but {len(params)} values")
    return Network(name, mod, params, sample, tuple(out_dims[1:]), dtype,
                   _TorchOrigin(module, example))


def _rename_batch(mod: tvm.IRModule, batch: tvm.tirx.Var) -> tvm.IRModule:
    """``mod`` with its batch variable (named after a torch symbol, e.g. s31) renamed ``n``, as in
    every other network (tuning binds it by that name)."""
    n = tvm.tirx.Var("n", "int64")
    mod = relax.transform.BindSymbolicVars({batch: n})(mod)
    main = mod["main"]
    for key in ("tir_var_lower_bound", "tir_var_upper_bound"):
        bounds = main.attrs.get(key) if main.attrs else None
        if bounds is not None and batch.name in bounds:
            main = main.with_attr(key, {("n" if k == batch.name else k): v for k, v in bounds.items()})
    mod["main"] = main  # mod is the pass's new module
    return mod
