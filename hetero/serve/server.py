"""Both protocols in one process, on one asyncio loop: uvicorn serving the REST app and a grpc.aio server, over
one data plane. SIGTERM (or Ctrl-C) stops both from taking new requests, lets the requests in flight finish
(up to SHUTDOWN_GRACE_S), then returns, so that the process exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable, Iterator

import grpc
import uvicorn

from ..errors import HeteroError
from .dataplane import DataPlane
from .grpc import InferenceServicer
from .proto import grpc_predict_v2_pb2_grpc as pb_grpc
from .rest import rest_app

# How long requests in flight at a SIGTERM may take to finish; a request's own deadline is usually far shorter.
SHUTDOWN_GRACE_S = 30.0


class _HttpServer(uvicorn.Server):
    """uvicorn's server without its own signal handling: it would take SIGTERM and SIGINT over from the loop's
    handlers while it serves (stopping HTTP alone) and raise them again once it stops. Here one handler stops
    both protocols."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _http_socket(host: str, port: int) -> socket.socket:
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise HeteroError(f"cannot listen on {host}:{port} for HTTP: {exc.strerror or exc}") from None
    # uvicorn writes a response's headers and its body apart. asyncio turns Nagle's algorithm off only on sockets
    # whose proto is TCP's, which create_server's (proto 0) and those it accepts are not: the body then waited for
    # the client's delayed ACK of the headers, 40 ms a response. Accepted connections inherit the listener's option.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _grpc_server(plane: DataPlane, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", plane.max_request_bytes),
                                      ("grpc.max_send_message_length", -1),
                                      ("grpc.so_reuseport", 0)])  # a port in use is an error, not shared
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's way of saying the port is taken or the host is not this machine's
        raise HeteroError(f"cannot listen on {address} for gRPC: {exc}") from None
    return server, bound


async def serve(plane: DataPlane, host: str, http_port: int, grpc_port: int,
                listening: Callable[[int, int], None]) -> None:
    """Serve `plane` over REST on `http_port` and gRPC on `grpc_port` (0: any free port) until SIGTERM or
    SIGINT, telling `listening` the ports taken once both listen."""
    sock = _http_socket(host, http_port)
    http = _HttpServer(uvicorn.Config(rest_app(plane), log_level="warning", lifespan="off",
                                      timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    rpc, bound_grpc_port = _grpc_server(plane, host, grpc_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await rpc.start()
    http_task = asyncio.create_task(http.serve(sockets=[sock]))
    while not http.started and not http_task.done():
        await asyncio.sleep(0.01)
    listening(sock.getsockname()[1], bound_grpc_port)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({stopped, http_task}, return_when=asyncio.FIRST_COMPLETED)
    plane.draining = True
    http.should_exit = True
    # Both stop taking requests at once, and each waits for its own in flight.
    await asyncio.gather(http_task, rpc.stop(SHUTDOWN_GRACE_S))
    stopped.cancel()
