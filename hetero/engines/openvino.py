"""OpenVINO's engine: the network's ONNX form compiled by OpenVINO for the CPU or, through its GPU
plugin, for an Intel GPU (which gives `igpu` a path that needs no OpenCL build of TVM).

It computes in float32 as the other CPU engines do: OpenVINO's CPU plugin would otherwise pick
bfloat16 on processors that have it. One synchronous request takes a whole call, so the latency hint
(one stream, every core on it) is the one that fits.
"""

from __future__ import annotations

import time

import numpy as np
import openvino

from ..devices import Device
from ..models import Network
from . import engine_version
from . import openvino_plugin as _plugin  # hetero's devices and OpenVINO's plugins
from .base import Engine, Timing, cpu_threads


class OpenVINOEngine(Engine):
    name = "openvino"
    package = "openvino"

    def __init__(self, network: Network, device: Device):
        super().__init__(network, device)
        core = openvino.Core()
        model = core.read_model(model=network.onnx_bytes())
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if device.kind == "cpu":
            config["INFERENCE_NUM_THREADS"] = cpu_threads(device)
        self._compiled = core.compile_model(model, _plugin(device), config)
        self._request = self._compiled.create_infer_request()

    @classmethod
    def unsupported(cls, network: Network, device: Device) -> str | None:
        plugin = _plugin(device)
        if not plugin or plugin not in openvino.Core().available_devices:
            return f"OpenVINO has no plugin for {device.name} here"
        return network.why_no_form("onnx")

    @property
    def version(self) -> str:
        return engine_version(self.name, self.device)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, Timing]:
        start = time.perf_counter()
        if self.network.inputs:
            self._request.infer(self.network.input_arrays(batch))
            outputs = [self._request.get_output_tensor(i).data.copy() for i in range(len(self._compiled.outputs))]
            return self.network.gathered(outputs), Timing(0.0, time.perf_counter() - start, 0.0)
        self._request.infer({0: np.ascontiguousarray(batch, dtype=self.network.dtype)})
        outputs = self._request.get_output_tensor(0).data.copy()  # the request reuses its buffer
        return outputs, Timing(0.0, time.perf_counter() - start, 0.0)
