"""ONNX Runtime's engine: the network's ONNX form in an InferenceSession, with ONNX Runtime's default
graph optimisations, on the CPU (its thread pool sized like the other CPU engines) or, where
onnxruntime-gpu is installed, on a CUDA GPU through its CUDA execution provider."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime

from ..devices import Device
from ..models import Network
from . import ONNXRUNTIME_PROVIDERS as _PROVIDERS  # what each device kind runs on
from . import engine_version
from .base import Engine, EngineUnavailableError, Timing, cpu_threads

# the arithmetic each provider computes in per precision
_CUDA_TF32 = {"fp32": 0, "tf32": 1}  # its CUDA provider takes a float32 model only: no fp16


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"
    package = "onnxruntime"

    def __init__(self, network: Network, device: Device):
        super().__init__(network, device)
        options = onnxruntime.SessionOptions()
        if device.kind == "cpu":
            options.intra_op_num_threads = cpu_threads(device)
            providers = [_PROVIDERS["cpu"]]
        else:
            providers = [(_PROVIDERS["cuda"], {"device_id": device.index, "use_tf32": _CUDA_TF32[device.precision]})]
        model = network.onnx_bytes()
        self._session = onnxruntime.InferenceSession(model, options, providers=providers)
        if self._session.get_providers()[0] != _PROVIDERS[device.kind]:  # its profiles' key names the one asked for
            raise EngineUnavailableError(f"ONNX Runtime fell back to {self._session.get_providers()[0]} on {device.name}")
        self._input = self._session.get_inputs()[0].name

    @classmethod
    def unsupported(cls, network: Network, device: Device) -> str | None:
        provider = _PROVIDERS.get(device.kind)
        if provider is None or provider not in onnxruntime.get_available_providers():
            return f"this onnxruntime has no execution provider for {device.kind} devices"
        if device.kind == "cuda" and device.precision not in _CUDA_TF32:
            return f"its CUDA provider runs float32 models only, not {device.precision}"
        return network.why_no_form("onnx")

    @property
    def version(self) -> str:
        return engine_version(self.name, self.device)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        start = time.perf_counter()
        if self.network.inputs:
            outputs = self._session.run(None, self.network.input_arrays(batch))
            return self.network.gathered(outputs), Timing(0.0, time.perf_counter() - start, 0.0)
        inputs = np.ascontiguousarray(batch, dtype=self.network.dtype)
        (outputs,) = self._session.run(None, {self._input: inputs})
        return outputs, Timing(0.0, time.perf_counter() - start, 0.0)
