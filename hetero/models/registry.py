"""The network registry, timm-style: each builder registers itself under the name users type.

    @register("resnet-18")
    def resnet18(g, x):
        return _resnet(g, x, _basic_block, (2, 2, 2, 2))

A builder is ``fn(g: Graph, x) -> logits`` over the layers of :class:`hetero.layers.Graph`, so one builder
gives the network in every form an engine runs (Relax, ONNX, PyTorch), all with the same weights: random but
deterministic (a numpy Generator seeded from the network's name), He-normal so activations keep their scale
through the depth.  The families register in :mod:`.zoo`; :func:`get_network` is the one way in.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from ..layers import Graph
from ..layers.relax import RelaxGraph, build_module
from .network import Network, Origin, require_package
from .onnx_import import load_onnx

Tensor = Any  # what a builder's Graph works on: a Relax expression, an ONNX value, a torch.Tensor
Builder = Callable[[Graph, Tensor], Tensor]


class UnknownNetworkError(ValueError):
    """A network name that is neither registered nor a path to an .onnx file."""


class BuilderOrigin(Origin):
    """A registered builder: every form is emitted from it, with the network's params."""

    forms = ("relax", "onnx", "torch")

    def __init__(self, builder: Builder) -> None:
        self.builder = builder

    def onnx_model(self, net: Network):  # noqa: ANN201
        require_package("onnx", "ONNX", net.name, "'hetero[onnx]'")
        from ..layers.onnx import build_model

        return build_model(self.builder, net.input_shape, net.params, name=net.name, dtype=net.dtype)

    def onnx_bytes(self, net: Network) -> bytes:
        """Kept in hetero's cache under the network's digest, the digest of the code that emits it
        (hetero/layers) and onnx's version."""
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

        return BuiltModule(self.builder, net.input_shape, net.params, name=net.name, dtype=net.dtype)


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


def registered_input_shape(name: str) -> tuple[int, ...] | None:
    """One sample's shape for a registered network, known without building it; None for any other name."""
    entry = _REGISTRY.get(name)
    return entry.input_shape if entry else None


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


@dataclass(frozen=True)
class Built:
    module: tvm.IRModule
    graph: RelaxGraph
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


@functools.cache
def build_registered(name: str) -> Built:
    """The Relax module of a registered network and its weight recipe (no weight values yet)."""
    entry = _REGISTRY[name]
    mod, g, output_shape = build_module(entry.build, entry.input_shape)
    return Built(mod, g, entry.input_shape, output_shape)


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
    return Network(name, built.module, params, built.input_shape, built.output_shape,
                   origin=BuilderOrigin(_REGISTRY[name].build))
