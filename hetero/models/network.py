"""The network: a Relax module with its weights and per-sample shapes, and the forms an engine loads.

A network's batch dimension is a symbolic ``n``, so one compiled module serves every batch size; its
weights are parameters of ``main``, their values in ``Network.params``.  What a network was made from is
its *origin* (a registered builder, an .onnx file, a PyTorch module: :mod:`.registry`,
:mod:`.onnx_import`, :mod:`.torch_import`), which makes its forms other than Relax.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
from collections.abc import Mapping, Sequence
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

    def graph_digest(self, net: Network) -> str:
        """What identifies the graph of a network that has no Relax module (its sequence open): the digest of
        its ONNX form."""
        return hashlib.sha256(self.onnx_bytes(net)).hexdigest()

    def fixed(self, net: Network, sizes: dict[str, int]) -> Network:
        """`net` with the dimensions its inputs leave open fixed to `sizes` (:meth:`Network.fit`)."""

        def fixed(shape: tuple[int | str, ...]) -> tuple[int, ...]:
            return tuple(sizes.get(dim, dim) if isinstance(dim, str) else dim for dim in shape)

        return dataclasses.replace(net, output_shape=fixed(net.output_shape),
                                   inputs=tuple(dataclasses.replace(t, shape=fixed(t.shape)) for t in net.inputs),
                                   outputs=tuple(dataclasses.replace(t, shape=fixed(t.shape)) for t in net.outputs))



@dataclass(frozen=True)
class Tensor:
    """One named input or output of a network: one sample's shape and its dtype. A dimension of an input
    that is not yet fixed (a sequence length) is named, such as "sequence", until :meth:`Network.fit`."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    # where set, an integer input takes only values 0 .. values_below - 1 (token ids: the vocabulary's size),
    # which every engine must refuse alike: ONNX's Gather wraps -1 around, OpenVINO reads a wrong row
    values_below: int | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"{self.name} (N, {', '.join(map(str, self.shape))}) {self.dtype}"

    def check_values(self, values: np.ndarray, takes: str) -> None:
        """Refuse, in one line saying what the network `takes`, values outside 0 .. values_below - 1."""
        if self.values_below is not None and values.size and (values.min() < 0 or values.max() >= self.values_below):
            raise HeteroError(f"input {self.name} holds values outside 0 .. {self.values_below - 1}: {takes}")


def record_dtype(tensors: Sequence[Tensor]) -> np.dtype:
    """The numpy dtype of one sample of several named tensors: a record with a field per tensor. A batch of
    them is a 1-d array of records, which every part of the data path slices, concatenates and memory-maps
    as it does a batch of one tensor, so only the engines look inside."""
    return np.dtype([(t.name, t.dtype, t.shape) for t in tensors])


@dataclass(frozen=True, eq=False)
class Network:
    """A network ready to compile: Relax module, weight values, per-sample shapes.

    A network with several named inputs (a BERT-style encoder's input_ids and attention_mask) lists them in
    `inputs`; one sample is then a record of them (:func:`record_dtype`) and `input_shape` is (). Likewise for
    several outputs. While a dimension is open it has no Relax module (:meth:`fit` makes one where TVM's ONNX
    frontend converts it); ONNX Runtime and OpenVINO run its ONNX form at any size.
    """

    name: str  # registry name, or the .onnx file's stem
    module: tvm.IRModule | None  # one Relax function "main"(x, *weights) -> logits, batch dim symbolic
    params: tuple[np.ndarray, ...]  # weights, in the order of main's parameters after x
    input_shape: tuple[int, ...]  # ONE sample, e.g. (3, 224, 224)
    output_shape: tuple[int, ...]  # ONE sample, e.g. (1000,)
    dtype: str = "float32"  # of the input and the output; of the outputs only where `inputs` names them
    # what the network was made from, which makes its ONNX and PyTorch forms
    origin: Origin = field(default_factory=Origin, repr=False)
    inputs: tuple[Tensor, ...] = ()  # the named inputs of a network that takes several; () for one
    outputs: tuple[Tensor, ...] = ()  # the named outputs of a network that gives several; () for one

    @functools.cached_property
    def digest(self) -> str:
        """The network's identity: a digest of its graph (constants included), shapes and weights.

        Two models with one name but other weights or another graph have other digests, so every
        cache and table entry that must not be shared between them is keyed by this, never by name.
        """
        h = hashlib.sha256()
        graph = tvm_ffi.structural_hash(self.module) if self.module is not None else self.origin.graph_digest(self)
        h.update(f"{graph} {self.input_shape} {self.output_shape} {self.dtype}".encode())
        if self.inputs or self.outputs:  # a sequence length is part of what a profile measured
            h.update(f"{self.inputs} {self.outputs}".encode())
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
    def input_dtype(self) -> np.dtype:
        """The dtype of a batch's array of inputs: `dtype`, or a record of the named inputs."""
        return record_dtype(self.inputs) if self.inputs else np.dtype(self.dtype)

    @property
    def output_dtype(self) -> np.dtype:
        """The dtype of a batch's array of outputs: `dtype`, or a record of the named outputs."""
        return record_dtype(self.outputs) if self.outputs else np.dtype(self.dtype)

    @property
    def input_bytes(self) -> int:
        """Bytes of one sample's input."""
        return int(np.prod(self.input_shape)) * self.input_dtype.itemsize

    @property
    def output_bytes(self) -> int:
        """Bytes of one sample's output."""
        return int(np.prod(self.output_shape)) * self.output_dtype.itemsize

    @property
    def rate_unit(self) -> str:
        """What this network's throughput counts, as reports print it: "img/s" for an image network (one input,
        its samples (3, H, W)), else "samples/s" (a text network's sequences)."""
        image = not self.inputs and len(self.input_shape) == 3 and self.input_shape[0] == 3
        return "img/s" if image else "samples/s"

    @property
    def forms(self) -> tuple[str, ...]:
        """The forms this network has: "relax" always, "onnx" and "torch" as its origin allows
        (whether their packages are installed is not checked); a network of named inputs may have no Relax module."""
        return tuple(form for form in self.origin.forms if form != "relax" or self.module is not None)

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
        if self.inputs:
            return self._random_records(batch, rng)
        x = rng.standard_normal((batch, *self.input_shape), dtype=np.float32)
        return x.astype(self.dtype, copy=False)

    def _random_records(self, batch: int, rng: np.random.Generator) -> np.ndarray:
        """Named inputs drawn in order: integers 0 or 1, which every integer input takes (token ids of any
        vocabulary, attention masks, token type ids), floats from a standard normal."""
        x = np.empty(batch, self.input_dtype)
        for tensor in self.inputs:
            if np.issubdtype(np.dtype(tensor.dtype), np.integer):
                x[tensor.name] = rng.integers(0, 2, (batch, *tensor.shape))
            else:
                x[tensor.name] = rng.standard_normal((batch, *tensor.shape), dtype=np.float32)
        return x

    def fit(self, inputs: Mapping[str, Any]) -> Network:
        """This network with the dimensions its inputs leave open (a sequence length) fixed to those of
        `inputs`, checked by :meth:`check_inputs`; itself where none is open."""
        self.check_inputs(inputs)
        sizes = {dim: np.shape(inputs[t.name])[1 + axis] for t in self.inputs
                 for axis, dim in enumerate(t.shape) if isinstance(dim, str)}
        return self.origin.fixed(self, sizes) if sizes else self

    def fit_sizes(self, sizes: Mapping[str, int]) -> Network:
        """This network with its open dimensions fixed to `sizes` ({"sequence": 128}), as :meth:`fit` fixes them
        from inputs: for a caller with the sizes and no inputs (a server preparing the lengths it serves, a
        cluster's node the length its driver streams at); itself where none is open."""
        missing = [dim for dim in self.open_dimensions if dim not in sizes]
        if missing:
            raise HeteroError(f"{self.name} leaves {', '.join(missing)} open: give a size for each")
        opened = {dim: int(sizes[dim]) for dim in self.open_dimensions}
        return self.origin.fixed(self, opened) if opened else self

    @property
    def open_dimensions(self) -> list[str]:
        """The dimensions of its inputs not yet fixed (such as "sequence"), which :meth:`fit` fixes."""
        return list(dict.fromkeys(dim for t in self.inputs for dim in t.shape if isinstance(dim, str)))

    def to_records(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """Named inputs, checked by :meth:`check_inputs`, as the array of records the data path splits."""
        self.check_inputs(inputs)
        batch = np.empty(len(next(iter(inputs.values()))), self.input_dtype)
        for tensor in self.inputs:
            batch[tensor.name] = inputs[tensor.name]
        return batch

    def input_arrays(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """A batch of records as contiguous arrays by input name, as an engine hands them to its library."""
        return {t.name: np.ascontiguousarray(batch[t.name]) for t in self.inputs}

    def gathered(self, outputs: Sequence[np.ndarray]) -> np.ndarray:
        """An engine's outputs, in the order of `outputs`, as one batch: the only one, or records of all."""
        if not self.outputs:
            return outputs[0]
        batch = np.empty(len(outputs[0]), self.output_dtype)
        for tensor, values in zip(self.outputs, outputs, strict=True):
            batch[tensor.name] = values
        return batch

    def check_inputs(self, inputs: Any) -> None:
        """Refuse, in one line, inputs this network cannot take: anything with a shape and a dtype (an array,
        a memory-mapped .npy file, a folder of images) that is not a batch of at least one sample of
        ``input_shape`` in real numbers; for a network of named inputs, a mapping of name to such a batch
        that misses a name, has one too many or one misshaped, or an array that is not of its records."""
        if self.inputs:
            self._check_named(inputs)
            return
        if isinstance(inputs, Mapping):
            raise HeteroError(f"{self.name} takes one array of inputs (N, {', '.join(map(str, self.input_shape))}), "
                              f"not inputs by name ({', '.join(inputs)})")
        if tuple(inputs.shape[1:]) != tuple(self.input_shape) or len(inputs) < 1:
            raise HeteroError(f"inputs of shape {tuple(inputs.shape)} do not fit {self.name}, which takes "
                              f"(N, {', '.join(map(str, self.input_shape))})")
        if not (np.issubdtype(inputs.dtype, np.integer) or np.issubdtype(inputs.dtype, np.floating)):
            raise HeteroError(f"inputs of dtype {inputs.dtype} are not real numbers")

    def _check_named(self, inputs: Any) -> None:
        """:meth:`check_inputs` for a network of named inputs."""
        takes = f"{self.name} takes {'; '.join(map(str, self.inputs))}"
        if not isinstance(inputs, Mapping):
            if not self.open_dimensions and getattr(inputs, "dtype", None) == self.input_dtype \
                    and inputs.ndim == 1 and len(inputs) >= 1:
                for tensor in self.inputs:
                    tensor.check_values(inputs[tensor.name], takes)
                return  # a batch already made records (a split's share, a memory-mapped .npy of records)
            raise HeteroError(f"inputs of shape {tuple(getattr(inputs, 'shape', ()))} do not fit: {takes}, by name")
        names = [t.name for t in self.inputs]
        missing, extra = [n for n in names if n not in inputs], [n for n in inputs if n not in names]
        if missing:
            raise HeteroError(f"no input {', '.join(missing)}: {takes}")
        if extra:
            raise HeteroError(f"unknown input {', '.join(extra)}: {takes}")
        sizes: dict[str, int] = {}  # an open dimension's size, as the first input that has it gives it
        batch = (np.shape(inputs[names[0]]) or (0,))[0]  # every input's, as the first gives it
        for tensor in self.inputs:
            array = np.asarray(inputs[tensor.name])  # a list as well as an array (no copy of an array)
            shape = array.shape
            fits = len(shape) == len(tensor.shape) + 1 and shape[0] == batch >= 1 and all(
                got == sizes.setdefault(dim, got) if isinstance(dim, str) else got == dim
                for got, dim in zip(shape[1:], tensor.shape))
            if not fits:
                raise HeteroError(f"input {tensor.name} of shape {shape} does not fit: {takes}"
                                  + (f", where {', '.join(f'{d}={n}' for d, n in sizes.items())}" if sizes else ""))
            kind = np.dtype(tensor.dtype)
            if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, kind.type)):
                raise HeteroError(f"input {tensor.name} of dtype {array.dtype} does not fit: {takes}")
            tensor.check_values(array, takes)

    def __repr__(self) -> str:
        if self.inputs:
            return (f"Network(name={self.name!r}, inputs=[{'; '.join(map(str, self.inputs))}], "
                    f"outputs=[{'; '.join(map(str, self.outputs)) or (self.output_shape, self.dtype)}])")
        return (f"Network(name={self.name!r}, input_shape={self.input_shape}, "
                f"output_shape={self.output_shape}, dtype={self.dtype!r}, "
                f"params={len(self.params)} arrays / {self.num_params:,} values)")


def readonly(a: np.ndarray) -> np.ndarray:
    """A contiguous, read-only copy or view of a weight array, as networks share them between callers."""
    a = np.ascontiguousarray(a).reshape(a.shape)  # ascontiguousarray makes a 0-d array (a scalar weight) 1-d
    a.flags.writeable = False
    return a
