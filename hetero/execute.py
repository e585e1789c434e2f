"""Run a network on devices: one `Engine` per device, and a split batch run in parallel threads.

TVM releases the GIL inside its calls, so one Python thread per device is enough to keep every
device busy at once. A split run survives devices that fail on their share: what they did not finish
is split again over the devices still working, so every sample runs exactly once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import statistics
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from .compile import BUILD_ID, Compiled, compile_network, module_max_batch, module_weights
from .devices import Device
from .errors import HeteroError, one_line
from .models import Network
from .tune import Tuning

log = logging.getLogger(__name__)


class ExecutionError(HeteroError):
    """Samples that no device could run: every device that could take them failed."""


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

    @classmethod
    def summed(cls, timings: Sequence[Timing]) -> Timing:
        return cls(sum(t.h2d_s for t in timings), sum(t.exec_s for t in timings), sum(t.d2h_s for t in timings))


_CUDA_HOST = 3  # DLPack's kDLCUDAHost: page-locked host memory, allocated with cudaMallocHost
# An accelerator's call is pipelined in up to this many chunks of at least this many samples
PIPELINE_CHUNKS = 4
PIPELINE_MIN_CHUNK = 32


def copy_threads() -> int:
    """Threads that copy an accelerator's inputs into its staging buffer, its own worker included.

    One core copies at a few GB/s (3.7 GB/s into page-locked memory on the 32-core Xeon host of the
    H100 machines: slower than the driver's own pageable path), a GPU's DMA at ten times that; so
    hosts of 8 cores and more give each accelerator one per 4 cores, up to 4 (on the 16-core H200
    host, mobilenet's 256-sample call took 13.5 ms with 4 against 18.3 with 2), and
    hetero.inference.reserve_cores keeps them free.
    """
    return max(1, min(4, (os.cpu_count() or 1) // 4))


class ParallelCopy:
    """Copies rows with `threads` threads: the calling one and threads - 1 helpers (numpy releases the GIL)."""

    MIN_BYTES = 4 << 20  # smaller copies stay on the calling thread

    def __init__(self, threads: int, name: str):
        self.threads = threads
        self._helpers = ThreadPoolExecutor(threads - 1, name) if threads > 1 else None

    def __call__(self, destination: np.ndarray, source: np.ndarray) -> None:
        if self._helpers is None or source.nbytes < self.MIN_BYTES or len(source) < 2:
            np.copyto(destination, source)
            return
        bounds = np.linspace(0, len(source), self.threads + 1, dtype=int)
        parts = [slice(first, last) for first, last in zip(bounds[:-1], bounds[1:])]
        pending = [self._helpers.submit(np.copyto, destination[part], source[part]) for part in parts[1:]]
        np.copyto(destination[parts[0]], source[parts[0]])
        for done in pending:
            done.result()

    def shutdown(self) -> None:
        if self._helpers:
            self._helpers.shutdown()


def staging_device(device: tvm.runtime.Device) -> tvm.runtime.Device:
    """Where a device's inputs are staged: page-locked memory for a CUDA GPU, which its DMA engine
    reads at full speed (pageable memory goes through the driver's bounce buffer at a fraction of
    it), plain host memory for any other device."""
    if device.type == "cuda":
        return tvm.runtime.Device(_CUDA_HOST, device.index)
    return tvm.cpu()


class BatchBuffer:
    """One buffer of batches on a device, grown to the largest batch seen and reused by every call,
    so a call neither allocates nor frees device or page-locked memory."""

    def __init__(self, device: tvm.runtime.Device, sample_shape: tuple[int, ...], dtype: str):
        self._device, self._sample_shape, self._dtype = device, sample_shape, dtype
        self._tensor: tvm.runtime.Tensor | None = None
        self._capacity = 0

    def view(self, samples: int) -> tvm.runtime.Tensor:
        """The first `samples` rows, as a tensor the network can take."""
        if samples > self._capacity:
            self._tensor = None  # free the old buffer before allocating the larger one
            self._tensor = tvm.runtime.empty((samples, *self._sample_shape), self._dtype, self._device)
            self._capacity = samples
        return self._tensor._create_view((samples, *self._sample_shape))

    def fill(self, batch: np.ndarray, copy: Callable[[np.ndarray, np.ndarray], None] = np.copyto) -> tvm.runtime.Tensor:
        """`batch` copied in (cast to the network's dtype), for host buffers only."""
        staged = self.view(len(batch))
        shape = (len(batch), *self._sample_shape)
        nbytes = math.prod(shape) * np.dtype(self._dtype).itemsize
        host = np.frombuffer((ctypes.c_byte * nbytes).from_address(staged.data_ptr()), self._dtype).reshape(shape)
        copy(host, batch)
        return staged


# How an engine stages inputs and calls its module is part of what a profile measures, as much as the
# schedules are: profiles are keyed by this file's digest too (compiled modules are not).
ENGINE_ID = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]


def profile_key(device: Device) -> str:
    """The table key of a device's profiles: its identity and the hetero build (schedules and engine)
    whose timings they hold."""
    return f"{device.key} | hetero {BUILD_ID}-{ENGINE_ID}"


class Engine:
    """A compiled network resident on one device, with its weights uploaded once.

    Every run goes through the engine's own long-lived worker thread: TVM's CPU thread pool belongs
    to the calling thread, so a fresh thread per run would pay for a cold pool each time, and
    profiling in the same thread that later runs the shares keeps predictions honest.
    """

    def __init__(self, network: Network, device: Device, compiled: Compiled,
                 tuned: tuple[Tuning, Compiled] | None = None):
        self.network = network
        self.device = device
        self.compiled = compiled
        self.tuning = tuned[0] if tuned else None
        # The records are read once, as they were when the tuned module was compiled from them.
        self.profile_key = profile_key(self.device) + (
            f" | tuned at batch {self.tuning.batch}, records {self.tuning.digest()}" if tuned else "")
        self._dev = device.tvm_device()
        vm = relax.VirtualMachine(compiled.executable, self._dev)
        uploaded = [tvm.runtime.tensor(p, self._dev) for p in network.params]
        self._main = (vm["main"], module_weights(vm, uploaded))
        self.max_call = module_max_batch(vm, device)  # hetero's module takes at most this batch per call
        # Whole chunks of the tuning's batch run through the module tuned for exactly that batch.
        tuned_vm = relax.VirtualMachine(tuned[1].executable, self._dev) if tuned else None
        self._tuned_main = (tuned_vm["main"], module_weights(tuned_vm, uploaded)) if tuned else None
        sample = tuple(network.input_shape)
        if self._dev.type == "cpu":
            self._staging = BatchBuffer(self._dev, sample, network.dtype)  # what the network reads
            self._on_device, self._copy = None, np.copyto
        else:
            self._staging = BatchBuffer(staging_device(self._dev), sample, network.dtype)
            # two input buffers: a chunk is copied into one while the chunk before is computed from the other
            self._on_device = [BatchBuffer(self._dev, sample, network.dtype) for _ in range(2)]
            self._copy = ParallelCopy(copy_threads(), f"hetero-{device.name}-copy")
        # A CUDA GPU computes on a stream of its own, which TVM creates non-blocking: copies queued on the
        # default stream then run beside its kernels instead of after them.
        self._stream = self._dev.create_raw_stream() if self._dev.type == "cuda" else None
        self._worker = ThreadPoolExecutor(1, f"hetero-{device.name}", initializer=self._size_thread_pool)
        self._has_run = False


    def _size_thread_pool(self) -> None:
        """Give this device's worker thread its share of the cores.

        TVM sizes a thread's pool when it first runs a parallel kernel, by default with half the
        logical CPUs on x86, and config_threadpool can only lower that: so every core is allowed
        first (unless TVM_NUM_THREADS says otherwise), then the device's share is set.
        """
        os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
        if self.device.threads:
            _set_cpu_threads(1, self.device.threads)

    def compute(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        """One call on this thread, host memory to host memory: all device work goes through here.

        That makes it the one seam where tests inject device faults (a subclass that raises).
        """
        return self._call(batch)

    def _call(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        calls = [self._call_module(batch[first : first + size], module)
                 for first, size, module in self._plan_calls(len(batch))]
        if len(calls) == 1:
            return calls[0]
        return np.concatenate([out for out, _ in calls]), Timing.summed([timing for _, timing in calls])

    def _plan_calls(self, samples: int) -> list[tuple[int, int, tuple[Callable, list]]]:
        """(first sample, size, module) of each module call that runs `samples`: whole chunks of the
        tuning's batch through the tuned module, the rest through hetero's in calls of at most
        `max_call` samples."""
        plan, tuned = [], 0
        if self._tuned_main is not None:
            step = self.tuning.batch
            tuned = samples - samples % step
            plan = [(first, step, self._tuned_main) for first in range(0, tuned, step)]
        limit = self.max_call or max(samples - tuned, 1)
        plan += [(first, min(limit, samples - first), self._main) for first in range(tuned, samples, limit)]
        return plan or [(0, 0, self._main)]

    def time_module(self, tuned: bool, repeats: int = 3) -> float:
        """Median seconds of one call at the tuning's batch through the tuned module or hetero's own."""
        batch = self.network.random_input(self.tuning.batch)
        main = self._tuned_main if tuned else self._main
        self._call_module(batch, main)
        return statistics.median(self._call_module(batch, main)[1].total_s for _ in range(repeats))

    def _chunks(self, samples: int) -> list[int]:
        """The sizes a call of `samples` is pipelined in: an accelerator's, so that staging each
        chunk's inputs on the host overlaps the device computing the chunk before; the CPU's, whole."""
        if self._on_device is None:
            return [samples]
        count = max(1, min(PIPELINE_CHUNKS, samples // PIPELINE_MIN_CHUNK))
        return [len(part) for part in np.array_split(np.arange(samples), count)]

    def _call_module(self, batch: np.ndarray, module: tuple[Callable, list]) -> tuple[np.ndarray, Timing]:
        """One call of the module, in chunks (:meth:`_chunks`): while the device computes chunk k - 1,
        chunk k is staged on the host and copied into the device buffer that chunk k - 1 does not use;
        then chunk k - 1's outputs are read back and chunk k is launched. The Timing splits the wall
        time: staging and copying count as copying in, even while the device computes."""
        main, weights = module
        copy_in = compute = copy_out = 0.0
        outputs, in_flight, first = [], None, 0
        mark = time.perf_counter()

        def lap() -> float:
            nonlocal mark
            now = time.perf_counter()
            seconds, mark = now - mark, now
            return seconds

        for index, size in enumerate(self._chunks(len(batch))):
            staged = self._staging.fill(batch[first : first + size], self._copy)
            first += size
            if self._on_device is None:
                on_device = staged
            else:
                on_device = self._on_device[index % 2].view(size)
                on_device.copyfrom(staged)  # queued on the default stream
            copy_in += lap()
            if in_flight is not None:
                self._dev.sync(self._stream)
                compute += lap()
            self._dev.sync()  # the copy is done: the staging buffer and this device buffer are free again
            copy_in += lap()
            if in_flight is not None:
                outputs.append(in_flight.numpy())
                copy_out += lap()
            in_flight = self._launch(main, on_device, weights)
            compute += lap()
        self._dev.sync(self._stream)
        compute += lap()
        outputs.append(in_flight.numpy())
        copy_out += lap()
        self._has_run = True
        host = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        return host, Timing(copy_in, compute, copy_out)

    def _launch(self, main: Callable, inputs: tvm.runtime.Tensor, weights: list) -> tvm.runtime.Tensor:
        """Queue the module's kernels, on the engine's compute stream where it has one."""
        if self._stream is None:
            return main(inputs, *weights)
        with tvm_ffi.use_raw_stream(self._dev, self._stream):
            return main(inputs, *weights)

    def prepare(self, samples: int) -> None:
        """Before a timed run: input buffers for `samples`, and on an engine that has not run yet one
        sample through it, so that lazy first-use work is not charged to the run (a second GPU whose
        profile was measured on its twin: 172 ms for a 15-sample share predicted at 6 ms, while NVIDIA's
        OpenCL driver built the programs). A failure here is left for the run itself to meet and report."""
        try:
            largest = max(self._chunks(samples))
            for buffer in [self._staging, *(self._on_device or [])]:
                buffer.view(largest)
            if not self._has_run:
                self._call(np.zeros((1, *self.network.input_shape), self.network.dtype))
        except Exception:  # noqa: BLE001 -- the run retries on this device and re-plans if it fails again
            log.debug("preparing %s failed", self.device.name, exc_info=True)

    def on_worker(self, fn: Callable, *args) -> Future:
        """Run fn(*args) on this engine's worker thread."""
        return self._worker.submit(fn, *args)

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        """One call of `batch` on the worker, waited for."""
        return self.on_worker(self.compute, batch).result()

    def close(self) -> None:
        self._worker.shutdown()
        if isinstance(self._copy, ParallelCopy):
            self._copy.shutdown()
        if self._stream is not None:
            self._dev.free_raw_stream(self._stream)
            self._stream = None


_engines: dict[tuple[str, str, str, str], Engine] = {}
_engines_lock = threading.Lock()


def load_engine(network: Network, device: Device, tuning: Tuning | None = None) -> Engine:
    """The engine for (network, device[, tuning]), compiled or loaded from the disk cache once per process."""
    # the device key holds the thread count and precision
    key = (network.digest, device.name, device.key, tuning.digest() if tuning else "")
    with _engines_lock:
        if key not in _engines:
            tuned = (tuning, compile_network(network, device, tuning=tuning)) if tuning else None
            _engines[key] = Engine(network, device, compile_network(network, device), tuned)
        return _engines[key]


@dataclass
class ShareResult:
    """What one device did with one contiguous slice of the batch."""

    device: Device
    start: int
    size: int
    predicted_s: float
    compile_s: float = 0.0  # spent building this device's module in this process; 0 if cached
    timing: Timing | None = None  # summed over the calls that succeeded
    wall_s: float = 0.0  # from the start of the split run until this share finished
    error: str | None = None  # why the device stopped; samples from start + completed on ran elsewhere
    completed: int = 0
    calls: int = 0  # more than one when the share ran in chunks
    takes_over_from: str | None = None  # the failed device whose samples this share runs


# Given the indices of the engines still working and a number of samples: their shares and predicted seconds.
Replan = Callable[[list[int], int], tuple[list[int], list[float]]]


def _run_share(engine: Engine, share: ShareResult, batch: np.ndarray, limit: int | None, begin: float) -> list:
    """On the engine's worker: the share as consecutive calls of at most `limit` samples, up to the first failure.

    Returns the outputs of the calls that succeeded; the share records how far it got and why it stopped.
    """
    step = limit or len(batch)
    outputs, timings = [], []
    for first in range(0, len(batch), step):
        share.calls += 1
        try:
            out, timing = engine.compute(batch[first : first + step])
        except Exception as exc:  # out of memory, a driver error: the caller moves the rest elsewhere
            share.error = one_line(exc)
            break
        outputs.append(out)
        timings.append(timing)
        share.completed += len(out)
    if timings:
        share.timing = Timing.summed(timings)
    share.wall_s = time.perf_counter() - begin
    return outputs


def run_split(
    engines: Sequence[Engine],
    inputs: np.ndarray,
    shares: Sequence[int],
    predicted_s: Sequence[float],
    limits: Sequence[int | None] | None = None,
    replan: Replan | None = None,
) -> tuple[np.ndarray, list[ShareResult], float]:
    """Give each engine its contiguous slice of `inputs`, run all at once, gather outputs in input order.

    A share larger than its engine's limit (the largest batch its profile showed to fit) runs as
    consecutive chunks. When an engine fails, the samples it did not finish are split by `replan` over
    the engines still working and queued behind their work, so each sample runs exactly once. Results
    list the planned shares, one per engine, then those that took over. Without `replan`, or with no
    engine left, ExecutionError names every failure once all running shares are done.
    """
    limits = [None] * len(engines) if limits is None else limits
    working = set(range(len(engines)))
    results: list[ShareResult] = []
    running: dict[Future, tuple[int, ShareResult]] = {}
    pieces: list[tuple[int, np.ndarray]] = []
    unplaced = 0

    def launch(indices, start, sizes, predicted, takes_over_from=None):
        for i, size, seconds in zip(indices, sizes, predicted, strict=True):
            compile_s = 0.0 if takes_over_from else engines[i].compiled.seconds
            share = ShareResult(engines[i].device, start, int(size), float(seconds), compile_s,
                                takes_over_from=takes_over_from)
            if size or takes_over_from is None:
                results.append(share)
            if size:
                batch = inputs[start : start + size]
                running[engines[i].on_worker(_run_share, engines[i], share, batch, limits[i], begin)] = (i, share)
            start += size

    preparing = [engine.on_worker(engine.prepare, min(size, limit or size))
                 for engine, size, limit in zip(engines, shares, limits) if size]
    wait(preparing)
    begin = time.perf_counter()
    launch(range(len(engines)), 0, shares, predicted_s)
    while running:
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            i, share = running.pop(future)
            outputs = future.result()
            if outputs:
                pieces.append((share.start, np.concatenate(outputs, axis=0)))
            if share.error is None:
                continue
            working.discard(i)
            left = share.size - share.completed
            survivors = sorted(working)
            failed = f"{share.device.name} failed ({share.error})"
            try:
                moved, predicted = replan(survivors, left) if survivors and replan else ([], [])
            except HeteroError as exc:
                moved, predicted = [], []
                failed += f"; {exc}"
            if sum(moved) != left:
                log.warning(f"{failed}; no working device can take its last {left} samples")
                unplaced += left
                continue
            names = ", ".join(engines[j].device.name for j, size in zip(survivors, moved) if size)
            log.warning(f"{failed}; moving its last {left} samples to {names}")
            launch(survivors, share.start + share.completed, moved, predicted, share.device.name)
    wall_s = time.perf_counter() - begin
    if unplaced:
        failures = "; ".join(dict.fromkeys(f"{r.device.name} failed: {r.error}" for r in results if r.error))
        raise ExecutionError(f"{unplaced} of {len(inputs)} samples could not run: {failures}")
    pieces.sort(key=lambda piece: piece[0])
    return np.concatenate([out for _, out in pieces], axis=0), results, wall_s
