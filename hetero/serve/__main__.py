"""`python -m hetero.serve`: prepare the network on each device once, then answer the Open Inference Protocol over
REST and gRPC until SIGTERM. Usage errors are one `error:` line and exit 2, failures to start one line and
exit 1, as Inference.py's (hetero.cli)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TypeVar

from ..command import Parser, UsageError, batch_list, positive_int, run_command
from ..errors import HeteroError, one_line

SERVE_PACKAGES = ("starlette", "uvicorn", "grpc", "google", "prometheus_client")  # what the serve extra installs
T = TypeVar("T")


def port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"a port is a whole number from 0 (any free port) to 65535, got {text!r}")
    return int(text)


def positive_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of milliseconds, got {text!r}")
    return value


def main(argv: list[str]) -> int:
    from ..buckets import DEFAULT_BUCKETS, parse_buckets
    from ..devices import DEFAULT_PRECISION, PRECISIONS
    from ..inference import DEFAULT_TABLE
    from ..profile import SEED_BATCHES

    parser = Parser(prog="python -m hetero.serve",
                    description="Serve a network over every device given, by the Open Inference Protocol (REST, gRPC).")
    parser.add_argument("--network", help="a registered network's name, or a path to an .onnx model")
    parser.add_argument("--buckets", type=parse_buckets, default=DEFAULT_BUCKETS, metavar="LENGTHS",
                        help="for a network whose inputs leave a sequence length open (a BERT-style encoder): the "
                             "sequence lengths served, each prepared and profiled apart; a request runs at the "
                             "shortest that holds its longest sample (by its attention_mask), its inputs cut or "
                             f"padded to it (default {','.join(map(str, DEFAULT_BUCKETS))})")
    parser.add_argument("--device", default="cpu", help="comma-separated: cpu, igpu, gpu0, ... (default cpu)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address both protocols listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--http-port", type=port, default=8000, help="REST and /metrics (default 8000; 0: any free)")
    parser.add_argument("--grpc-port", type=port, default=8001, help="gRPC (default 8001; 0: any free)")
    parser.add_argument("--latency-ms", type=positive_ms, default=50.0,
                        help="a request's deadline when it names no timeout (default 50)")
    parser.add_argument("--max-queue", type=positive_int, default=1024,
                        help="samples waiting at most; a request beyond is answered 429 at once (default 1024)")
    parser.add_argument("--max-request-mb", type=positive_int, default=64,
                        help="the largest request body or gRPC message, in MiB (default 64)")
    parser.add_argument("--table", default=str(DEFAULT_TABLE), help=f"profile table (default {DEFAULT_TABLE})")
    parser.add_argument("--engine", default=None, help="as Inference.py's --engine (default: $HETERO_ENGINE, else auto)")
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help=f"the CUDA GPUs' arithmetic, as Inference.py's (default {DEFAULT_PRECISION})")
    parser.add_argument("--profile-batches", type=batch_list, default=list(SEED_BATCHES),
                        help="batch sizes to profile where the table lacks them (default: the seed's 20 up to 129)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.network is None:
        raise UsageError("--network is required")
    try:  # before the long preparation: the extra is what a fresh install lacks
        from .server import serve
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in SERVE_PACKAGES:
            raise
        raise HeteroError(f"the server needs {exc.name}: pip install 'hetero[serve]'") from None
    from ..models import get_network
    from ..session import Options, Session
    from .batcher import Batcher
    from .dataplane import DataPlane
    from .metrics import Metrics
    from .model import ServedModel

    net = get_network(args.network)
    model = ServedModel(net, args.buckets)
    session = Session(net, args.device, Options(args.table, tuple(args.profile_batches),
                                                 progress=False, precision=args.precision, engine=args.engine))
    pools: dict = {}
    try:
        for key, fitted in model.networks.items():  # one pool per sequence length served
            try:
                pools[key] = session.engines(fitted)
            except HeteroError as exc:
                if key is None:
                    raise
                raise HeteroError(f"at sequence length {key} (--buckets): {one_line(exc)}") from None
        engines = {engine.device.name: engine.name for pool in pools.values() for engine, _ in pool}
        left_out = [fault for fault in session.faults if fault.device not in engines]
        metrics = Metrics([*engines, *(fault.device for fault in left_out)])
        for fault in left_out:
            metrics.device_out(fault.device, fault.error)
        batcher = Batcher(pools, args.latency_ms / 1e3, args.max_queue, observer=metrics)
        plane = DataPlane(model, batcher, metrics, args.latency_ms / 1e3, args.max_request_mb << 20, left_out)

        def listening(http_port: int, grpc_port: int) -> None:
            served = ", ".join(f"{name} ({engine})" for name, engine in engines.items())
            lengths = f" at sequence lengths {', '.join(map(str, model.buckets))}" if model.buckets else ""
            print(f"serving {model.name} on {served}{lengths}: REST and /metrics at http://{args.host}:{http_port}, "
                  f"gRPC at {args.host}:{grpc_port}; SIGTERM stops", flush=True)

        try:
            asyncio.run(serve(plane, args.host, args.http_port, args.grpc_port, listening))
        finally:
            batcher.close(drain=True)
    finally:
        for pool in pools.values():
            for engine, _ in pool:
                engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, None))
