"""Run a network on devices: one `Engine` per device, and a split batch run in parallel threads.

TVM releases the GIL inside its calls, so one Python thread per device is enough to keep every
device busy at once.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from .compile import Compiled, compile_network
from .devices import Device
from .errors import HeteroError
from .models import Network


class ExecutionError(HeteroError):
    """A device failed while running its share."""


_set_cpu_threads = tvm.get_global_func("runtime.config_threadpool")


@dataclass
class Timing:
    """Seconds spent by one call: copy in, compute, copy out."""

    h2d_s: float
    exec_s: float
    d2h_s: float

    @property
    def total_s(self) -> float:
        return self.h2d_s + self.exec_s + self.d2h_s


class Engine:
    """A compiled network resident on one device, with its weights uploaded once.

    Every run goes through the engine's own long-lived worker thread: TVM's CPU thread pool belongs
    to the calling thread, so a fresh thread per run would pay for a cold pool each time, and
    profiling in the same thread that later runs the shares keeps predictions honest.
    """

    def __init__(self, network: Network, device: Device, compiled: Compiled):
        self.network = network
        self.device = device
        self.compiled = compiled
        self._dev = device.tvm_device()
        self._vm = relax.VirtualMachine(compiled.executable, self._dev)
        self._main = self._vm["main"]
        self._weights = [tvm.runtime.tensor(p, self._dev) for p in network.params]
        self._worker = ThreadPoolExecutor(1, f"hetero-{device.name}", initializer=self._size_thread_pool)

    def _size_thread_pool(self) -> None:
        """Give this device's worker thread its share of the cores (0 keeps TVM's default)."""
        if self.device.threads:
            _set_cpu_threads(1, self.device.threads)

    def _infer_here(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        t0 = time.perf_counter()
        on_device = tvm.runtime.tensor(np.ascontiguousarray(batch, dtype=self.network.dtype), self._dev)
        self._dev.sync()
        t1 = time.perf_counter()
        out = self._main(on_device, *self._weights)
        self._dev.sync()
        t2 = time.perf_counter()
        host = out.numpy()
        t3 = time.perf_counter()
        return host, Timing(t1 - t0, t2 - t1, t3 - t2)

    def submit(self, batch: np.ndarray) -> Future:
        """Start one batch (host memory to host memory) on the worker; the future gives (outputs, Timing)."""
        return self._worker.submit(self._infer_here, batch)

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        return self.submit(batch).result()

    def close(self) -> None:
        self._worker.shutdown()


_engines: dict[tuple[str, str, str, int], Engine] = {}
_engines_lock = threading.Lock()


def load_engine(network: Network, device: Device) -> Engine:
    """The engine for (network, device), compiled or loaded from the disk cache once per process."""
    key = (network.name, device.name, device.key, device.threads)
    with _engines_lock:
        if key not in _engines:
            _engines[key] = Engine(network, device, compile_network(network, device))
        return _engines[key]


@dataclass
class ShareResult:
    """What one device did with its contiguous slice of the batch."""

    device: Device
    start: int
    size: int
    predicted_s: float
    compile_s: float = 0.0  # spent building this device's module in this process; 0 if cached
    timing: Timing | None = None
    wall_s: float = 0.0
    error: str | None = None


def run_split(
    engines: list[Engine], inputs: np.ndarray, shares: list[int], predicted_s: list[float]
) -> tuple[np.ndarray, list[ShareResult], float]:
    """Give each engine its contiguous slice of `inputs`, run all at once, gather outputs in input order."""
    starts = np.concatenate(([0], np.cumsum(shares)[:-1])).astype(int)
    results = [
        ShareResult(engine.device, int(start), int(size), predicted, engine.compiled.seconds)
        for engine, start, size, predicted in zip(engines, starts, shares, predicted_s)
    ]
    begin = time.perf_counter()
    finished: dict[int, float] = {}
    futures: list[Future | None] = []
    for i, (engine, result) in enumerate(zip(engines, results)):
        future = engine.submit(inputs[result.start : result.start + result.size]) if result.size else None
        if future is not None:
            future.add_done_callback(lambda _, i=i: finished.__setitem__(i, time.perf_counter()))
        futures.append(future)
    outputs = []
    for i, (result, future) in enumerate(zip(results, futures)):
        if future is None:
            continue
        try:
            out, result.timing = future.result()
            outputs.append(out)
        except Exception as exc:  # reported per device; the caller decides what to do with the share
            result.error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        result.wall_s = finished.get(i, time.perf_counter()) - begin
    wall_s = time.perf_counter() - begin
    failed = [r for r in results if r.error]
    if failed:
        raise ExecutionError("; ".join(f"{r.device.name} failed on its share: {r.error}" for r in failed))
    return np.concatenate(outputs, axis=0), results, wall_s
