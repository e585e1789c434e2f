"""PyTorch's engines, configured as PyTorch's own inference guides start: the module in eval mode under
``torch.inference_mode``, channels_last memory format, ``cudnn.benchmark`` on (cuDNN times its
convolution algorithms per shape and keeps the fastest), inputs staged in pinned memory; and the same
module through ``torch.compile`` (inductor, default mode) as a second engine.

On a CUDA GPU several calls are in flight at once (:class:`CudaPipeline`): while the GPU computes one,
the host's copy threads stage the next in page-locked memory and the copy engine uploads it.

A network of several named inputs (a BERT's input_ids and attention_mask) is called ``module(*tensors)``, one
tensor per input in ``Network.inputs`` order; its batch, an array of records on the host, travels to a GPU as
rows of raw bytes (:class:`SampleLayout`), each input a view of them there.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
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


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """PyTorch's dtype of a numpy dtype."""
    return torch.from_numpy(np.empty(0, dtype)).dtype


class SampleLayout:
    """Where each tensor of one sample lies in its bytes, as the host holds a batch: an array of records of
    named tensors (`dtype` a record, `shape` ()), or of one tensor (`dtype` its element, `shape` a sample's).
    A batch is staged, uploaded and downloaded as rows of raw bytes, one copy each way, and each tensor is
    taken from those rows on the device: no copy on the host splits or gathers named tensors."""

    def __init__(self, dtype: np.dtype, shape: tuple[int, ...] = ()):
        self.dtype, self.shape = np.dtype(dtype), tuple(shape)
        self.nbytes = self.dtype.itemsize * int(np.prod(self.shape))
        fields = [self.dtype.fields[name] for name in self.dtype.names or ()]
        # each tensor: its first byte in a row, its bytes, its element type and one sample's shape
        self.fields = [(offset, kind.itemsize, torch_dtype(kind.base), kind.shape) for kind, offset, *_ in fields] \
            or [(0, self.nbytes, torch_dtype(self.dtype), self.shape)]

    def host(self, rows: torch.Tensor) -> np.ndarray:
        """Rows of bytes in host memory (uint8, one row per sample) as the batch array they hold."""
        return rows.numpy().view(self.dtype).reshape(len(rows), *self.shape)

    def tensors(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Rows of bytes (uint8, one row per sample, on any device) as one tensor per field: a view where the
        field is the whole row, else a copy of its bytes, which a record does not align for their type (a row
        of one sample is contiguous at any offset, but viewed as int64 only at a multiple of 8)."""
        tensors = []
        for offset, nbytes, dtype, shape in self.fields:
            field_bytes = rows if nbytes == self.nbytes else rows[:, offset : offset + nbytes].clone(
                memory_format=torch.contiguous_format)
            tensors.append(field_bytes.view(dtype).reshape(len(rows), *shape))
        return tensors

    def rows(self, tensors: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """One tensor per field, as rows of bytes: the only field's own bytes, or theirs written into `out`
        (uint8, one row per sample, on their device)."""
        if len(self.fields) == 1:
            return _as_bytes(tensors[0].to(self.fields[0][2]))
        for (offset, nbytes, dtype, _), tensor in zip(self.fields, tensors, strict=True):
            out[:, offset : offset + nbytes].copy_(_as_bytes(tensor.to(dtype)))
        return out


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A batch tensor's bytes, one row per sample."""
    return tensor.contiguous().reshape(len(tensor), -1).view(torch.uint8)


def input_layout(network: Network, staged: type = np.float32) -> SampleLayout:
    """How a batch of `network`'s inputs is staged: its records of named inputs as they are, or its one
    input as `staged`."""
    return SampleLayout(network.input_dtype) if network.inputs else SampleLayout(staged, network.input_shape)


def output_layout(network: Network) -> SampleLayout:
    """How a batch of `network`'s outputs comes back: records of named outputs, or the one output."""
    return SampleLayout(network.output_dtype, network.output_shape)


def host_tensor(array: np.ndarray) -> torch.Tensor:
    """`array` as a tensor sharing its memory. A read-only array (a memory-mapped .npy, a caller's frozen batch)
    is shared too, without PyTorch's warning that writing to it is undefined: the engine only reads its inputs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.from_numpy(array)


def module_input(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One input as the module takes it: a floating one in the module's precision (integers, such as token
    ids and attention masks, stay integers), a batch of images channels_last."""
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor


def module_outputs(result: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """What the module returned: one tensor, or a tuple in the order of the network's outputs."""
    return (result,) if isinstance(result, torch.Tensor) else tuple(result)


def host_array(tensor: torch.Tensor) -> np.ndarray:
    """An output in host memory, a floating one as float32 (the network's outputs' dtype in every precision)."""
    return (tensor.float() if tensor.is_floating_point() else tensor).cpu().numpy()


def _staging() -> str:
    """How a GPU's inputs reach it: "copy" (copied into page-locked memory as float32) or "half" (copied as
    float16, where the module computes in float16: half the bytes to upload). $HETERO_STAGING chooses, to
    measure them. Named inputs are staged as their records are ("half" leaves them so: a BERT's token ids are
    few bytes)."""
    return os.environ.get("HETERO_STAGING", "copy")


class _Slot:
    """One call's buffers on a GPU: its inputs in page-locked host memory and on the device, its outputs
    on the device and back in page-locked memory, each as rows of bytes (:class:`SampleLayout`); grown to
    the largest call and reused, so a call allocates nothing."""

    def __init__(self, device: torch.device, inputs: SampleLayout, outputs: SampleLayout):
        self._device, self._inputs, self._outputs = device, inputs, outputs
        self.capacity = 0
        self.launched: Future | None = None  # the last call's GPU work queued
        self.done = torch.cuda.Event(enable_timing=True)  # recorded after the last call's outputs are back on the host

    def reserve(self, samples: int) -> None:
        if samples <= self.capacity:
            return
        self.done.synchronize()
        self.host_in = torch.empty((samples, self._inputs.nbytes), dtype=torch.uint8, pin_memory=True)
        self.host_in_array = self._inputs.host(self.host_in)
        # zeros: a call computed at a larger size than its own reads rows no call wrote, which must be inputs
        # the module takes (token ids in its vocabulary), as zeros and earlier calls' inputs are
        self.device_in = torch.zeros_like(self.host_in, device=self._device)
        self.device_out = torch.empty((samples, self._outputs.nbytes), dtype=torch.uint8, device=self._device)
        self.host_out = torch.empty((samples, self._outputs.nbytes), dtype=torch.uint8, pin_memory=True)
        self.host_out_array = self._outputs.host(self.host_out)
        self.capacity = samples


@dataclass
class CallTrace:
    """When one pipelined call reached each stage: host milliseconds since the trace began (launched, its
    inputs staged, its GPU work queued) and its events (upload start and end, computation start and end,
    download end), read against the trace's origin event."""

    launched_ms: float
    staged_ms: float = 0.0
    queued_ms: float = 0.0
    marks: list[torch.cuda.Event] = field(default_factory=list)


class _PipelinedCall:
    def __init__(self, slot: _Slot, samples: int, launched: Future):
        self._slot, self._samples, self._launched = slot, samples, launched

    def result(self) -> tuple[np.ndarray, Timing]:
        """The outputs, and the GPU's own seconds uploading, computing and downloading them."""
        marks = self._launched.result()
        self._slot.done.synchronize()
        upload, compute, download = (marks[i].elapsed_time(marks[j]) / 1e3 for i, j in ((0, 1), (2, 3), (3, 4)))
        return self._slot.host_out_array[: self._samples], Timing(upload, compute, download)


class CudaPipeline:
    """A GPU's calls, overlapped: each call's inputs are copied by the copy threads into a free slot's
    page-locked buffer, uploaded on a copy stream, converted to the module's precision and memory format
    on the GPU and computed on a compute stream, and their outputs downloaded, while the calls launched
    before and after it are at other stages. One launcher thread queues the GPU work of each call in
    launch order as soon as its inputs are staged."""

    def __init__(self, device: torch.device, dtype: torch.dtype, module: torch.nn.Module, network: Network, name: str):
        self._device, self._dtype, self._module = device, dtype, module
        staged = np.float16 if _staging() == "half" and dtype == torch.float16 else np.float32
        self._inputs, self._outputs = input_layout(network, staged), output_layout(network)
        self._slots = [_Slot(device, self._inputs, self._outputs) for _ in range(SLOTS)]
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
        # A size this pipeline has not run costs cuDNN's autotuning of every convolution (and may cost a
        # compile): a smaller call runs as the next size that has run, the rows past its own ignored.
        computed = min((size for size in self._sizes if size >= len(batch)), default=len(batch))
        slot.reserve(computed)
        trace = CallTrace(self._host_ms()) if self.trace is not None else None
        copies = self._copy.start(slot.host_in_array[: len(batch)], batch)
        slot.launched = self._launcher.submit(self._queue, slot, len(batch), computed, copies, trace)
        return _PipelinedCall(slot, len(batch), slot.launched)

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
                slot.device_in[:samples].copy_(slot.host_in[:samples], non_blocking=True)
                marks[1].record(self._upload)
            with torch.cuda.stream(self._compute):
                self._compute.wait_event(marks[1])
                marks[2].record(self._compute)
                inputs = [module_input(tensor, self._dtype) for tensor in self._inputs.tensors(slot.device_in[:computed])]
                outputs = module_outputs(self._module(*inputs))
                marks[3].record(self._compute)
                rows = self._outputs.rows([output[:samples] for output in outputs], slot.device_out[:samples])
                slot.host_out[:samples].copy_(rows, non_blocking=True)
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
        self.pipeline = CudaPipeline(self._device, self._dtype, self._module, network,
                                     f"hetero-{device.name}-{self.name}") if device.kind == "cuda" else None
        self.in_flight = SLOTS if self.pipeline else 1

    def wrap(self, module: torch.nn.Module) -> Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]:
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
            inputs = [module_input(host_tensor(array), self._dtype) for array in self._host_inputs(batch)]
            copied = time.perf_counter()
            outputs = module_outputs(self._module(*inputs))
            computed = time.perf_counter()
            host = self.network.gathered([host_array(output) for output in outputs])
        return host, Timing(copied - start, computed - copied, time.perf_counter() - computed)

    def _host_inputs(self, batch: np.ndarray) -> list[np.ndarray]:
        """A batch as the module's inputs in host memory: each named input's array, or the one input as float32."""
        if self.network.inputs:
            return list(self.network.input_arrays(batch).values())
        return [np.ascontiguousarray(batch, dtype=np.float32)]

    def plain_loop(self, inputs: np.ndarray, batch: int) -> np.ndarray:
        """On a GPU, as PyTorch's guides run host arrays: a page-locked staging tensor per input, non-blocking
        uploads, the module in its precision (channels_last for images), each batch's outputs back to the host."""
        if self.pipeline is None:
            return super().plain_loop(inputs, batch)
        arrays = [inputs[t.name] for t in self.network.inputs] or [inputs]  # the records' fields, not copied
        staging = [torch.empty((batch, *array.shape[1:]), dtype=torch_dtype(array.dtype) if self.network.inputs
                               else torch.float32, pin_memory=True) for array in arrays]
        outputs = np.empty((len(inputs), *self.network.output_shape), self.network.output_dtype)
        with torch.inference_mode():
            for first in range(0, len(inputs), batch):
                count = min(batch, len(inputs) - first)
                uploaded = []
                for array, stage in zip(arrays, staging):
                    np.copyto(stage[:count].numpy(), array[first : first + count], casting="unsafe")
                    uploaded.append(module_input(stage[:count].to(self._device, non_blocking=True), self._dtype))
                result = module_outputs(self._module(*uploaded))
                outputs[first : first + count] = self.network.gathered([host_array(output) for output in result])
        return outputs

    def resident_throughput(self, batch: int, seconds: float = 2.0) -> float | None:
        if self.pipeline is None:
            return None
        with torch.inference_mode():
            inputs = [module_input(host_tensor(array).to(self._device), self._dtype)
                      for array in self._host_inputs(self.network.random_input(batch))]
            self._module(*inputs)
            torch.cuda.synchronize(self._device)
            calls, begun = 0, time.perf_counter()
            while time.perf_counter() - begun < seconds:
                for _ in range(10):
                    self._module(*inputs)
                torch.cuda.synchronize(self._device)
                calls += 10
            return calls * batch / (time.perf_counter() - begun)

    def close(self) -> None:
        super().close()
        if self.pipeline is not None:
            self.pipeline.close()


class TorchCompileEngine(TorchEngine):
    """The module compiled by ``torch.compile`` (inductor, default mode), its batch dimension marked dynamic
    from the first call: one graph serves every batch size of 2 and more, where unmarked a second size would
    compile a second graph (1 is always a graph of its own: PyTorch specializes sizes 0 and 1). It compiles
    on its first calls: the profiler's warm-up calls and the engines' preparation keep that out of what is
    timed."""

    name = "torch-compile"
    # Every network whose module shares one forward (each sequence length of a text model is a network of its
    # own) adds its graphs to that forward's cache in dynamo; past the limit (8) dynamo would run the module
    # eagerly, and its profiles would time eager PyTorch under this engine's name.
    RECOMPILE_LIMIT = 64

    def wrap(self, module: torch.nn.Module) -> Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, self.RECOMPILE_LIMIT)
        compiled = torch.compile(module)

        def call(*tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
            for tensor in tensors:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
            return compiled(*tensors)

        return call
