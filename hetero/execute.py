"""Run a network on devices: one `Engine` per device, and a split batch run in parallel threads.

TVM releases the GIL inside its calls, so one Python thread per device is enough to keep every
device busy at once.
"""

from __future__ import annotations

import threading
import time
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
    """A compiled network resident on one device, with its weights uploaded once."""

    def __init__(self, network: Network, device: Device, compiled: Compiled):
        self.network = network
        self.device = device
        self.compiled = compiled
        self._dev = device.tvm_device()
        self._vm = relax.VirtualMachine(compiled.executable, self._dev)
        self._main = self._vm["main"]
        self._weights = [tvm.runtime.tensor(p, self._dev) for p in network.params]

    def _pin_threads(self) -> None:
        """TVM's CPU thread pool is per calling thread; size it for this device's share of the cores."""
        if self.device.threads:
            _set_cpu_threads(1, self.device.threads)

    def upload(self, batch: np.ndarray) -> tvm.runtime.Tensor:
        tensor = tvm.runtime.tensor(np.ascontiguousarray(batch, dtype=self.network.dtype), self._dev)
        self._dev.sync()
        return tensor

    def compute(self, batch_on_device: tvm.runtime.Tensor) -> tvm.runtime.Tensor:
        out = self._main(batch_on_device, *self._weights)
        self._dev.sync()
        return out

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        """Run one batch from host memory to host memory, timing each leg."""
        self._pin_threads()
        t0 = time.perf_counter()
        on_device = self.upload(batch)
        t1 = time.perf_counter()
        out = self.compute(on_device)
        t2 = time.perf_counter()
        host = out.numpy()
        t3 = time.perf_counter()
        return host, Timing(t1 - t0, t2 - t1, t3 - t2)


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
    outputs: list[np.ndarray | None] = [None] * len(engines)
    go = threading.Barrier(sum(1 for r in results if r.size) + 1)

    def work(i: int) -> None:
        result = results[i]
        piece = inputs[result.start : result.start + result.size]
        go.wait()
        begin = time.perf_counter()
        try:
            outputs[i], result.timing = engines[i].infer(piece)
        except Exception as exc:  # reported per device; the caller decides what to do with the share
            result.error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        result.wall_s = time.perf_counter() - begin

    threads = [
        threading.Thread(target=work, args=(i,), name=f"hetero-{r.device.name}")
        for i, r in enumerate(results)
        if r.size
    ]
    for thread in threads:
        thread.start()
    go.wait()
    begin = time.perf_counter()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - begin
    failed = [r for r in results if r.error]
    if failed:
        raise ExecutionError("; ".join(f"{r.device.name} failed on its share: {r.error}" for r in failed))
    gathered = np.concatenate([out for out in outputs if out is not None], axis=0)
    return gathered, results, wall_s
