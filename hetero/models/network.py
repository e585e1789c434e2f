"""The network: a Relax module with its weights and per-sample shapes, and the forms an engine loads.

A network's batch dimension is a symbolic ``n``, so one compiled module serves every batch size; its
weights are parameters of ``main``, their values in ``Network.params``.  What a network was made from is
its *origin* (a registered builder, an .onnx file, a PyTorch module: :mod:`.registry`,
:mod:`.onnx_import`, :mod:`.torch_import`), which makes its forms other than Relax.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
import tvm_ffi

from ..errors import HeteroError


class FormUnavailableError(HeteroError):
    """A network has no such form (an .onnx file has no PyTorch module), or the package that
    makes or holds the form is not installed."""


_FORM_NAMES = {"onnx": "ONNX", "torch": "PyTorch"}


def require_package(package: str, form: str, name: str, install: str) -> None:
    """Raise FormUnavailableError, saying ``pip install {install}``, unless ``package`` imports."""
    try:
        __import__(package)
    except ImportError:
        raise FormUnavailableError(f"the {form} form of network {name!r} needs {package}: "
                                   f"pip install {install}") from None



class Origin:
    """What a Network was made from; makes its forms other than the Relax module.

    The base class has neither form (a Network built directly from a Relax module).
    """

    forms: tuple[str, ...] = ("relax",)
    what = "it was built directly as a Relax module"

    def onnx_model(self, net: Network):  # noqa: ANN201 - onnx.ModelProto, onnx not imported here
        raise FormUnavailableError(f"network {net.name!r} has no ONNX form: {self.what}")

    def torch_module(self, net: Network):  # noqa: ANN201 - torch.nn.Module
        raise FormUnavailableError(f"network {net.name!r} has no PyTorch form: {self.what}")

    def onnx_bytes(self, net: Network) -> bytes:
        """The ONNX form serialized (:meth:`Network.onnx_bytes`)."""
        return self.onnx_model(net).SerializeToString()



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
    origin: Origin = field(default_factory=Origin, repr=False)

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
        return self.origin.onnx_bytes(self)

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

    def check_inputs(self, inputs: Any) -> None:
        """Refuse, in one line, inputs this network cannot take: anything with a shape and a dtype (an array,
        a memory-mapped .npy file, a folder of images) that is not a batch of at least one sample of
        ``input_shape`` in real numbers."""
        if tuple(inputs.shape[1:]) != tuple(self.input_shape) or len(inputs) < 1:
            raise HeteroError(f"inputs of shape {tuple(inputs.shape)} do not fit {self.name}, which takes "
                              f"(N, {', '.join(map(str, self.input_shape))})")
        if not (np.issubdtype(inputs.dtype, np.integer) or np.issubdtype(inputs.dtype, np.floating)):
            raise HeteroError(f"inputs of dtype {inputs.dtype} are not real numbers")

    def __repr__(self) -> str:
        return (f"Network(name={self.name!r}, input_shape={self.input_shape}, "
                f"output_shape={self.output_shape}, dtype={self.dtype!r}, "
                f"params={len(self.params)} arrays / {self.num_params:,} values)")


def readonly(a: np.ndarray) -> np.ndarray:
    """A contiguous, read-only copy or view of a weight array, as networks share them between callers."""
    a = np.ascontiguousarray(a).reshape(a.shape)  # ascontiguousarray makes a 0-d array (a scalar weight) 1-d
    a.flags.writeable = False
    return a
