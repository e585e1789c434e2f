"""TVM's engine: the network compiled by hetero's own schedules (hetero.compile), run by TVM's
Relax VM. It runs on every device kind, OpenCL ones included, and is always installed.

TVM releases the GIL inside its calls, so one Python thread per device keeps every device busy.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from ..cache import code_digest
from ..compile import BUILD_ID, Compiled, compile_network, module_max_batch, module_weights
from ..devices import Device
from ..models import Network
from ..tune import Tuning, tunable
from . import base
from .base import Engine, ParallelCopy, Timing, copy_threads

log = logging.getLogger(__name__)

_set_cpu_threads = tvm.get_global_func("runtime.config_threadpool")

_CUDA_HOST = 3  # DLPack's kDLCUDAHost: page-locked host memory, allocated with cudaMallocHost
# An accelerator's call is pipelined in up to this many chunks of at least this many samples
PIPELINE_CHUNKS = 4
PIPELINE_MIN_CHUNK = 32


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


# How the engine stages inputs and calls its module is part of what a profile measures, as much as the
# schedules are: profiles are keyed by this file's digest too (compiled modules are not).
ENGINE_ID = code_digest([Path(__file__)])[:8]
VERSION = f"hetero {BUILD_ID}-{ENGINE_ID}"


def profile_key(device: Device) -> str:
    """The table key of the (untuned) TVM engine's profiles on `device`."""
    return base.profile_key(device, TVMEngine.name, VERSION)


class TVMEngine(Engine):
    """A network compiled for one device, with its weights uploaded (and prepared) once."""

    name = "tvm"
    package = "tvm"

    def __init__(self, network: Network, device: Device, compiled: Compiled,
                 tuned: tuple[Tuning, Compiled] | None = None):
        super().__init__(network, device)
        self.compiled = compiled
        self.from_cache = compiled.cached and (tuned is None or tuned[1].cached)
        self.tuning = tuned[0] if tuned else None
        # The records are read once, as they were when the tuned module was compiled from them.
        self._version = VERSION + (
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
        self._warm_calls: set[tuple[int, int]] = set()  # (module, samples) of the module calls that have run

    @classmethod
    def build(cls, network: Network, device: Device, tuning: Tuning | None = None) -> TVMEngine:
        """The engine for `network` on `device`, compiled or loaded from the disk cache; with a tuning,
        whole chunks of its batch run through the module tuned for exactly that batch."""
        tuned = (tuning, compile_network(network, device, tuning=tuning)) if tuning else None
        return cls(network, device, compile_network(network, device), tuned)

    @classmethod
    def unsupported(cls, network: Network, device: Device) -> str | None:
        if network.module is None:
            return f"{network.name} has no Relax module: TVM's ONNX frontend does not convert it"
        return None

    @property
    def version(self) -> str:
        return self._version

    @property
    def tunable(self) -> bool:
        """Tuning times its modules through the staging of one input, which a network of named inputs skips."""
        return tunable(self.device) and not self.network.inputs

    def on_worker_start(self) -> None:
        """Give this device's worker thread its share of the cores.

        TVM sizes a thread's pool when it first runs a parallel kernel, by default with half the
        logical CPUs on x86, and config_threadpool can only lower that: so every core is allowed
        first (unless TVM_NUM_THREADS says otherwise), then the device's share is set.
        """
        os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
        if self.device.threads:
            _set_cpu_threads(1, self.device.threads)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        call = self._call_named if self.network.inputs else self._call_module
        calls = [call(batch[first : first + size], module) for first, size, module in self._plan_calls(len(batch))]
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

    def chunks(self, samples: int) -> list[int]:
        """The sizes a call of `samples` is pipelined in: an accelerator's, so that staging each
        chunk's inputs on the host overlaps the device computing the chunk before; the CPU's, whole."""
        if self._on_device is None:
            return [samples]
        count = max(1, min(PIPELINE_CHUNKS, samples // PIPELINE_MIN_CHUNK))
        return [len(part) for part in np.array_split(np.arange(samples), count)]

    def _call_module(self, batch: np.ndarray, module: tuple[Callable, list],
                     chunks: list[int] | None = None) -> tuple[np.ndarray, Timing]:
        """One call of the module, in `chunks` (by default :meth:`_chunks`): while the device computes chunk k - 1,
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

        for index, size in enumerate(chunks or self.chunks(len(batch))):
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
            self._warm_calls.add((id(main), size))
            compute += lap()
        self._dev.sync(self._stream)
        compute += lap()
        outputs.append(in_flight.numpy())
        copy_out += lap()
        host = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        return host, Timing(copy_in, compute, copy_out)

    def _call_named(self, batch: np.ndarray, module: tuple[Callable, list]) -> tuple[np.ndarray, Timing]:
        """One call of the module on a batch of named inputs, each uploaded as a tensor of its own: the staged,
        pipelined copies of :meth:`_call_module` are those of one input (a BERT's token ids are small beside an
        image batch, and it computes long on them)."""
        main, weights = module
        start = time.perf_counter()
        inputs = [tvm.runtime.tensor(array, self._dev) for array in self.network.input_arrays(batch).values()]
        uploaded = time.perf_counter()
        with tvm_ffi.use_raw_stream(self._dev, self._stream) if self._stream else contextlib.nullcontext():
            result = main(*inputs, *weights)
        self._dev.sync(self._stream)
        computed = time.perf_counter()
        outputs = [result.numpy()] if hasattr(result, "numpy") else [output.numpy() for output in result]
        return self.network.gathered(outputs), Timing(uploaded - start, computed - uploaded, time.perf_counter() - computed)

    def _launch(self, main: Callable, inputs: tvm.runtime.Tensor, weights: list) -> tvm.runtime.Tensor:
        """Queue the module's kernels, on the engine's compute stream where it has one."""
        if self._stream is None:
            return main(inputs, *weights)
        with tvm_ffi.use_raw_stream(self._dev, self._stream):
            return main(inputs, *weights)

    def prepare(self, samples: int, limit: int | None = None) -> None:
        """Before a timed run of a share of `samples` in calls of at most `limit`: the input buffers, and
        each module call of a size this engine has not run yet run once, so that first-use work is not
        charged to the run. A fresh process pays it on every new size: kernels loading (a second GPU whose
        profile was measured on its twin took 172 ms for a 15-sample share predicted at 6 ms while NVIDIA's
        OpenCL driver built its programs), the VM allocating the size's intermediate buffers, the first
        touch of fresh host memory. A failure here is left for the run itself to meet and report."""
        if self.network.inputs:  # no staging buffers: each call size runs once, as any engine's
            super().prepare(samples, limit)
            return
        try:
            chunks = {(id(module[0]), chunk): module for size in sorted(self.call_sizes(samples, limit))
                      for _, call, module in self._plan_calls(size) for chunk in self.chunks(call)}
            for buffer in [self._staging, *(self._on_device or [])]:
                buffer.view(max(chunk for _, chunk in chunks))
            for (main, chunk), module in chunks.items():
                if (main, chunk) not in self._warm_calls:  # the whole path: staging, copy threads, upload, read-back
                    self._call_module(np.zeros((chunk, *self.network.input_shape), self.network.dtype), module, [chunk])
        except Exception:  # noqa: BLE001 -- the run retries on this device and re-plans if it fails again
            log.debug("preparing %s failed", self.device.name, exc_info=True)

    def close(self) -> None:
        super().close()
        if isinstance(self._copy, ParallelCopy):
            self._copy.shutdown()
        if self._stream is not None:
            self._dev.free_raw_stream(self._stream)
            self._stream = None


