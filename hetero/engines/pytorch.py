"""PyTorch's engines, configured as PyTorch's own inference guides start: the module in eval mode under
``torch.inference_mode``, channels_last memory format, ``cudnn.benchmark`` on (cuDNN times its
convolution algorithms per shape and keeps the fastest), inputs staged in pinned memory; and the same
module through ``torch.compile`` (inductor, default mode) as a second engine.

On a CUDA GPU several calls are in flight at once (:class:`CudaPipeline`): while the GPU computes one,
the host's copy threads stage the next in page-locked memory and the copy engine uploads it.
"""

from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..devices import Device
from ..models import Network
from . import engine_version
from .base import Engine, ParallelCopy, Timing, copy_threads, cpu_threads, wait_all

_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16}
SLOTS = 4  # calls in flight on a GPU: one staging on the host, one uploading, one computing, one spare
PAGE = mmap.PAGESIZE
MIN_REGISTERED_BYTES = 4 << 20  # a smaller chunk is copied: registering costs more than copying it


def _staging() -> str:
    """How a GPU's inputs reach it: "copy" (copied into page-locked memory as float32), "half" (copied as
    float16, where the module computes in float16: half the bytes to upload) or "register" (uploaded from
    the caller's own pages, locked in place by cudaHostRegister). $HETERO_STAGING chooses, to measure them."""
    return os.environ.get("HETERO_STAGING", "copy")


class _Slot:
    """One call's buffers on a GPU: its inputs in page-locked host memory and on the device, its outputs
    back in page-locked memory; grown to the largest call and reused, so a call allocates nothing."""

    def __init__(self, device: torch.device, sample_shape: tuple[int, ...], output_shape: tuple[int, ...],
                 staged_dtype: torch.dtype):
        self._device, self._sample_shape, self._output_shape = device, sample_shape, output_shape
        self._staged_dtype = staged_dtype
        self.capacity = 0
        self.launched: Future | None = None  # the last call's GPU work queued
        self.registered: list[int] = []  # the caller's pages locked in place for the last call
        self.source: np.ndarray | None = None  # the caller's chunk they hold
        self.pieces: list[tuple[int, int, bool]] = []  # its upload: (first byte, end byte, from the caller's pages)
        self.done = torch.cuda.Event(enable_timing=True)  # recorded after the last call's outputs are back on the host

    def reserve(self, samples: int) -> None:
        if samples <= self.capacity:
            return
        self.done.synchronize()
        self.host_in = torch.empty((samples, *self._sample_shape), dtype=self._staged_dtype, pin_memory=True)
        self.host_in_array = self.host_in.numpy()
        self.device_in = torch.empty_like(self.host_in, device=self._device)
        self.host_out = torch.empty((samples, *self._output_shape), dtype=torch.float32, pin_memory=True)
        self.host_out_array = self.host_out.numpy()
        self.capacity = samples

    def release(self) -> None:
        """Unlock the caller's pages once the call that uploaded them is done."""
        for pointer in self.registered:
            torch.cuda.cudart().cudaHostUnregister(pointer)
        self.registered, self.source = [], None


@dataclass
class CallTrace:
    """When one pipelined call reached each stage: host milliseconds since the trace began (launched, its
    inputs staged, its GPU work queued) and its events (upload start and end, computation start and end,
    download end), read against the trace's origin event."""

    launched_ms: float
    staged_ms: float = 0.0
    queued_ms: float = 0.0
    marks: list[torch.cuda.Event] = field(default_factory=list)


def locked_pieces(start: int, nbytes: int, parts: int, page: int = PAGE
                  ) -> tuple[list[tuple[int, int]], list[tuple[int, int, bool]]]:
    """A chunk of `nbytes` at address `start`, uploaded from the caller's pages locked in place: the address
    ranges to lock (its whole pages, in `parts`) and its upload's byte ranges (first, end, whether from the
    locked pages). The partial pages at either end come from staging: a neighbouring chunk may hold them."""
    first_page, end_page = -(-start // page), (start + nbytes) // page
    bounds = [int(b) * page for b in np.linspace(first_page, end_page, parts + 1, dtype=np.int64)]
    head, tail = bounds[0] - start, bounds[-1] - start
    return list(zip(bounds, bounds[1:])), [(0, head, False), (head, tail, True), (tail, nbytes, False)]


def _register(pointer: int, nbytes: int) -> int | None:
    """Lock `nbytes` of host memory at `pointer` (whole pages) for the GPU's DMA; its pointer, or None."""
    return pointer if int(torch.cuda.cudart().cudaHostRegister(pointer, nbytes, 0)) == 0 else None


class _PipelinedCall:
    def __init__(self, slot: _Slot, samples: int, launched: Future):
        self._slot, self._samples, self._launched = slot, samples, launched

    def result(self) -> tuple[np.ndarray, Timing]:
        """The outputs, and the GPU's own seconds uploading, computing and downloading them."""
        marks = self._launched.result()
        self._slot.done.synchronize()
        self._slot.release()
        upload, compute, download = (marks[i].elapsed_time(marks[j]) / 1e3 for i, j in ((0, 1), (2, 3), (3, 4)))
        return self._slot.host_out_array[: self._samples], Timing(upload, compute, download)


class CudaPipeline:
    """A GPU's calls, overlapped: each call's inputs are copied by the copy threads into a free slot's
    page-locked buffer, uploaded on a copy stream, converted to the module's precision and memory format
    on the GPU and computed on a compute stream, and their outputs downloaded, while the calls launched
    before and after it are at other stages. One launcher thread queues the GPU work of each call in
    launch order as soon as its inputs are staged."""

    def __init__(self, device: torch.device, dtype: torch.dtype, module: torch.nn.Module,
                 sample_shape: tuple[int, ...], output_shape: tuple[int, ...], name: str):
        self._device, self._dtype, self._module = device, dtype, module
        staging = _staging()
        self._in_place = staging == "register"
        staged_dtype = torch.float16 if staging == "half" and dtype == torch.float16 else torch.float32
        self._slots = [_Slot(device, sample_shape, output_shape, staged_dtype) for _ in range(SLOTS)]
        self._turn = 0
        self._sizes: frozenset[int] = frozenset()  # the call sizes that have run
        self._copy = ParallelCopy(copy_threads(), f"{name}-copy")
        self._launcher = ThreadPoolExecutor(1, f"{name}-launch")
        self._upload = torch.cuda.Stream(device)
        self._compute = torch.cuda.Stream(device)
        self.trace: list[CallTrace] | None = None  # kept from start_trace() on
        self._origin_s, self._origin = 0.0, torch.cuda.Event(enable_timing=True)  # the trace's start, host and GPU

    def start_trace(self) -> None:
        """Keep a CallTrace of every later call (where a stream's time goes: benchmarks/feed_profile.py)."""
        torch.cuda.synchronize(self._device)
        self._origin.record(self._upload)
        self._origin.synchronize()  # the GPU is idle: the event's time is the host's now
        self._origin_s = time.perf_counter()
        self.trace = []

    def gpu_ms(self, event: torch.cuda.Event) -> float:
        """A traced call's event, in milliseconds since the trace began (the host's clock as far as known)."""
        return self._origin.elapsed_time(event)

    def _host_ms(self) -> float:
        return (time.perf_counter() - self._origin_s) * 1e3

    def launch(self, batch: np.ndarray) -> _PipelinedCall:
        slot = self._slots[self._turn]
        self._turn = (self._turn + 1) % len(self._slots)
        if slot.launched is not None:  # the call that used this slot before is finished
            slot.launched.result()
            slot.done.synchronize()
            slot.release()
        # A size this pipeline has not run costs cuDNN's autotuning of every convolution (and may cost a
        # compile): a smaller call runs as the next size that has run, the rows past its own ignored.
        computed = min((size for size in self._sizes if size >= len(batch)), default=len(batch))
        slot.reserve(computed)
        trace = CallTrace(self._host_ms()) if self.trace is not None else None
        copies = self._register(slot, batch) if self._in_place else None
        if copies is None:
            copies = self._copy.start(slot.host_in_array[: len(batch)], batch)
        slot.launched = self._launcher.submit(self._queue, slot, len(batch), computed, copies, trace)
        return _PipelinedCall(slot, len(batch), slot.launched)

    def _register(self, slot: _Slot, batch: np.ndarray) -> list[Future] | None:
        """Lock the whole pages inside `batch` in place, in parts on the copy threads, and copy its partial
        first and last pages into the slot's page-locked buffer (a neighbouring chunk may hold those pages
        locked); None where the chunk cannot be uploaded in place."""
        if not (batch.flags.c_contiguous and batch.flags.writeable and batch.dtype == np.float32
                and batch.nbytes >= MIN_REGISTERED_BYTES):
            return None
        ranges, slot.pieces = locked_pieces(batch.ctypes.data, batch.nbytes, self._copy.threads)
        parts = [self._copy.submit(_register, first, end - first) for first, end in ranges]
        flat, staged = batch.reshape(-1).view(np.uint8), slot.host_in_array.reshape(-1).view(np.uint8)
        for first, end, in_place in slot.pieces:
            if not in_place:
                staged[first:end] = flat[first:end]
        slot.source = batch
        slot.registered = [pointer for pointer in (part.result() for part in parts) if pointer is not None]
        if len(slot.registered) < len(parts):  # memory the driver cannot lock: copied instead
            slot.release()
            return None
        return []

    def _queue(self, slot: _Slot, samples: int, computed: int, copies: list[Future],
               trace: CallTrace | None) -> list[torch.cuda.Event]:
        """On the launcher thread: once the inputs are staged, queue the call's GPU work. Returns the events
        that mark the start and end of its upload, the start and end of its computation, and the end of its
        download (which starts as the computation ends)."""
        wait_all(copies)
        staged_ms = self._host_ms() if trace is not None else 0.0
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)] + [slot.done]
        with torch.inference_mode():
            with torch.cuda.stream(self._upload):
                marks[0].record(self._upload)
                if slot.source is None:
                    slot.device_in[:samples].copy_(slot.host_in[:samples], non_blocking=True)
                else:  # from the caller's pages locked in place, the partial pages at either end from staging
                    device, staged = slot.device_in.view(-1).view(torch.uint8), slot.host_in.view(-1).view(torch.uint8)
                    caller = torch.from_numpy(slot.source.reshape(-1).view(np.uint8))
                    for first, last, in_place in slot.pieces:
                        if last > first:
                            device[first:last].copy_((caller if in_place else staged)[first:last], non_blocking=True)
                marks[1].record(self._upload)
            with torch.cuda.stream(self._compute):
                self._compute.wait_event(marks[1])
                marks[2].record(self._compute)
                inputs = slot.device_in[:computed].to(self._dtype).contiguous(memory_format=torch.channels_last)
                outputs = self._module(inputs)[:samples]
                marks[3].record(self._compute)
                slot.host_out[:samples].copy_(outputs.to(torch.float32), non_blocking=True)
                slot.done.record(self._compute)
        self._sizes = self._sizes | {computed}  # a new set: launch() reads the old one on another thread
        if trace is not None and self.trace is not None:
            trace.staged_ms, trace.queued_ms, trace.marks = staged_ms, self._host_ms(), marks
            self.trace.append(trace)
        return marks

    def close(self) -> None:
        self._launcher.shutdown()
        for slot in self._slots:
            if slot.launched is not None:
                slot.done.synchronize()
            slot.release()
        self._copy.shutdown()


class TorchEngine(Engine):
    name = "torch"
    package = "torch"

    def __init__(self, network: Network, device: Device):
        super().__init__(network, device)
        self._device = torch.device("cuda", device.index) if device.kind == "cuda" else torch.device("cpu")
        self._dtype = _DTYPES[device.precision]
        module = network.torch_module().eval()
        module = module.to(self._device, dtype=self._dtype, memory_format=torch.channels_last)
        self._module = self.wrap(module)
        self.pipeline = CudaPipeline(self._device, self._dtype, self._module, tuple(network.input_shape),
                                      tuple(network.output_shape), f"hetero-{device.name}-{self.name}"
                                      ) if device.kind == "cuda" else None
        self.in_flight = SLOTS if self.pipeline else 1

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """What runs the module: itself here, its compiled form in TorchCompileEngine."""
        return module

    @classmethod
    def unsupported(cls, network: Network, device: Device) -> str | None:
        if device.kind not in ("cpu", "cuda"):
            return f"PyTorch runs on CPUs and CUDA GPUs, not {device.kind} devices"
        if device.kind == "cuda" and not torch.cuda.is_available():
            return "this PyTorch has no CUDA"
        return network.why_no_form("torch")

    @property
    def version(self) -> str:
        return engine_version(self.name, self.device)  # torch-compile's too: its own entry adds "inductor"

    def on_worker_start(self) -> None:
        """PyTorch's settings are the process's: the CPU's threads, cuDNN's autotuning, and TF32 exactly
        where the device's precision asks for it."""
        if self.device.kind == "cpu":
            torch.set_num_threads(cpu_threads(self.device))
        torch.backends.cudnn.benchmark = True
        tf32 = self.device.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32

    def launch(self, batch: np.ndarray):
        if self.pipeline is None:
            return super().launch(batch)
        self._warm.add(len(batch))
        return self.pipeline.launch(batch)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        if self.pipeline is not None:
            outputs, timing = self.pipeline.launch(batch).result()
            return outputs.copy(), timing  # the slot's buffer is reused by a later call
        with torch.inference_mode():
            start = time.perf_counter()
            inputs = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            inputs = inputs.to(self._dtype).contiguous(memory_format=torch.channels_last)
            copied = time.perf_counter()
            outputs = self._module(inputs)
            computed = time.perf_counter()
            host = outputs.float().numpy()
        return host, Timing(copied - start, computed - copied, time.perf_counter() - computed)

    def plain_loop(self, inputs: np.ndarray, batch: int) -> np.ndarray:
        """On a GPU, as PyTorch's guides run a host array: one page-locked staging tensor, a non-blocking
        upload, the module in its precision and channels_last, each batch's outputs back to the host."""
        if self.pipeline is None:
            return super().plain_loop(inputs, batch)
        staging = torch.empty((batch, *self.network.input_shape), dtype=torch.float32, pin_memory=True)
        outputs = np.empty((len(inputs), *self.network.output_shape), np.float32)
        with torch.inference_mode():
            for first in range(0, len(inputs), batch):
                part = staging[: min(batch, len(inputs) - first)]
                part.copy_(torch.from_numpy(inputs[first : first + batch]))
                uploaded = part.to(self._device, non_blocking=True)
                result = self._module(uploaded.to(self._dtype).contiguous(memory_format=torch.channels_last))
                outputs[first : first + len(part)] = result.float().cpu().numpy()
        return outputs

    def resident_throughput(self, batch: int, seconds: float = 2.0) -> float | None:
        if self.pipeline is None:
            return None
        shape = (batch, *self.network.input_shape)
        with torch.inference_mode():
            inputs = torch.randn(shape, device=self._device).to(self._dtype).contiguous(memory_format=torch.channels_last)
            self._module(inputs)
            torch.cuda.synchronize(self._device)
            calls, begun = 0, time.perf_counter()
            while time.perf_counter() - begun < seconds:
                for _ in range(10):
                    self._module(inputs)
                torch.cuda.synchronize(self._device)
                calls += 10
            return calls * batch / (time.perf_counter() - begun)

    def close(self) -> None:
        super().close()
        if self.pipeline is not None:
            self.pipeline.close()


class TorchCompileEngine(TorchEngine):
    """The module compiled by ``torch.compile`` (inductor, default mode). It compiles on its first calls
    (a new graph when a second batch size shows the batch dimension is dynamic): the profiler's warm-up
    calls and the engines' preparation keep that out of what is timed."""

    name = "torch-compile"

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return torch.compile(module)
