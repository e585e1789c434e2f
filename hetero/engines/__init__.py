"""The engines hetero can run a network with, behind one interface (:class:`Engine`).

A literal registry, timm-style: each engine is imported only when it is used, so `import hetero`
loads neither PyTorch nor ONNX Runtime nor OpenVINO. TVM's engine is always installed; each other
engine is an optional extra (``pip install 'hetero[onnxruntime]'``).
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from dataclasses import dataclass

from ..devices import Device
from ..models import Network
from .base import Engine, EngineUnavailableError, Timing, copy_threads

__all__ = ["ENGINES", "Engine", "EngineUnavailableError", "Timing", "copy_threads", "engine_class",
           "installed_engines", "load_engine", "runnable_engines"]


@dataclass(frozen=True)
class Entry:
    implementation: str  # "module:Class", imported on first use
    requires: str  # the top-level package it needs
    extra: str  # pip install 'hetero[<extra>]'


ENGINES: dict[str, Entry] = {
    "tvm": Entry("hetero.engines.tvm:TVMEngine", "tvm", "tvm"),
    "onnxruntime": Entry("hetero.engines.onnxruntime:OnnxRuntimeEngine", "onnxruntime", "onnxruntime"),
    "openvino": Entry("hetero.engines.openvino:OpenVINOEngine", "openvino", "openvino"),
    "torch": Entry("hetero.engines.pytorch:TorchEngine", "torch", "torch"),
    "torch-compile": Entry("hetero.engines.pytorch:TorchCompileEngine", "torch", "torch"),
}


def installed_engines() -> list[str]:
    """The engines whose package is installed here (looked up, not imported)."""
    return [name for name, entry in ENGINES.items() if importlib.util.find_spec(entry.requires) is not None]


def engine_class(name: str) -> type[Engine]:
    """The class of engine `name`; EngineUnavailableError, one line, when it is unknown or not installed."""
    if name not in ENGINES:
        raise EngineUnavailableError(f"unknown engine {name!r}; choose from: auto, {', '.join(ENGINES)}")
    entry = ENGINES[name]
    if importlib.util.find_spec(entry.requires) is None:
        raise EngineUnavailableError(f"engine {name} is not installed: pip install 'hetero[{entry.extra}]'")
    module, cls = entry.implementation.split(":")
    return getattr(importlib.import_module(module), cls)


def runnable_engines(network: Network, device: Device) -> dict[str, str | None]:
    """For each installed engine, why it cannot run `network` on `device`, or None where it can."""
    return {name: engine_class(name).unsupported(network, device) for name in installed_engines()}


_engines: dict[tuple, Engine] = {}
_engines_lock = threading.Lock()


def load_engine(network: Network, device: Device, engine: str = "tvm", **options) -> Engine:
    """The engine `engine` for (network, device), built or loaded once per process (`options` go to its
    load, e.g. a TVM tuning)."""
    cls = engine_class(engine)
    reason = cls.unsupported(network, device)
    if reason:
        raise EngineUnavailableError(f"engine {engine} cannot run {network.name} on {device.name}: {reason}")
    # an option with a digest (a tuning's records) is known by it, so new records make a new engine
    options_key = tuple(sorted((k, v.digest() if hasattr(v, "digest") else repr(v)) for k, v in options.items()))
    key = (engine, network.digest, device.name, device.key, options_key)
    with _engines_lock:
        if key not in _engines:
            _engines[key] = cls.load(network, device, **options)
        return _engines[key]
