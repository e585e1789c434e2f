"""The one object both protocols call, as MLServer's data plane: the served model, the batcher and the metrics.
REST (hetero.serve.rest) and gRPC (hetero.serve.grpc) only translate requests into calls of it and its answers
and errors back into their own terms; neither touches a device."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from ..errors import HeteroError
from ..inference import Fault
from .batcher import RECENT_S, Batcher, Expired, Rejected
from .metrics import Metrics
from .model import BadRequest, Batchable, ServedModel, TensorSpec, UnknownModel

log = logging.getLogger("hetero")

# Each protocol extension the REST side implements, as /v2 names it.
EXTENSIONS = ("binary_tensor_data",)
# What each request keeps of its deadline to be answered once computed: this quantile of the seconds that took
# for the latest ANSWERS answered requests, of the last RECENT_S seconds (as the batcher's measurements: a server
# refusing everything answers nothing, so old answers must expire for it to admit again)
ANSWER_QUANTILE = 0.95
ANSWERS = 100
T = TypeVar("T")


class ClientGone(Exception):
    """An HTTP client disconnected before its answer was ready (a gRPC one cancels its call's coroutine)."""


def outcome(exc: BaseException | None) -> str:
    """How a request ended, as the metrics label it: the first kind it is decides."""
    if exc is None:
        return "ok"
    for kind, name in ((BadRequest, "bad_request"), (UnknownModel, "unknown_model"), (Rejected, "rejected"),
                       (Expired, "expired"), (HeteroError, "unavailable"), (asyncio.CancelledError, "cancelled"),
                       (ClientGone, "cancelled")):
        if isinstance(exc, kind):
            return name
    return "error"


class DataPlane:
    """Health, metadata and inference for one model, over one batcher."""

    def __init__(self, model: ServedModel, batcher: Batcher, metrics: Metrics, latency_s: float,
                 max_request_bytes: int, left_out: Sequence[Fault] = ()):
        self.model = model
        self.batcher = batcher
        self.metrics = metrics
        self.latency_s = latency_s  # a request's time to answer when it names none
        self.max_request_bytes = max_request_bytes
        self.left_out = list(left_out)  # devices that never joined the pool: failed to load or to profile
        self.draining = False  # set by a SIGTERM: in-flight requests finish, the server no longer claims readiness
        self._answers: deque[tuple[float, float]] = deque(maxlen=ANSWERS)  # (when, from the outputs to the answer)

    @property
    def ready(self) -> bool:
        """Whether inferences can run: while any device works, until the server stops."""
        return not self.draining and self.batcher.ready

    def model_ready(self, name: str) -> bool:
        self.model.check_name(name)
        return self.ready

    def devices(self) -> dict[str, dict]:
        """Every device asked for: those in the batcher's pool, with its status of each, and those left out."""
        devices = dict(self.batcher.status()["devices"])
        for fault in self.left_out:
            devices[fault.device] = {"engine": None, "in": False, "error": fault.error, "batches": 0, "samples": 0}
        return devices

    def server_metadata(self) -> dict:
        devices = self.devices()
        return {"name": "hetero", "version": importlib.metadata.version("hetero"), "extensions": list(EXTENSIONS),
                "model": self.model.name, "devices": devices,
                "devices_out": sorted(name for name, device in devices.items() if not device["in"])}

    def deadline(self, arrived_s: float, timeout_s: float | None) -> float:
        """When a request that arrived at `arrived_s` (time.monotonic()) must be answered: `timeout_s` after it
        arrived where the request names a timeout, else the server's latency target after it."""
        return arrived_s + (self.latency_s if timeout_s is None else timeout_s)

    @contextlib.contextmanager
    def counted(self, protocol: str) -> Iterator[None]:
        """Count one inference request of `protocol` in flight while the block runs, then by how it ended."""
        self.metrics.in_flight.inc()
        try:
            yield
        except BaseException as exc:
            self.metrics.request(protocol, outcome(exc))
            raise
        else:
            self.metrics.request(protocol, "ok")
        finally:
            self.metrics.in_flight.dec()

    def reserve_s(self) -> float:
        """Seconds a request keeps of its deadline to be answered once the batcher has its outputs: the loop
        resuming its coroutine (late when the devices' threads hold the cores) and `encode`. A high quantile of
        what recent answers took, so that the batcher plans to finish that much before the deadline."""
        now = time.monotonic()
        recent = [seconds for when, seconds in self._answers if now - when < RECENT_S]
        return float(np.quantile(recent, ANSWER_QUANTILE)) if recent else 0.0

    async def infer(self, inputs: Batchable, outputs: Sequence[TensorSpec], deadline_s: float,
                    encode: Callable[[list[tuple[TensorSpec, np.ndarray]]], T]) -> T:
        """`encode` of the `outputs` of `inputs`, due by `deadline_s` (time.monotonic()). Rejected at once when
        the batcher predicts the deadline missed or its queue is full; Expired when the deadline passes first.
        Cancelling the caller (a client gone) cancels the request, which the batcher then drops before computing
        it."""
        future = self.batcher.submit(inputs.inputs, deadline_s - time.monotonic(), self.reserve_s(), inputs.key)
        computed: list[float] = []
        future.add_done_callback(lambda _: computed.append(time.monotonic()))  # on the batcher's thread
        answer = encode(self.model.output_tensors(await asyncio.wrap_future(future), outputs, inputs))
        answered = time.monotonic()
        self._answers.append((answered, answered - computed[0]))
        return answer
