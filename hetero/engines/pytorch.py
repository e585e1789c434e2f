"""PyTorch's engines, configured as PyTorch's own inference guides start: the module in eval mode under
``torch.inference_mode``, channels_last memory format, ``cudnn.benchmark`` on (cuDNN times its
convolution algorithms per shape and keeps the fastest), inputs staged in pinned memory; and the same
module through ``torch.compile`` (inductor, default mode) as a second engine."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..devices import Device
from ..models import Network
from .base import Engine, Timing, cpu_threads

_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16}


class TorchEngine(Engine):
    name = "torch"
    package = "torch"

    def __init__(self, network: Network, device: Device):
        super().__init__(network, device)
        start = time.perf_counter()
        self._device = torch.device("cuda", device.index) if device.kind == "cuda" else torch.device("cpu")
        self._dtype = _DTYPES[device.precision]
        module = network.torch_module().eval()
        module = module.to(self._device, dtype=self._dtype, memory_format=torch.channels_last)
        self._module = self.wrap(module)
        self._pinned: torch.Tensor | None = None  # host staging of a GPU's inputs, grown as needed
        self.load_s = time.perf_counter() - start

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
        return f"{torch.__version__} channels_last cudnn.benchmark"

    def on_worker_start(self) -> None:
        """PyTorch's settings are the process's: the CPU's threads, cuDNN's autotuning, and TF32 exactly
        where the device's precision asks for it."""
        if self.device.kind == "cpu":
            torch.set_num_threads(cpu_threads(self.device))
        torch.backends.cudnn.benchmark = True
        tf32 = self.device.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32

    def _to_device(self, batch: np.ndarray) -> torch.Tensor:
        inputs = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self._device.type == "cuda":
            if self._pinned is None or len(self._pinned) < len(inputs):
                self._pinned = torch.empty(inputs.shape, dtype=inputs.dtype, pin_memory=True)
            staged = self._pinned[: len(inputs)]
            staged.copy_(inputs)
            inputs = staged.to(self._device, non_blocking=True)
        return inputs.to(self._dtype).contiguous(memory_format=torch.channels_last)

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        with torch.inference_mode():
            start = time.perf_counter()
            inputs = self._to_device(batch)
            self._sync()
            copied = time.perf_counter()
            outputs = self._module(inputs)
            self._sync()
            computed = time.perf_counter()
            host = outputs.float().cpu().numpy()
        return host, Timing(copied - start, computed - copied, time.perf_counter() - computed)


class TorchCompileEngine(TorchEngine):
    """The module compiled by ``torch.compile`` (inductor, default mode). It compiles on its first calls
    (a new graph when a second batch size shows the batch dimension is dynamic): the profiler's warm-up
    calls and the engines' preparation keep that out of what is timed."""

    name = "torch-compile"

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return torch.compile(module)

    @property
    def version(self) -> str:
        return f"{super().version} inductor"
