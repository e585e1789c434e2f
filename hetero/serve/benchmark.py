"""`python -m hetero.serve.benchmark`: hetero's server against Ray Serve's batching, under the same load.

Systems, each started here, measured, and stopped before the next:
- hetero (all): `python -m hetero.serve` on every device given (only when more than one is given);
- (a) hetero (best): the same server on the best single device (--best-device, else the device that computed the
  most samples in hetero (all)'s heaviest point, else the only one);
- (b) ray (best): a Ray Serve deployment whose `@serve.batch` method runs that device's engine, the one
  hetero.Session(...).engines() picks (the same object hetero's server runs), on one replica;
- (c) ray (per device): the same deployment with one replica per device given (only with more than one);
- the ceiling: that device's engine in its own plain loop (Engine.plain_loop), in calls of its largest profiled
  batch, with no server, protocol or client around it: what serving on that device could reach.
hetero's server is driven by tritonclient (HTTP with binary tensors, and gRPC), the Open Inference Protocol; Ray
Serve by raw tensor bytes POSTed to its own HTTP proxy (not KServe v2): the requests are encoded differently.

Each system gets a closed-loop sweep (--clients threads, each sending its next request when the last is
answered) and open-loop Poisson arrivals (--rates); hetero/serve/loadgen.py generates the load. This process
never imports hetero.serve.grpc: tritonclient.grpc defines the same protocol messages."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import http.client
import os
import platform
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tabulate import tabulate

from ..command import Parser, UsageError, batch_list, positive_int, run_command
from ..errors import HeteroError
from .loadgen import Rejected, Stats, Target, closed_loop, open_loop, summarize

STARTUP_S = 600  # a server or a replica preparing the network: engines loaded, profiles measured where missing


@dataclass(frozen=True)
class Row:
    system: str
    protocol: str
    mode: str  # "closed" or "open"
    stats: Stats


# -- senders -----------------------------------------------------------------------------------------------------

def _refused(exc: Exception) -> bool:
    status = str(getattr(exc, "status", lambda: "")())
    return "429" in status or "RESOURCE_EXHAUSTED" in status


def triton_target(protocol: str, url: str, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> Target:
    """Senders of `inputs` (by name) to a KServe v2 server through tritonclient's HTTP (binary tensors) or gRPC
    client, asking for `outputs`."""
    from .model import DATATYPES

    if protocol == "http":
        import tritonclient.http as client_module
    else:
        import tritonclient.grpc as client_module
    from tritonclient.utils import InferenceServerException
    binary = {"binary_data": True} if protocol == "http" else {}

    def make() -> Callable[[], None]:
        client = client_module.InferenceServerClient(url, **({"network_timeout": 120.0} if protocol == "http" else {}))
        tensors = []
        for name, x in inputs.items():
            tensors.append(client_module.InferInput(name, list(x.shape), DATATYPES[x.dtype.name]))
            tensors[-1].set_data_from_numpy(x, **binary)
        requested = [client_module.InferRequestedOutput(name, **binary) for name in outputs]

        def send() -> None:
            try:
                answer = client.infer(model, tensors, outputs=requested)
                for name in outputs:
                    answer.as_numpy(name)
            except InferenceServerException as exc:
                if _refused(exc):
                    raise Rejected(str(exc)) from None
                raise

        return send

    return make


def raw_http_target(host: str, port: int, path: str, x: np.ndarray) -> Target:
    """Senders of `x`'s bytes, POSTed on a kept-alive connection (how the Ray Serve deployment is reached)."""
    body = np.ascontiguousarray(x).tobytes()

    def make() -> Callable[[], None]:
        connection = http.client.HTTPConnection(host, port, timeout=120)

        def send() -> None:
            connection.request("POST", path, body, {"Content-Type": "application/octet-stream"})
            response = connection.getresponse()
            response.read()
            if response.status in (429, 503):
                raise Rejected(str(response.status))
            if response.status != 200:
                raise HeteroError(f"HTTP {response.status}")

        return send

    return make


# -- systems -----------------------------------------------------------------------------------------------------

@contextmanager
def hetero_server(args: argparse.Namespace, devices: str) -> Iterator[tuple[str, str, str]]:
    """`python -m hetero.serve` on `devices`, as the README starts it: (HTTP address, gRPC address, its line)."""
    command = [sys.executable, "-m", "hetero.serve", "--network", args.network, "--device", devices,
               "--http-port", "0", "--grpc-port", "0", "--latency-ms", str(args.latency_ms), "--table", args.table]
    if args.engine:
        command += ["--engine", args.engine]
    if args.profile_batches:
        command += ["--profile-batches", ",".join(map(str, args.profile_batches))]
    if args.sequence_length:
        command += ["--buckets", str(args.sequence_length)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], STARTUP_S)
        line = process.stdout.readline().strip() if ready else ""
        ports = re.search(r"at http://([^ ]+):(\d+), gRPC at (.+):(\d+);", line)
        if not ports:
            raise HeteroError(f"hetero's server did not start: {line or 'no line'} ({shlex.join(command)})")
        yield f"127.0.0.1:{ports[2]}", f"127.0.0.1:{ports[4]}", line
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _claim(devices: list[str], folder: str) -> str:
    """The first of `devices` no other replica has claimed (replicas of one deployment are alike: each takes one
    device of its own; one host, so a file per device is the claim)."""
    for device in devices:
        try:
            os.close(os.open(os.path.join(folder, device), os.O_CREAT | os.O_EXCL))
            return device
        except FileExistsError:
            continue
    raise HeteroError(f"more replicas than devices ({', '.join(devices)})")


def ray_app(network: str, devices: list[str], options: dict, max_batch: int, wait_s: float, claims: str):
    """The Ray Serve application: one replica per device in `devices`, each running that device's fastest engine
    (hetero.Session(...).engines(), hetero's server's own pick) under `@serve.batch`, as Ray Serve's docs batch."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment(num_replicas=len(devices), max_ongoing_requests=max(256, 2 * max_batch),
                      ray_actor_options={"num_cpus": 0})  # the engine's threads are set by hetero, as in its server
    class HeteroEngine:
        def __init__(self):
            from ..session import Options, Session

            self.device = _claim(devices, claims)
            self.session = Session(network, self.device, Options(**options))
            ((self.engine, profile),) = self.session.engines()
            self.step = min(profile.max_batch() or 1 << 30, getattr(self.engine, "max_call", None) or 1 << 30)
            self.shape, self.dtype = tuple(self.session.network.input_shape), np.dtype(self.session.network.dtype)

        def info(self) -> str:
            return f"{self.device} ({self.engine.name})"

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=wait_s)
        async def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
            batch = np.concatenate(inputs)
            outputs = []
            for start in range(0, len(batch), self.step):
                future = self.engine.on_worker(self.engine.compute, batch[start:start + self.step])
                outputs.append((await asyncio.wrap_future(future))[0])
            return np.split(np.concatenate(outputs), np.cumsum([len(x) for x in inputs])[:-1])

        async def __call__(self, request: Request) -> Response:
            x = np.frombuffer(await request.body(), self.dtype).reshape(-1, *self.shape)
            y = await self.run(x)
            return Response(np.ascontiguousarray(y).tobytes(), media_type="application/octet-stream")

    return HeteroEngine.bind()


def session_options(args: argparse.Namespace) -> dict:
    """hetero.Options for a session preparing the network as hetero's server does."""
    options = {"table": args.table, "progress": False, "engine": args.engine}
    if args.profile_batches:
        options["profile_batches"] = tuple(args.profile_batches)
    return options


def plain_loop(args: argparse.Namespace, device: str) -> str:
    """The ceiling: `device`'s engine (the one hetero's server runs) in its plain loop over calls of its largest
    profiled batch for --seconds, and on inputs resident on the device where it has such a figure; one line."""
    from ..session import Options, Session

    with Session(args.network, device, Options(**session_options(args))) as session:
        ((engine, profile),) = session.engines()
        try:
            batch = max(1, min(profile.max_batch() or profile.largest_measured(), engine.max_call or 1 << 30))
            inputs = session.network.random_input(batch)
            engine.on_worker(engine.plain_loop, inputs, batch).result()  # its first call pays for fresh memory
            calls, started = 0, time.perf_counter()
            while (elapsed_s := time.perf_counter() - started) < args.seconds:
                engine.on_worker(engine.plain_loop, inputs, batch).result()
                calls += 1
            resident = engine.on_worker(engine.resident_throughput, batch, args.seconds).result()
        finally:
            engine.close()
    resident_text = f"; on resident inputs {resident:.1f}" if resident else ""
    return (f"ceiling: {device}'s {engine.name} engine in its plain loop, calls of {batch} samples (its largest "
            f"profiled), no server: {calls * batch / elapsed_s:.1f} samples/s{resident_text}")


@contextmanager
def ray_serve(args: argparse.Namespace, devices: list[str], max_batch: int) -> Iterator[tuple[int, str]]:
    """Ray Serve on this machine running ray_app: (its HTTP port, the replicas' devices and engines)."""
    import ray
    from ray import serve

    port = _free_port()
    threads = str(os.cpu_count() or 1)  # Ray sets OMP_NUM_THREADS=1 in its workers unless told
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=os.cpu_count(),
             runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with tempfile.TemporaryDirectory() as claims:
            app = ray_app(args.network, devices, session_options(args), max_batch, args.ray_wait_ms / 1e3, claims)
            handle = serve.run(app, name="bench", route_prefix="/bench")
            engines = sorted({handle.info.remote().result() for _ in range(4 * len(devices))})
            yield port, ", ".join(engines)
    finally:
        serve.shutdown()
        ray.shutdown()


# -- measuring and reporting -------------------------------------------------------------------------------------

def measure(args: argparse.Namespace, system: str, protocol: str, target: Target, request_batch: int) -> list[Row]:
    rows = []
    deadline_s = args.latency_ms / 1e3
    closed_loop(target, 1, min(1.0, args.seconds))  # warm up: connections, the engine's first calls
    for clients in args.clients:
        outcomes, seconds = closed_loop(target, clients, args.seconds)
        rows.append(Row(system, protocol, "closed", summarize(f"{clients} clients", outcomes, seconds, request_batch,
                                                              deadline_s)))
        _print_row(rows[-1])
    for rate in args.rates:
        outcomes, seconds = open_loop(target, rate, args.seconds, workers=args.workers)
        rows.append(Row(system, protocol, "open", summarize(f"{rate:g}/s", outcomes, seconds, request_batch,
                                                            deadline_s)))
        _print_row(rows[-1])
    return rows


HEADERS = ["system", "protocol", "load", "sent", "ok", "429", "errors", "samples/s", "p50 ms", "p95 ms", "p99 ms",
           "goodput/s", "good %"]


def _cells(row: Row) -> list:
    s = row.stats
    return [row.system, row.protocol, s.load, s.sent, s.ok, s.rejected, s.errors, f"{s.throughput:.1f}",
            f"{s.p50_ms:.1f}", f"{s.p95_ms:.1f}", f"{s.p99_ms:.1f}", f"{s.goodput:.1f}", f"{100 * s.good_fraction:.0f}"]


def _print_row(row: Row) -> None:
    print("  " + " | ".join(str(cell) for cell in _cells(row)), flush=True)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = ""
    try:
        gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        gpus = "; " + ", ".join(re.sub(r" \(UUID.*", "", line) for line in gpus.splitlines()) if gpus.strip() else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}){gpus}"


def markdown(args: argparse.Namespace, network: str, rows: list[Row], notes: list[str], command: str) -> str:
    """The run's section; its heading names the network, deadline and date, so that runs appended to one file
    have headings of their own."""
    table = tabulate([_cells(row) for row in rows], HEADERS, tablefmt="github")
    today = datetime.date.today().isoformat()
    lines = [f"## Serving {network} within {args.latency_ms:g} ms, {today}: hetero's server against Ray Serve, "
             f"{machine()}", "", f"{today}, `{command}`", "", *notes, "", table, ""]
    if args.plot:
        lines += [f"![p99 latency against throughput]({args.plot})", ""]
    return "\n".join(lines)


def plot(rows: list[Row], path: str, deadline_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for (system, protocol, mode) in dict.fromkeys((r.system, r.protocol, r.mode) for r in rows):
        points = [r.stats for r in rows if (r.system, r.protocol, r.mode) == (system, protocol, mode) and r.stats.ok]
        axes.plot([s.throughput for s in points], [s.p99_ms for s in points], "o-" if mode == "closed" else "s--",
                  label=f"{system}, {protocol}, {'clients' if mode == 'closed' else 'Poisson'}")
    axes.axhline(deadline_ms, color="grey", linestyle=":", label="deadline")
    axes.set(xlabel="throughput (samples/s)", ylabel="p99 latency (ms)", yscale="log")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part]
    except ValueError:
        rates = []
    if not rates or any(not 0 < rate < float("inf") for rate in rates):
        raise UsageError(f"--rates: expected positive requests per second, comma-separated, got {text!r}")
    return rates


SYSTEMS = ("hetero-all", "hetero-best", "ray-best", "ray-devices", "loop")


def main(argv: list[str]) -> int:
    from ..inference import DEFAULT_TABLE

    parser = Parser(prog="python -m hetero.serve.benchmark",
                    description="hetero's server against Ray Serve's @serve.batch, under closed- and open-loop load.")
    parser.add_argument("--network", required=True, help="a registered network's name, or an .onnx model")
    parser.add_argument("--device", default="cpu", help="comma-separated devices (default cpu)")
    parser.add_argument("--best-device", help="the single device of (a) and (b) (default: measured, see above)")
    parser.add_argument("--clients", type=batch_list, default=[1, 4, 16, 64], help="closed-loop clients (1,4,16,64)")
    parser.add_argument("--rates", default="20,100", help="open-loop Poisson requests per second (default 20,100)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per load point (default 3)")
    parser.add_argument("--request-batch", type=positive_int, default=1, help="samples per request (default 1)")
    parser.add_argument("--sequence-length", type=positive_int, default=None,
                        help="for a network of named inputs with a sequence left open (a BERT-style encoder): the "
                             "length of every request, the one bucket the server serves; measures hetero's server "
                             "only (--systems hetero-all,hetero-best)")
    parser.add_argument("--latency-ms", type=float, default=50.0,
                        help="the deadline: hetero's --latency-ms, and what goodput counts within (default 50)")
    parser.add_argument("--protocols", default="http,grpc", help="hetero's: http, grpc or both (default both)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"of {', '.join(SYSTEMS)} (default all)")
    parser.add_argument("--ray-max-batch", type=positive_int, default=None,
                        help="@serve.batch's max_batch_size, in requests (default: 32 samples' worth)")
    parser.add_argument("--ray-wait-ms", type=float, default=5.0, help="@serve.batch's batch_wait_timeout_s in ms (5)")
    parser.add_argument("--workers", type=positive_int, default=64, help="open-loop sending threads (default 64)")
    parser.add_argument("--table", default=str(DEFAULT_TABLE), help=f"profile table (default {DEFAULT_TABLE})")
    parser.add_argument("--engine", default=None, help="as Inference.py's --engine")
    parser.add_argument("--profile-batches", type=batch_list, default=None, help="as Inference.py's")
    parser.add_argument("--plot", help="write p99 latency against throughput to this PNG (needs matplotlib)")
    parser.add_argument("--markdown", help="append the table, with the command, date and machine, to this file")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    args.rates = _rates(args.rates)
    devices = [d for d in args.device.split(",") if d]
    protocols = [p for p in args.protocols.split(",") if p]
    systems = [s for s in args.systems.split(",") if s]
    if set(protocols) - {"http", "grpc"} or set(systems) - set(SYSTEMS) or not devices:
        raise UsageError("--protocols takes http,grpc; --systems " + ",".join(SYSTEMS) + "; --device at least one")
    command = "python -m hetero.serve.benchmark " + shlex.join(argv)
    from ..models import get_network
    from .model import ServedModel

    net = get_network(args.network)
    if net.open_dimensions and not args.sequence_length:
        raise UsageError(f"{net.name} leaves {', '.join(net.open_dimensions)} open: give --sequence-length")
    if net.inputs and set(systems) - {"hetero-all", "hetero-best"}:
        raise UsageError(f"{net.name} takes named inputs, which only hetero's server is measured with: "
                         "--systems hetero-all,hetero-best")
    served = ServedModel(net, [args.sequence_length] if args.sequence_length else [])
    x = next(iter(served.networks.values())).random_input(args.request_batch)
    inputs = {name: np.ascontiguousarray(x[name]) for name in x.dtype.names} if net.inputs else {"input": x}
    outputs = [spec.name for spec in served.outputs]
    max_batch = args.ray_max_batch or max(1, 32 // args.request_batch)
    rows: list[Row] = []
    notes = [f"{net.name}, {args.request_batch} sample(s) a request, deadline {args.latency_ms:g} ms, "
             f"{args.seconds:g} s a point; latencies over answered requests; goodput: samples/s answered within "
             "the deadline; good %: of the requests sent. hetero's server is driven by tritonclient (KServe v2; "
             "HTTP with binary tensors, gRPC); Ray Serve by the tensor's raw bytes POSTed to its HTTP proxy "
             f"(not KServe v2), `@serve.batch(max_batch_size={max_batch}, batch_wait_timeout_s="
             f"{args.ray_wait_ms / 1e3:g})` around the engine hetero.Session(...).engines() picks."]
    several = len(devices) > 1
    best = args.best_device or devices[0]

    def run_hetero(system: str, on: str) -> None:
        with hetero_server(args, on) as (http_address, grpc_address, line):
            print(f"{system}: {line}", flush=True)
            notes.append(f"- {system}: {line.split(':')[0]}.")
            for protocol in protocols:
                address = http_address if protocol == "http" else grpc_address
                rows.extend(measure(args, system, protocol, triton_target(protocol, address, net.name, inputs, outputs),
                                    args.request_batch))
            if system == "hetero (all)" and not args.best_device:
                import json
                import urllib.request

                with urllib.request.urlopen(f"http://{http_address}/v2") as response:
                    served = json.load(response)["devices"]
                nonlocal best
                best = max(served, key=lambda name: served[name]["samples"])

    def run_ray(system: str, on: list[str]) -> None:
        with ray_serve(args, on, max_batch) as (port, engines):
            print(f"{system}: Ray Serve on {engines}", flush=True)
            notes.append(f"- {system}: Ray Serve replicas on {engines}.")
            rows.extend(measure(args, system, "http (Ray)", raw_http_target("127.0.0.1", port, "/bench", x),
                                args.request_batch))

    if several and "hetero-all" in systems:
        run_hetero("hetero (all)", args.device)
    if "hetero-best" in systems:
        run_hetero("(a) hetero (best)", best)
    if "ray-best" in systems:
        run_ray("(b) ray (best)", [best])
    if several and "ray-devices" in systems:
        run_ray("(c) ray (per device)", devices)
    if "loop" in systems:
        ceiling = plain_loop(args, best)
        print(ceiling, flush=True)
        notes.append(f"- {ceiling}.")
    if not several:
        notes.append("- One device: hetero (all) is (a), and (c) is (b), so each ran once.")
    print()
    print(tabulate([_cells(row) for row in rows], HEADERS, tablefmt="github"))
    if args.plot:
        plot(rows, args.plot, args.latency_ms)
    if args.markdown:
        with open(args.markdown, "a") as out:
            out.write("\n" + markdown(args, net.name, rows, notes, command))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, None))
