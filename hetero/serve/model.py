"""The served network as the Open Inference Protocol describes a model: its input and output tensors, each with
a batch dimension of any size, and the checks that turn a request's tensors into the array the batcher takes.
Both protocols (REST and gRPC) check requests here, so they refuse the same requests in the same words.

A network of one input serves it as `input` and its output as `output` (hetero's networks of one input carry
no tensor names). A network of several named inputs (a BERT-style encoder's input_ids and attention_mask)
serves them by their own names, and its outputs by theirs; a request's inputs become one array of records
(hetero.models.record_dtype), as the data path takes them.

Where the inputs leave a sequence length open, the server serves the sequence buckets it was started with
(hetero.buckets), each length the network fitted to it, with engines and profiles of its own; the batcher
batches only requests of one length (their key), never several lengths in one call. A request of length L
runs at the shortest bucket that holds its longest sample (its attention_mask's last 1, as hetero.buckets
counts it; the whole L without a mask): its inputs cut to it, or padded to it with zeros (token 0, mask 0:
positions a BERT's attention gives no weight), and its outputs cut or padded with zeros back to L. A request
whose samples need more than the longest bucket is refused, as is one whose length no bucket equals where the
network has no attention_mask to say what is padding."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..buckets import MASK, sample_lengths, to_length
from ..errors import HeteroError, UsageError
from ..models import Network

OPEN = -1  # a dimension of any size in a tensor's shape, as model metadata writes it: the batch, a sequence


class BadRequest(HeteroError):
    """A request the server cannot act on (HTTP 400, gRPC INVALID_ARGUMENT); the message says why, in one line."""


class UnknownModel(HeteroError):
    """A request for a model this server does not serve (HTTP 404, gRPC NOT_FOUND)."""


# numpy's names for the protocol's tensor datatypes, for the datatypes a network computes in
DATATYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int8": "INT8", "int16": "INT16",
             "int32": "INT32", "int64": "INT64", "uint8": "UINT8"}
# JSON numbers (and gRPC's typed contents) a datatype accepts, by numpy's kind: no strings, no booleans as floats
ACCEPTED_KINDS = {"f": "iuf", "i": "iu", "u": "iu"}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model: its name, numpy dtype and the shape of one sample, OPEN where a sequence length
    is (any length the server serves)."""

    name: str
    dtype: np.dtype
    sample_shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, dtype: str, shape: Sequence[int | str]) -> TensorSpec:
        """The spec of a network's tensor, whose open dimensions are named ("sequence")."""
        if np.dtype(dtype).name not in DATATYPES:
            raise HeteroError(f"tensor {name!r} is of {dtype}, which the server cannot send")
        return cls(name, np.dtype(dtype), tuple(OPEN if isinstance(d, str) else d for d in shape))

    @property
    def datatype(self) -> str:
        return DATATYPES[self.dtype.name]

    def metadata(self) -> dict:
        """What model metadata says of it; -1 is the batch dimension, of any size, or an open one."""
        return {"name": self.name, "datatype": self.datatype, "shape": [OPEN, *self.sample_shape]}

    def shape_text(self) -> str:
        return "[" + ", ".join(str(d) for d in (OPEN, *self.sample_shape)) + "]"

    def checked_shape(self, datatype: object, shape: object) -> tuple[int, ...]:
        """The shape of a request's tensor, checked against this one: its datatype, and any number of samples of
        its sample shape (any size where it is open)."""
        if datatype != self.datatype:
            raise BadRequest(f"input {self.name!r} has datatype {datatype!r}; the model takes {self.datatype}")
        if not (isinstance(shape, Sequence) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
            raise BadRequest(f"input {self.name!r}: shape must be a list of whole numbers, got {shape!r:.80}")
        fits = len(shape) == 1 + len(self.sample_shape) and shape[0] >= 1 and all(
            got == want or (want == OPEN and got >= 1) for got, want in zip(shape[1:], self.sample_shape))
        if not fits:
            raise BadRequest(f"input {self.name!r} has shape {list(shape)}; the model takes {self.shape_text()} "
                             f"with at least 1 sample")
        return tuple(shape)

    def from_bytes(self, shape: tuple[int, ...], data: bytes | memoryview) -> np.ndarray:
        """The tensor of `shape` from its bytes, little-endian and row-major as the protocol sends them."""
        needed = math.prod(shape) * self.dtype.itemsize
        if len(data) != needed:
            raise BadRequest(f"input {self.name!r} has {len(data)} bytes; shape {list(shape)} of {self.datatype} "
                             f"needs {needed}")
        return np.frombuffer(data, self.dtype.newbyteorder("<")).reshape(shape)

    def from_values(self, shape: tuple[int, ...], values: object) -> np.ndarray:
        """The tensor of `shape` from a list of numbers, flat or nested, in row-major order."""
        try:
            array = np.asarray(values)
        except ValueError as exc:  # nested lists of unequal lengths
            raise BadRequest(f"input {self.name!r}: data is not a list of numbers: {exc}") from None
        if array.dtype.kind not in ACCEPTED_KINDS.get(self.dtype.kind, self.dtype.kind):
            raise BadRequest(f"input {self.name!r}: data must be numbers of {self.datatype}, got "
                             f"{array.dtype.name} values")
        if array.size != math.prod(shape):
            raise BadRequest(f"input {self.name!r} has {array.size} values; shape {list(shape)} needs "
                             f"{math.prod(shape)}")
        return array.astype(self.dtype, copy=False).reshape(shape)


@dataclass(frozen=True)
class Batchable:
    """A request's inputs as the batcher takes them: one array (of records, for named inputs) and the key a batch
    of them shares: the sequence bucket they run at, None where no dimension is open; and the request's own
    sequence length, which its outputs are given back at."""

    inputs: np.ndarray
    key: int | None
    length: int | None


def _listed(what: str, specs: Sequence[TensorSpec]) -> str:
    """ "the model's input is 'input'", "the model's inputs are 'input_ids', 'attention_mask'"."""
    names = ", ".join(repr(spec.name) for spec in specs)
    return f"the model's {what} is {names}" if len(specs) == 1 else f"the model's {what}s are {names}"


class ServedModel:
    """The network under the name clients call it by, with its tensors as the protocol names them, and the
    network fitted to each sequence length in `buckets` where its inputs leave one open."""

    def __init__(self, network: Network, buckets: Sequence[int] = ()):
        self.name = network.name
        self.network = network
        if network.inputs:
            self.inputs = tuple(TensorSpec.of(t.name, t.dtype, t.shape) for t in network.inputs)
        else:
            self.inputs = (TensorSpec.of("input", network.dtype, network.input_shape),)
        if network.outputs:
            self.outputs = tuple(TensorSpec.of(t.name, t.dtype, t.shape) for t in network.outputs)
        else:  # a network of named inputs and one output keeps no name for it
            self.outputs = (TensorSpec.of("output", network.dtype, network.output_shape),)
        self.networks = self._fitted(network, buckets)
        self.masked = any(spec.name == MASK and OPEN in spec.sample_shape for spec in self.inputs)

    @staticmethod
    def _fitted(network: Network, buckets: Sequence[int]) -> dict[int | None, Network]:
        """The network to run per key: fitted to each bucket where it leaves a sequence length open, else itself."""
        opened = network.open_dimensions
        if not opened:
            return {None: network}
        if len(opened) > 1:
            raise HeteroError(f"{network.name} leaves {', '.join(opened)} open; the server serves networks that "
                              f"leave one open, a sequence length")
        if not buckets:
            raise UsageError(f"{network.name} leaves {opened[0]} open: give the sequence lengths to serve (--buckets)")
        return {length: network.fit_sizes({opened[0]: length}) for length in sorted(set(buckets))}

    @property
    def buckets(self) -> list[int]:
        """The sequence lengths served, shortest first; none where no dimension is open."""
        return [key for key in self.networks if key is not None]

    def check_name(self, name: str) -> None:
        if name != self.name:
            raise UnknownModel(f"unknown model {name!r}; this server serves {self.name!r}")

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [], "platform": "hetero",
                "inputs": [spec.metadata() for spec in self.inputs],
                "outputs": [spec.metadata() for spec in self.outputs]}

    def input_spec(self, name: object) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise BadRequest(f"unknown input {name!r}; {_listed('input', self.inputs)}")

    def check_inputs(self, names: Sequence[str]) -> None:
        """That a request names every input of the model, once each, and no other."""
        for name in names:
            self.input_spec(name)
        repeated = sorted({name for name in names if names.count(name) > 1})
        missing = [spec.name for spec in self.inputs if spec.name not in names]
        if repeated:
            raise BadRequest(f"input {repeated[0]!r} is given {names.count(repeated[0])} times")
        if missing:
            raise BadRequest(f"no input {', '.join(map(repr, missing))}; {_listed('input', self.inputs)}")

    def requested_outputs(self, names: Sequence[str]) -> list[TensorSpec]:
        """The outputs a request asks for, in its order, each the model's and asked for once; asking for none
        asks for all."""
        if not names:
            return list(self.outputs)
        specs = {spec.name: spec for spec in self.outputs}
        for name in names:
            if name not in specs:
                raise BadRequest(f"unknown output {name!r}; {_listed('output', self.outputs)}")
            if names.count(name) > 1:
                raise BadRequest(f"output {name!r} is asked for {names.count(name)} times")
        return [specs[name] for name in names]

    def batchable(self, tensors: Mapping[str, np.ndarray]) -> Batchable:
        """A request's tensors, each checked by its spec, as the batcher takes them: the one input as it is, or
        the named inputs, of one number of samples and one sequence length, as records of the network fitted to
        their bucket, cut or padded to it."""
        if not self.network.inputs:
            return Batchable(tensors[self.inputs[0].name], None, None)
        counts = {name: len(array) for name, array in tensors.items()}
        if len(set(counts.values())) > 1:
            raise BadRequest("the inputs have different numbers of samples ("
                             + ", ".join(f"{name} {count}" for name, count in counts.items()) + "); each needs as many")
        try:
            self.network.check_inputs(tensors)  # one sequence length in every input
        except HeteroError as exc:
            raise BadRequest(str(exc)) from None
        if not self.buckets:
            return Batchable(self.network.to_records(tensors), None, None)
        length, bucket = self._bucket(tensors)
        resized = {spec.name: to_length(tensors[spec.name], self._open_axes(spec), bucket) for spec in self.inputs}
        return Batchable(self.networks[bucket].to_records(resized), bucket, length)

    @staticmethod
    def _open_axes(spec: TensorSpec) -> list[int]:
        return [axis for axis, dim in enumerate(spec.sample_shape) if dim == OPEN]

    def _bucket(self, tensors: Mapping[str, np.ndarray]) -> tuple[int, int]:
        """The request's sequence length, and the bucket it runs at: the shortest that holds its longest sample."""
        spec = next(spec for spec in self.inputs if OPEN in spec.sample_shape)
        length = tensors[spec.name].shape[1 + self._open_axes(spec)[0]]
        needed = length
        if self.masked:
            mask = tensors[MASK]
            if not np.isin(mask, (0, 1)).all():
                raise BadRequest(f"input {MASK!r} must hold 0 and 1 only: its zeros mark the padding a sequence "
                                 f"bucket cuts or adds")
            # a sample attending to no position attends to all alike: it needs its whole length
            needed = int(max(n or length for n in sample_lengths(mask)))
        fitting = [bucket for bucket in self.buckets if bucket >= needed]
        if not fitting:
            raise BadRequest(f"the inputs need sequence length {needed}, above the model's maximum of "
                             f"{self.buckets[-1]}")
        if not self.masked and fitting[0] != length:
            raise BadRequest(f"the inputs have sequence length {length}; without an {MASK!r} to mark padding the "
                             f"server runs only the lengths it serves: {', '.join(map(str, self.buckets))}")
        return length, fitting[0]

    def output_tensors(self, outputs: np.ndarray, specs: Sequence[TensorSpec],
                       inputs: Batchable) -> list[tuple[TensorSpec, np.ndarray]]:
        """The batcher's outputs of `inputs` as the tensors `specs` names, each contiguous in its dtype and, where
        it has the sequence dimension, at the request's own length."""
        tensors = []
        for spec in specs:
            values = outputs[spec.name] if self.network.outputs else outputs
            if inputs.length is not None:
                values = to_length(values, self._open_axes(spec), inputs.length)
            tensors.append((spec, np.ascontiguousarray(values, spec.dtype)))
        return tensors
