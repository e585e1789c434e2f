"""The served network as the Open Inference Protocol describes a model: one input and one output tensor, each
with a batch dimension of any size, and the checks that turn a request's tensor into the array the batcher
takes. Both protocols (REST and gRPC) check requests here, so they refuse the same requests in the same words."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import HeteroError
from ..models import Network


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
    """One tensor of the model: its name, numpy dtype and the shape of one sample."""

    name: str
    dtype: np.dtype
    sample_shape: tuple[int, ...]

    @property
    def datatype(self) -> str:
        return DATATYPES[self.dtype.name]

    def metadata(self) -> dict:
        """What model metadata says of it; -1 is the batch dimension, of any size."""
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.sample_shape]}

    def shape_text(self) -> str:
        return "[" + ", ".join(str(d) for d in (-1, *self.sample_shape)) + "]"


class ServedModel:
    """The network under the name clients call it by, with its input and output named `input` and `output`
    (hetero's networks carry no tensor names of their own)."""

    def __init__(self, network: Network):
        self.name = network.name
        if np.dtype(network.dtype).name not in DATATYPES:
            raise HeteroError(f"{network.name} computes in {network.dtype}, which the server cannot send")
        self.input = TensorSpec("input", np.dtype(network.dtype), tuple(network.input_shape))
        self.output = TensorSpec("output", np.dtype(network.dtype), tuple(network.output_shape))

    def check_name(self, name: str) -> None:
        if name != self.name:
            raise UnknownModel(f"unknown model {name!r}; this server serves {self.name!r}")

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [], "platform": "hetero", "inputs": [self.input.metadata()],
                "outputs": [self.output.metadata()]}

    def check_inputs(self, names: Sequence[str]) -> None:
        """That a request names the one input, once."""
        if len(names) != 1:
            raise BadRequest(f"expected 1 input ({self.input.name!r}), got {len(names)}")
        if names[0] != self.input.name:
            raise BadRequest(f"unknown input {names[0]!r}; the model's input is {self.input.name!r}")

    def check_outputs(self, names: Sequence[str]) -> None:
        """That every output a request asks for is the model's (asking for none asks for all)."""
        for name in names:
            if name != self.output.name:
                raise BadRequest(f"unknown output {name!r}; the model's output is {self.output.name!r}")

    def input_shape(self, datatype: object, shape: object) -> tuple[int, ...]:
        """The shape of a request's input, checked against the model's: its datatype, and any number of
        samples of the model's sample shape."""
        if datatype != self.input.datatype:
            raise BadRequest(f"input {self.input.name!r} has datatype {datatype!r}; the model takes "
                             f"{self.input.datatype}")
        if not (isinstance(shape, Sequence) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
            raise BadRequest(f"input {self.input.name!r}: shape must be a list of whole numbers, got {shape!r:.80}")
        if len(shape) != 1 + len(self.input.sample_shape) or tuple(shape[1:]) != self.input.sample_shape or shape[0] < 1:
            raise BadRequest(f"input {self.input.name!r} has shape {list(shape)}; the model takes "
                             f"{self.input.shape_text()} with at least 1 sample")
        return tuple(shape)

    def input_from_bytes(self, shape: tuple[int, ...], data: bytes | memoryview) -> np.ndarray:
        """The input of `shape` from its bytes, little-endian and row-major as the protocol sends them."""
        needed = math.prod(shape) * self.input.dtype.itemsize
        if len(data) != needed:
            raise BadRequest(f"input {self.input.name!r} has {len(data)} bytes; shape {list(shape)} of "
                             f"{self.input.datatype} needs {needed}")
        return np.frombuffer(data, self.input.dtype.newbyteorder("<")).reshape(shape)

    def input_from_values(self, shape: tuple[int, ...], values: object) -> np.ndarray:
        """The input of `shape` from a list of numbers, flat or nested, in row-major order."""
        try:
            array = np.asarray(values)
        except ValueError as exc:  # nested lists of unequal lengths
            raise BadRequest(f"input {self.input.name!r}: data is not a list of numbers: {exc}") from None
        if array.dtype.kind not in ACCEPTED_KINDS.get(self.input.dtype.kind, self.input.dtype.kind):
            raise BadRequest(f"input {self.input.name!r}: data must be numbers of {self.input.datatype}, "
                             f"got {array.dtype.name} values")
        if array.size != math.prod(shape):
            raise BadRequest(f"input {self.input.name!r} has {array.size} values; shape {list(shape)} needs "
                             f"{math.prod(shape)}")
        return array.astype(self.input.dtype, copy=False).reshape(shape)
