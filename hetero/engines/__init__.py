"""The engines hetero can run a network with, behind one interface (:class:`Engine`).

A literal registry, timm-style: each engine is imported only when it is used, so `import hetero`
loads neither PyTorch nor ONNX Runtime nor OpenVINO. TVM's engine is always installed; each other
engine is an optional extra (``pip install 'hetero[onnxruntime]'``).

What a run needs to find an engine's profiles in the table is known here without importing the engine:
its version (read from its package's metadata), the device kinds it runs on and the network form it
loads. So a run whose profiles are all in the table imports and loads only the engines its plan uses
(importing PyTorch and wrapping a module in torch.compile took 3.7 s on the 2-core machine).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..devices import Device
from ..models import Network
from .base import Call, Engine, EngineUnavailableError, Timing, copy_threads, profile_key

__all__ = ["ENGINES", "OWN_ENGINE", "Call", "Engine", "EngineUnavailableError", "Timing", "copy_threads", "engine_class",
           "engine_key", "engine_version", "installed_engines", "known_unsupported", "load_engine",
           "runnable_engines"]

# what ONNX Runtime runs each device kind on, and OpenVINO's plugin for each
ONNXRUNTIME_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_OPENVINO_PLUGINS = {"cpu": "CPU", "opencl": "GPU"}


def openvino_plugin(device: Device) -> str:
    """OpenVINO's name for `device` ("CPU", "GPU.1"), or "" where it has no plugin for its kind."""
    plugin = _OPENVINO_PLUGINS.get(device.kind, "")
    return f"{plugin}.{device.index}" if plugin == "GPU" and device.index else plugin


def _package_version(*distributions: str) -> str:
    """The installed version of the first of `distributions` that is installed (its metadata, not an import)."""
    for distribution in distributions:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _tvm_version(device: Device) -> str:
    from .tvm import VERSION  # TVM itself is imported with hetero

    return VERSION


def _onnxruntime_version(device: Device) -> str:
    package = _package_version("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")
    return f"{package} {ONNXRUNTIME_PROVIDERS.get(device.kind, 'none')}"


def _openvino_version(device: Device) -> str:
    return f"{_package_version('openvino')} {openvino_plugin(device)}"


def _torch_version(device: Device) -> str:
    return f"{_package_version('torch')} channels_last cudnn.benchmark"


def _torch_compile_version(device: Device) -> str:
    return f"{_torch_version(device)} inductor"


@dataclass(frozen=True)
class Entry:
    implementation: str  # "module:Class", imported on first use
    requires: str  # the top-level package it needs
    extra: str  # pip install 'hetero[<extra>]'
    # what, besides the device, decides its speed there (its profiles' key), known without importing it
    version: Callable[[Device], str] = _tvm_version
    kinds: tuple[str, ...] = ()  # the device kinds it can run on; () for every kind
    form: str | None = None  # the network form it loads (hetero.models), None for TVM's own module


ENGINES: dict[str, Entry] = {
    "tvm": Entry("hetero.engines.tvm:TVMEngine", "tvm", "tvm", _tvm_version),
    "onnxruntime": Entry("hetero.engines.onnxruntime:OnnxRuntimeEngine", "onnxruntime", "onnxruntime",
                         _onnxruntime_version, tuple(ONNXRUNTIME_PROVIDERS), "onnx"),
    "openvino": Entry("hetero.engines.openvino:OpenVINOEngine", "openvino", "openvino", _openvino_version,
                      tuple(_OPENVINO_PLUGINS), "onnx"),
    "torch": Entry("hetero.engines.pytorch:TorchEngine", "torch", "torch", _torch_version, ("cpu", "cuda"), "torch"),
    "torch-compile": Entry("hetero.engines.pytorch:TorchCompileEngine", "torch", "torch", _torch_compile_version,
                           ("cpu", "cuda"), "torch"),
}


OWN_ENGINE = "tvm"  # hetero's own compiler and schedules; every other engine is one users run without hetero


def engine_version(name: str, device: Device) -> str:
    """Engine `name`'s version and settings on `device`, as its profiles' key names them, without importing it."""
    return ENGINES[name].version(device)


def engine_key(name: str, device: Device) -> str:
    """The table key of engine `name`'s profiles on `device`, without importing the engine."""
    return profile_key(device, name, engine_version(name, device))


def known_unsupported(name: str, network: Network, device: Device) -> str | None:
    """Why engine `name` cannot run `network` on `device` as far as the registry knows without importing it (the
    device's kind, the network's forms), or None; the engine's own `unsupported` asks its package the rest."""
    entry = ENGINES[name]
    if entry.kinds and device.kind not in entry.kinds:
        return f"it runs on {' and '.join(entry.kinds)} devices, not {device.kind} ones"
    return network.why_no_form(entry.form) if entry.form else None


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
    return {name: known_unsupported(name, network, device) or engine_class(name).unsupported(network, device)
            for name in installed_engines()}


_engines: dict[tuple, Engine] = {}
_loading: dict[tuple, threading.Lock] = {}  # one per engine: different engines load at the same time
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
        loading = _loading.setdefault(key, threading.Lock())
    with loading:
        if key not in _engines:
            _engines[key] = cls.load(network, device, **options)
        return _engines[key]
