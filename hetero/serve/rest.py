"""The Open Inference Protocol over HTTP/REST, as an ASGI app (Starlette, served by uvicorn): health, metadata,
inference with JSON tensors and with the binary tensor data extension, and /metrics.

Every error is a 4xx or 5xx status with {"error": "..."}: 400 for a request the server cannot act on (malformed
body, an unknown, missing or repeated input, a wrong shape, datatype or byte count, inputs of different numbers
of samples or sequence lengths, a sequence longer than the longest bucket, a body over the size limit), 404 for
an unknown model or path, 429 with Retry-After when the batcher turns a request away (its deadline predicted
missed, or the queue full), 504 when a request's deadline passes before it is computed, 503 when no device is
left to compute it (or the server is stopping), 500 for a failure of the server's own."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import HeteroError, one_line
from .batcher import Expired, Rejected
from .dataplane import ClientGone, DataPlane
from .model import BadRequest, Batchable, ServedModel, TensorSpec, UnknownModel

log = logging.getLogger("hetero")

# The binary tensor data extension's header: the length of the JSON that starts the body; tensors' bytes follow.
HEADER_LENGTH = "Inference-Header-Content-Length"
# The first kind an error is decides its status; any other HeteroError means no device can answer now.
STATUSES = ((BadRequest, 400), (UnknownModel, 404), (Rejected, 429), (Expired, 504), (HeteroError, 503))


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _error_response(exc: Exception) -> Response:
    for kind, status in STATUSES:
        if isinstance(exc, kind):
            # Retry-After takes whole seconds: round up, so that a client that waits it out is not early.
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))} if isinstance(exc, Rejected) else None
            return _error(status, str(exc), headers)
    if isinstance(exc, ClientGone):
        return Response(status_code=499)  # nobody reads it; nginx's code for a request its client closed
    log.error("request failed: %s", one_line(exc), exc_info=exc)
    return _error(500, f"{type(exc).__name__}: {one_line(exc)}")


async def _body(request: Request, limit: int) -> bytes:
    """The request's body, at most `limit` bytes. A longer one is read to its end and dropped, not cut off,
    so that the client, still sending, reads the 400 rather than a reset connection."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise BadRequest(f"the request's body has {size} bytes, more than the server's limit of {limit} "
                         f"(--max-request-mb)")
    return b"".join(chunks)


def _parameters(entry: dict, where: str) -> dict:
    parameters = entry.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where}: parameters must be an object, got {parameters!r:.80}")
    return parameters


@dataclass
class InferCall:
    """What an inference request asks: the inputs, the outputs (each in binary or as JSON), its id and timeout."""

    inputs: Batchable
    outputs: list[TensorSpec]
    binary: list[bool]  # per output
    request_id: str | None
    timeout_s: float | None


def _timeout_s(parameters: dict) -> float | None:
    """The request's `timeout` parameter (microseconds, as the protocol has it) in seconds, if it has one."""
    if "timeout" not in parameters:
        return None
    timeout_us = parameters["timeout"]
    if isinstance(timeout_us, bool) or not isinstance(timeout_us, (int, float)) or not 0 < timeout_us < math.inf:
        raise BadRequest(f"parameters.timeout must be a positive number of microseconds, got {timeout_us!r:.80}")
    return timeout_us * 1e-6


def _outputs(request: dict, model: ServedModel) -> tuple[list[TensorSpec], list[bool]]:
    """The outputs a request asks for (none named: all), and whether each goes in binary: as its `binary_data`
    says, else as the request's `binary_data_output` does."""
    default = bool(_parameters(request, "the request").get("binary_data_output", False))
    outputs = request.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise BadRequest(f"outputs must be a list of objects, got {outputs!r:.80}")
    specs = model.requested_outputs([o.get("name") for o in outputs])
    binary = [default] * len(specs)
    for index, output in enumerate(outputs):
        parameters = _parameters(output, f"output {output['name']!r}")
        if "classification" in parameters:  # the classification extension: answering plain outputs would mislead
            raise BadRequest("the classification extension is not supported; ask for the output tensor")
        binary[index] = bool(parameters.get("binary_data", default))
    return specs, binary


def parse_infer(body: bytes, header_length: str | None, model: ServedModel) -> InferCall:
    """An inference request's body (with the binary extension's header length, if it came with one) as a call,
    checked against the model."""
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise BadRequest(f"{HEADER_LENGTH} must be a whole number up to the body's {len(body)} bytes, "
                             f"got {header_length!r:.40}")
        header, binary = body[: int(header_length)], memoryview(body)[int(header_length) :]
    try:
        request = json.loads(header)
    except ValueError as exc:  # UnicodeDecodeError is one
        raise BadRequest(f"the request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise BadRequest(f"the request must be a JSON object, got {type(request).__name__}")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise BadRequest(f"inputs must be a list of objects, got {inputs!r:.80}")
    model.check_inputs([i.get("name") for i in inputs])
    tensors = {}
    for tensor in inputs:  # their bytes follow the header in the order the inputs are listed
        spec = model.input_spec(tensor["name"])
        shape = spec.checked_shape(tensor.get("datatype"), tensor.get("shape"))
        parameters = _parameters(tensor, f"input {spec.name!r}")
        if "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary):
                raise BadRequest(f"input {spec.name!r}: binary_data_size must be a whole number up to the "
                                 f"{len(binary)} bytes left after the JSON header, got {size!r:.40}")
            if "data" in tensor:
                raise BadRequest(f"input {spec.name!r} has both data and binary_data_size; give one")
            tensors[spec.name] = spec.from_bytes(shape, binary[:size])
            binary = binary[size:]
        elif "data" in tensor:
            tensors[spec.name] = spec.from_values(shape, tensor["data"])
        else:
            raise BadRequest(f"input {spec.name!r} has no data and no binary_data_size")
    if len(binary):
        raise BadRequest(f"{len(binary)} bytes follow the JSON header that no input's binary_data_size claims")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"id must be a string, got {request_id!r:.40}")
    outputs, binary_outputs = _outputs(request, model)
    return InferCall(model.batchable(tensors), outputs, binary_outputs, request_id,
                     _timeout_s(_parameters(request, "the request")))


def infer_response(model: ServedModel, call: InferCall, outputs: list[tuple[TensorSpec, np.ndarray]]) -> Response:
    """The outputs as the request asked for them: JSON values, or, where any goes in binary, the binary
    extension's JSON header followed by those outputs' bytes, in their order."""
    tensors, data = [], []
    for (spec, values), binary in zip(outputs, call.binary, strict=True):
        tensor = {"name": spec.name, "datatype": spec.datatype, "shape": list(values.shape)}
        if binary:
            data.append(values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes())
            tensor["parameters"] = {"binary_data_size": len(data[-1])}
        else:
            tensor["data"] = values.ravel().tolist()
        tensors.append(tensor)
    answer = {"model_name": model.name, **({"id": call.request_id} if call.request_id is not None else {}),
              "outputs": tensors}
    if not data:
        return JSONResponse(answer)
    header = json.dumps(answer).encode()
    return Response(b"".join([header, *data]), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


async def _until_disconnected(request: Request) -> None:
    """Returns once the client has gone. Its body is read by now, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """`work`'s result; if the client goes first, `work` is cancelled (and the batcher drops the request)."""
    answer, gone = asyncio.ensure_future(work), asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not answer.done():
        answer.cancel()
        raise ClientGone()
    return answer.result()


def rest_app(plane: DataPlane) -> Starlette:
    """The ASGI app serving `plane`."""
    model = plane.model

    def status(ok: bool) -> Response:
        return Response(status_code=200 if ok else 503)

    async def live(request: Request) -> Response:
        return status(True)

    async def ready(request: Request) -> Response:
        return status(plane.ready)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse(plane.server_metadata())

    async def model_metadata(request: Request) -> Response:
        model.check_name(request.path_params["model"])
        return JSONResponse(model.metadata())

    async def model_ready(request: Request) -> Response:
        return status(plane.model_ready(request.path_params["model"]))

    async def infer(request: Request) -> Response:
        arrived_s = time.monotonic()
        try:
            with plane.counted("http"):
                model.check_name(request.path_params["model"])
                call = parse_infer(await _body(request, plane.max_request_bytes), request.headers.get(HEADER_LENGTH),
                                   model)
                deadline_s = plane.deadline(arrived_s, call.timeout_s)
                return await _unless_disconnected(request, plane.infer(call.inputs, call.outputs, deadline_s,
                                                                       partial(infer_response, model, call)))
        except Exception as exc:  # each becomes its status; the server goes on serving
            return _error_response(exc)

    async def metrics(request: Request) -> Response:
        return Response(plane.metrics.text(), media_type=plane.metrics.content_type)

    async def unknown_model(request: Request, exc: Exception) -> Response:
        return _error(404, str(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    handlers: dict[type[Exception], Callable] = {UnknownModel: unknown_model, HTTPException: http_error}
    return Starlette(routes=[
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route("/v2/models/{model}", model_metadata),
        Route("/v2/models/{model}/ready", model_ready),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/metrics", metrics),
    ], exception_handlers=handlers)
