"""The interface every engine implements, as inference servers put backends behind one interface.

An engine is one network resident on one device: it is prepared once (compiled, loaded, weights
uploaded), computes a batch from host memory to host memory with the seconds spent copying in,
computing and copying out, and is closed. Everything else in hetero (profiling, planning, the data
path of hetero.feed) talks to engines through this class only.

A call is launched (:meth:`Engine.launch`) and its result waited for later, so that an accelerator's
engine can stage, upload and compute several calls at once; an engine that does not overlap calls
computes each as it is launched.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from ..devices import Device
from ..errors import HeteroError
from ..models import Network
from ..table import ENGINE_FIELD, KEY_FIELDS

log = logging.getLogger(__name__)


class EngineUnavailableError(HeteroError):
    """An engine that is not installed here, or cannot run this network on this device."""


@dataclass
class Timing:
    """Seconds spent by one call: copy in, compute, copy out."""

    h2d_s: float
    exec_s: float
    d2h_s: float

    @property
    def total_s(self) -> float:
        return self.h2d_s + self.exec_s + self.d2h_s

    @classmethod
    def summed(cls, timings: Sequence[Timing]) -> Timing:
        return cls(sum(t.h2d_s for t in timings), sum(t.exec_s for t in timings), sum(t.d2h_s for t in timings))


def copy_threads() -> int:
    """Host threads that copy one accelerator's inputs into its page-locked staging.

    One core copies at a few GB/s (3.7 GB/s into page-locked memory on the 32-core Xeon host of the
    H100 machines: slower than the driver's own pageable path), a GPU's DMA at ten times that; so
    hosts of 8 cores and more give each accelerator one per 4 cores, up to 4 (on the 16-core H200
    host, mobilenet's 256-sample call took 13.5 ms with 4 against 18.3 with 2), and
    hetero.inference.reserve_cores keeps them free. $HETERO_COPY_THREADS sets another count.
    """
    if os.environ.get("HETERO_COPY_THREADS", "").isdigit():  # to measure other counts
        return max(1, int(os.environ["HETERO_COPY_THREADS"]))
    return max(1, min(4, (os.cpu_count() or 1) // 4))


class ParallelCopy:
    """Copies rows with `threads` threads of its own (numpy releases the GIL while it copies), so that a
    copy into an accelerator's staging runs at several cores' speed and beside the caller's own work."""

    MIN_BYTES = 4 << 20  # smaller copies are not split

    def __init__(self, threads: int, name: str):
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, name)

    def start(self, destination: np.ndarray, source: np.ndarray) -> list[Future]:
        """Begin copying `source` into `destination` (casting to its dtype); the copy is done when every
        future is. `source` must not change until then."""
        parts = 1 if source.nbytes < self.MIN_BYTES else max(1, min(self.threads, len(source)))
        bounds = np.linspace(0, len(source), parts + 1, dtype=int)
        return [self._pool.submit(np.copyto, destination[first:last], source[first:last], casting="unsafe")
                for first, last in zip(bounds[:-1], bounds[1:])]

    def __call__(self, destination: np.ndarray, source: np.ndarray) -> None:
        for done in self.start(destination, source):
            done.result()

    def shutdown(self) -> None:
        self._pool.shutdown()


def cpu_threads(device: Device) -> int:
    """The threads a CPU engine computes with: the device's share of the cores, or all of them."""
    return device.threads or os.cpu_count() or 1


def profile_key(device: Device, engine: str, version: str) -> str:
    """The table key of an engine's profiles on a device: the device's identity and the engine's."""
    return f"{device.key}{KEY_FIELDS}{ENGINE_FIELD}{engine} {version}"


class Call(Protocol):
    """One call launched on an engine."""

    def result(self) -> tuple[np.ndarray, Timing]:
        """Wait for the call: its outputs, valid until the engine's next launch, and its Timing."""


class Finished:
    """A call computed as it was launched."""

    def __init__(self, outputs: np.ndarray, timing: Timing):
        self._result = (outputs, timing)

    def result(self) -> tuple[np.ndarray, Timing]:
        return self._result


def wait_all(futures: Sequence[Future]) -> None:
    """Wait for every future, raising the first failure."""
    wait(futures)
    for future in futures:
        future.result()


class Engine(ABC):
    """A network resident on one device.

    Every call goes through the engine's own long-lived worker thread: thread pools (TVM's, PyTorch's
    intra-op pool) belong to the threads that use them, and profiling in the same thread that later
    runs the shares keeps predictions honest.
    """

    name: ClassVar[str]  # what users pass to --engine
    package: ClassVar[str]  # the extra that installs it: pip install 'hetero[<package>]'
    in_flight = 1  # the calls it overlaps: a caller keeps this many launched before waiting for the first

    def __init__(self, network: Network, device: Device):
        self.network = network
        self.device = device
        self.load_s = 0.0  # seconds this process spent building or loading the engine (:meth:`load`); 0 when cached
        self.from_cache = False  # whether what takes long to build came ready from a cache (TVM's compiled module)
        self.max_call: int | None = None  # the most samples one call takes; None for no limit
        self._worker = ThreadPoolExecutor(1, f"hetero-{device.name}-{self.name}", initializer=self.on_worker_start)
        self._warm: set[int] = set()  # call sizes that have run

    @classmethod
    def load(cls, network: Network, device: Device, **options) -> Engine:
        """The engine built (compiled, loaded, weights uploaded) for `network` on `device` by :meth:`build`,
        with the seconds that took as its `load_s`, timed here for every engine: 0 where it came from a cache."""
        start = time.perf_counter()
        engine = cls.build(network, device, **options)
        engine.load_s = 0.0 if engine.from_cache else time.perf_counter() - start
        return engine

    @classmethod
    def build(cls, network: Network, device: Device) -> Engine:
        """What :meth:`load` times: an engine whose construction needs more than `network` and `device`
        (TVM's compiles its module first) builds it here."""
        return cls(network, device)

    @classmethod
    def unsupported(cls, network: Network, device: Device) -> str | None:
        """Why this engine cannot run `network` on `device`, or None when it can (imports nothing heavy)."""
        return None

    @property
    @abstractmethod
    def version(self) -> str:
        """What, besides the device, decides this engine's speed: its library's version and settings."""

    @property
    def tunable(self) -> bool:
        """Whether --tune's MetaSchedule records apply to this engine on its device."""
        return False

    @property
    def profile_key(self) -> str:
        """The table key of this engine's profiles: the device's identity and the engine's."""
        return profile_key(self.device, self.name, self.version)

    def on_worker_start(self) -> None:  # noqa: B027 -- a hook engines may fill, not one they must
        """Runs once on the worker thread before any call (thread pools are sized here)."""

    def compute(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        """One call on the worker thread, host memory to host memory: all device work goes through here.

        That makes it the one seam where tests inject device faults (a subclass that raises).
        """
        result = self.run(batch)
        self._warm.add(len(batch))
        return result

    @abstractmethod
    def run(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        """What :meth:`compute` does: the engine's own call."""

    def launch(self, batch: np.ndarray) -> Call:
        """Start one call of `batch`, on the worker thread. `batch` may be a view of the caller's samples,
        read while the call runs: it must not change until the call's result is taken. An engine that
        overlaps calls (`in_flight` > 1) returns at once; here the call is computed before it returns."""
        return Finished(*self.compute(batch))

    def plain_loop(self, inputs: np.ndarray, batch: int) -> np.ndarray:
        """`inputs` (a host array) the way the engine's own guide runs one: a call of `batch` samples after
        another, each waited for; the outputs. The baseline a stream is measured against."""
        return np.concatenate([self.run(inputs[first : first + batch])[0] for first in range(0, len(inputs), batch)])

    def resident_throughput(self, batch: int, seconds: float = 2.0) -> float | None:
        """Samples per second computed from inputs already on the device, in calls of `batch` (what the
        device computes when nothing is copied); None where inputs live in host memory anyway."""
        return None

    def call_sizes(self, samples: int, limit: int | None = None) -> set[int]:
        """The sizes of the calls a share of `samples` in calls of at most `limit` makes."""
        step = min(samples, limit or samples, self.max_call or samples)
        return {step, samples % step} - {0}

    def prepare(self, samples: int, limit: int | None = None) -> None:
        """Before a timed run of a share of `samples` in calls of at most `limit`: each call size this
        engine has not run yet runs once, so that what a fresh process pays on a size's first call
        (kernels loading, buffers allocated, fresh host memory touched, a JIT compiling) is not charged
        to the run. A failure here is left for the run itself to meet and report."""
        try:
            for size in sorted(self.call_sizes(samples, limit) - self._warm):
                self.compute(np.zeros((size, *self.network.input_shape), self.network.input_dtype))
        except Exception:  # noqa: BLE001 -- the run retries on this device and re-plans if it fails again
            log.debug("preparing %s on %s failed", self.name, self.device.name, exc_info=True)

    def on_worker(self, fn: Callable, *args) -> Future:
        """Run fn(*args) on this engine's worker thread."""
        return self._worker.submit(fn, *args)

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        """One call of `batch` on the worker, waited for."""
        return self.on_worker(self.compute, batch).result()

    def close(self) -> None:
        self._worker.shutdown()
