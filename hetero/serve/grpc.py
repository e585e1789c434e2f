"""The Open Inference Protocol over gRPC: a grpc.aio servicer of KServe's `inference.GRPCInferenceService`
(hetero/serve/proto/). Inputs come as `raw_input_contents` or as typed contents; outputs go as
`raw_output_contents`. Errors are the call's status: INVALID_ARGUMENT for a request the server cannot act on,
NOT_FOUND for an unknown model, RESOURCE_EXHAUSTED when the batcher turns a request away (and, from gRPC
itself, for a message over --max-request-mb), DEADLINE_EXCEEDED when its deadline passes first, UNAVAILABLE
when no device is left (or the server is stopping), INTERNAL for a failure of the server's own."""

from __future__ import annotations

import logging
import math
import time
from functools import partial

import grpc
import numpy as np

from ..errors import HeteroError, one_line
from .batcher import Expired, Rejected
from .dataplane import DataPlane
from .model import BadRequest, Batchable, ServedModel, TensorSpec, UnknownModel
from .proto import grpc_predict_v2_pb2 as pb
from .proto import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger("hetero")

# The first kind an error is decides its code; any other HeteroError means no device can answer now.
CODES = ((BadRequest, grpc.StatusCode.INVALID_ARGUMENT), (UnknownModel, grpc.StatusCode.NOT_FOUND),
         (Rejected, grpc.StatusCode.RESOURCE_EXHAUSTED), (Expired, grpc.StatusCode.DEADLINE_EXCEEDED),
         (HeteroError, grpc.StatusCode.UNAVAILABLE))
# The field of InferTensorContents that holds each datatype's values (FP16 and UINT64's own aside: raw only).
CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT8": "int_contents", "INT16": "int_contents",
            "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents"}


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    for kind, code in CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    log.error("request failed: %s", one_line(exc), exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {one_line(exc)}"


def _parameter(value: pb.InferParameter) -> object:
    """An InferParameter's value, whichever of its fields is set."""
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


def _timeout_s(request: pb.ModelInferRequest) -> float | None:
    """The request's `timeout` parameter (microseconds) in seconds, if it has one."""
    if "timeout" not in request.parameters:
        return None
    timeout_us = _parameter(request.parameters["timeout"])
    if isinstance(timeout_us, bool) or not isinstance(timeout_us, (int, float)) or not 0 < timeout_us < math.inf:
        raise BadRequest(f"parameters.timeout must be a positive number of microseconds, got {timeout_us!r:.80}")
    return timeout_us * 1e-6


def parse_inputs(request: pb.ModelInferRequest, model: ServedModel) -> Batchable:
    """The request's inputs, each from its raw bytes (the i-th of raw_input_contents for the i-th input, where
    the request has them) or its typed contents, checked against the model."""
    model.check_inputs([tensor.name for tensor in request.inputs])
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} tensors for {len(request.inputs)} inputs")
    tensors = {}
    for index, tensor in enumerate(request.inputs):
        spec = model.input_spec(tensor.name)
        shape = spec.checked_shape(tensor.datatype, list(tensor.shape))
        if raw:
            if tensor.HasField("contents"):
                raise BadRequest(f"input {tensor.name!r} has both contents and raw_input_contents; give one")
            tensors[spec.name] = spec.from_bytes(shape, raw[index])
            continue
        field = CONTENTS.get(tensor.datatype)
        values = getattr(tensor.contents, field) if field else ()
        if not values:
            raise BadRequest(f"input {tensor.name!r} has no {field or 'typed contents for its datatype'} and there "
                             f"are no raw_input_contents")
        tensors[spec.name] = spec.from_values(shape, list(values))
    return model.batchable(tensors)


def infer_response(model: ServedModel, request: pb.ModelInferRequest,
                   outputs: list[tuple[TensorSpec, np.ndarray]]) -> pb.ModelInferResponse:
    """The outputs as raw_output_contents, little-endian as the protocol sends them."""
    return pb.ModelInferResponse(
        model_name=model.name, id=request.id,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=spec.name, datatype=spec.datatype,
                                                         shape=list(values.shape)) for spec, values in outputs],
        raw_output_contents=[values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()
                             for _, values in outputs])


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The service's six calls over one data plane."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        try:
            return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name))
        except UnknownModel as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        metadata = self.plane.server_metadata()
        return pb.ServerMetadataResponse(name=metadata["name"], version=metadata["version"],
                                         extensions=metadata["extensions"])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        try:
            self.plane.model.check_name(request.name)
        except UnknownModel as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        metadata = self.plane.model.metadata()
        return pb.ModelMetadataResponse(
            name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**tensor) for tensor in metadata["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**tensor) for tensor in metadata["outputs"]])

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        arrived_s = time.monotonic()
        model = self.plane.model
        try:
            with self.plane.counted("grpc"):
                model.check_name(request.model_name)
                inputs = parse_inputs(request, model)
                outputs = model.requested_outputs([output.name for output in request.outputs])
                # The call's own deadline first: past it the client has stopped waiting.
                remaining_s = context.time_remaining()
                deadline_s = (time.monotonic() + remaining_s if remaining_s is not None
                              else self.plane.deadline(arrived_s, _timeout_s(request)))
                # A cancelled call cancels this coroutine, and with it the batcher's request.
                return await self.plane.infer(inputs, outputs, deadline_s, partial(infer_response, model, request))
        except Exception as exc:  # each becomes its status; the server goes on serving
            await context.abort(*_status(exc))
