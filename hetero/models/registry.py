"""The network registry, timm-style: each builder registers itself under the name users type.

    @register("resnet-18")
    def resnet18(g, x):
        return _resnet(g, x, _basic_block, (2, 2, 2, 2))

A builder is ``fn(g: Graph, x) -> logits`` over the layers of :class:`hetero.layers.Graph`, so one builder
gives the network in every form an engine runs (Relax, ONNX, PyTorch), all with the same weights: random but
deterministic (a numpy Generator seeded from the network's name), He-normal so activations keep their scale
through the depth.  The families register in :mod:`.zoo`; :func:`get_network` is the one way in.

A network of named inputs registers them, an open dimension named, and the names of its outputs:

    @register("bert-tiny", inputs=TOKENS, outputs=("last_hidden_state", "pooler_output"),
              max_sizes={"sequence": 512})
    def bert_tiny(g, input_ids, attention_mask):
        return _bert(g, input_ids, attention_mask, layers=2, hidden=128, heads=2, intermediate=512)

Its Network leaves the sequence open (no Relax module) until :meth:`Network.fit` fixes it; the Relax module
of each length is built once per process, with the same weights.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi

from ..errors import HeteroError
from ..layers.relax import RelaxGraph, build_function
from .network import Network, Origin, require_package
from .network import Tensor as NamedTensor
from .onnx_import import load_onnx

Tensor = Any  # what a builder's Graph works on: a Relax expression, an ONNX value, a torch.Tensor
Builder = Callable[..., Any]  # fn(g: Graph, x: Tensor) -> Tensor, or fn(g, *inputs) -> tuple of Tensors


class UnknownNetworkError(ValueError):
    """A network name that is neither registered nor a path to an .onnx file."""


@dataclass(frozen=True)
class _Entry:
    name: str
    build: Builder
    input_shape: tuple[int, ...]  # one sample's, for a network of one input; () for named inputs
    inputs: tuple[NamedTensor, ...]  # the named inputs, their open dimensions named ("sequence")
    outputs: tuple[str, ...]  # the names of the outputs of a network of named inputs
    max_sizes: dict[str, int]  # the largest size an open dimension takes (a sequence: the positions embedded)

    def input_specs(self, inputs: tuple[NamedTensor, ...] | None = None) -> list[tuple]:
        """(name, one sample's shape, dtype) of each input, as the emitters take them: `inputs`' shapes
        (a network's, its sequence fixed or open), or the registered ones."""
        if not self.inputs:
            return [("x", self.input_shape, "float32")]
        return [(t.name, t.shape, t.dtype) for t in (inputs or self.inputs)]

    def output_names(self) -> list[str]:
        return list(self.outputs) or ["y"]


class BuilderOrigin(Origin):
    """A registered builder: every form is emitted from it, with the network's params.

    A network of named inputs has its Relax module only once its open dimensions are fixed (:meth:`fixed`,
    once per size in this process); its ONNX and PyTorch forms leave them open, so every size shares one
    ONNX form, that of the network it was fixed from (`opened`)."""

    forms = ("relax", "onnx", "torch")

    def __init__(self, entry: _Entry, opened: Network | None = None) -> None:
        self.entry = entry
        self.opened = opened
        self._fixed: dict[tuple, Network] = {}
        self._fixing = threading.Lock()

    def onnx_model(self, net: Network):  # noqa: ANN201
        require_package("onnx", "ONNX", net.name, "'hetero[onnx]'")
        from ..layers.onnx import build_named_model

        net = self.opened or net
        return build_named_model(self.entry.build, self.entry.input_specs(net.inputs), self.entry.output_names(),
                                 net.params, name=net.name, dtype=net.dtype)

    def onnx_bytes(self, net: Network) -> bytes:
        """Kept in hetero's cache under the network's digest (that of the network it was fixed from), the
        digest of the code that emits it (hetero/layers) and onnx's version."""
        net = self.opened or net
        if net.why_no_form("onnx"):
            return self.onnx_model(net).SerializeToString()
        from ..cache import cache_dir, code_digest

        emitter = code_digest(sorted((Path(__file__).parents[1] / "layers").glob("*.py")))
        kept = cache_dir() / "onnx" / f"{net.name}-{net.digest}-{emitter}-onnx{importlib.metadata.version('onnx')}"
        try:
            return kept.read_bytes()
        except OSError:
            pass
        raw = self.onnx_model(net).SerializeToString()
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("wb", dir=kept.parent, delete=False) as staged:
                staged.write(raw)
            os.replace(staged.name, kept)
        except OSError:  # a cache that cannot be written costs the export again next time, nothing more
            pass
        return raw

    def torch_module(self, net: Network):  # noqa: ANN201
        require_package("torch", "PyTorch", net.name, "'hetero[torch]'")
        from ..layers.torch import BuiltModule

        described = tuple(map(str, net.inputs)) or net.input_shape
        return BuiltModule(self.entry.build, described, net.params, name=net.name, dtype=net.dtype)

    def graph_digest(self, net: Network) -> str:
        """The structural hash of the Relax module whose open dimensions are symbolic variables."""
        return str(tvm_ffi.structural_hash(build_registered(self.entry.name).module))

    def fixed(self, net: Network, sizes: dict[str, int]) -> Network:
        """`net` with its open dimensions fixed to `sizes` and the Relax module for them, built once per size.

        Raises HeteroError (one line) for an empty size, or one larger than the network takes (a sequence longer
        than its positions).
        """
        for dim, size in sizes.items():
            if size < 1:  # a BERT's pooler reads the first token, which an empty sequence does not have
                raise HeteroError(f"{net.name} takes a {dim} of at least 1, not {size}")
            if size > self.entry.max_sizes.get(dim, size):
                raise HeteroError(f"{net.name} takes a {dim} of at most {self.entry.max_sizes[dim]}, not {size}")
        key = (net.digest, tuple(sorted(sizes.items())))
        with self._fixing:
            if key not in self._fixed:
                fixed = super().fixed(net, sizes)
                module, _, _ = build_function(self.entry.build, self.entry.input_specs(fixed.inputs), net.dtype)
                self._fixed[key] = dataclasses.replace(fixed, module=module, origin=BuilderOrigin(self.entry, net))
            return self._fixed[key]


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, *, input_shape: tuple[int, ...] = (3, 224, 224), inputs: Sequence[NamedTensor] = (),
             outputs: Sequence[str] = (), max_sizes: Mapping[str, int] | None = None) -> Callable[[Builder], Builder]:
    """Decorator: record ``fn(g: Graph, x) -> logits`` as the builder of network ``name``, or, given the
    named ``inputs`` (one sample's shape each, an open dimension named), the names of its ``outputs`` and
    the largest size of each open dimension (``max_sizes``, where it has one), ``fn(g, *inputs) -> (outputs...)``."""

    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"network {name!r} is registered twice")
        _REGISTRY[name] = _Entry(name, fn, () if inputs else tuple(input_shape), tuple(inputs), tuple(outputs),
                                 dict(max_sizes or {}))
        return fn

    return deco


def network_names() -> list[str]:
    """Registry names, in registration order (families together, small to large)."""
    return list(_REGISTRY)


def registered_input_shape(name: str) -> tuple[int, ...] | None:
    """One sample's shape for a registered network of one input, known without building it; None for any
    other name and for a network of named inputs."""
    entry = _REGISTRY.get(name)
    return entry.input_shape if entry and not entry.inputs else None


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


@dataclass(frozen=True)
class Built:
    module: tvm.IRModule  # for named inputs, with their open dimensions as symbolic variables
    graph: RelaxGraph
    input_shape: tuple[int, ...]  # () for named inputs
    output_shape: tuple[int, ...]  # () for named outputs
    inputs: tuple[NamedTensor, ...] = ()
    outputs: tuple[NamedTensor, ...] = ()


@functools.cache
def build_registered(name: str) -> Built:
    """The Relax module of a registered network and its weight recipe (no weight values yet)."""
    entry = _REGISTRY[name]
    mod, g, output_shapes = build_function(entry.build, entry.input_specs())
    if not entry.inputs:
        return Built(mod, g, entry.input_shape, output_shapes[0])
    if len(output_shapes) != len(entry.outputs):
        raise ValueError(f"network {name!r} gives {len(output_shapes)} outputs, {len(entry.outputs)} are named")
    outputs = tuple(NamedTensor(output, tuple(d if isinstance(d, int) else d.name for d in shape), g.dtype)
                    for output, shape in zip(entry.outputs, output_shapes))
    return Built(mod, g, (), (), entry.inputs, outputs)


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
        return load_onnx(name_or_path)
    raise UnknownNetworkError(
        f"unknown network {name_or_path!r}; choose from: {', '.join(network_names())}"
    )


@functools.cache
def _registered(name: str) -> Network:
    built = build_registered(name)
    params = built.graph.init_weights(np.random.default_rng(_seed(name)))
    origin = BuilderOrigin(_REGISTRY[name])
    if built.inputs:  # no Relax module until its inputs fix the sequence: BuilderOrigin.fixed
        return Network(name, None, params, (), (), "float32", origin, built.inputs, built.outputs)
    return Network(name, built.module, params, built.input_shape, built.output_shape, origin=origin)
