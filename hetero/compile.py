"""Compile a network for a device once, and keep the result on disk for later runs.

The batch dimension is symbolic, so one compiled module serves every share size: profiling twenty
batch sizes costs one compile per device, not twenty. Modules are keyed by the network's structure,
the full target (host included) and the TVM version.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm import relax

from .cache import cache_dir, code_digest
from .devices import Device
from .errors import HeteroError, one_line
from .models import Network
from .nan import propagate_nan
from .schedules import TRANSFORM_PARAMS
from .tune import Tuning, static_module

# hetero's own schedules (and the tensor intrinsics and kernels they use) decide what a compile produces and how
# fast it runs, so a digest of their code is part of the module cache key and of every profile's key.
_SCHEDULE_SOURCES = sorted([*Path(__file__).with_name("schedules").rglob("*.py"), Path(__file__).with_name("nan.py")])


BUILD_ID = code_digest(_SCHEDULE_SOURCES)


class CompileError(HeteroError):
    """TVM could not build a network for a device."""


@dataclass(frozen=True)
class Compiled:
    executable: tvm.runtime.Module
    path: Path
    seconds: float  # time spent building; 0 when it came from the cache
    cached: bool


def relax_pipeline(device: Device, tuning: Tuning | None = None) -> tvm.transform.Pass:
    """The device's schedules (below), then NaN made to propagate through every max and min."""
    return tvm.transform.Sequential([_scheduling_pipeline(device, tuning), propagate_nan])


def _scheduling_pipeline(device: Device, tuning: Tuning | None = None) -> tvm.transform.Pass:
    """hetero's own schedules where it has them (TVM's defaults leave CPU loops unscheduled and run
    convolutions on GPUs at a third of PyTorch's speed), TVM's default pipeline elsewhere; a tuning's
    records first where there are some."""
    kind = device.target.kind.name
    if kind == "llvm":
        from .schedules.cpu.pipeline import cpu_pipeline

        return cpu_pipeline(device.target, records=str(tuning.records) if tuning else None)
    if kind == "cuda":
        from .schedules.cuda.pipeline import gpu_pipeline

        return gpu_pipeline(device.target, device.precision, records=str(tuning.records) if tuning else None)
    return relax.get_default_pipeline(device.target)


def module_weights(vm: relax.VirtualMachine, weights: list) -> list:
    """The weights as `vm`'s main takes them.  A module computes its weights' layout changes and
    casts (CUDA: OHWI transposes, float16; CPU: conv weight packing) in its own
    `main_transform_params`, lifted out of main: once, here, rather than on every call."""
    if not vm.module.implements_function(TRANSFORM_PARAMS):
        return list(weights)
    return list(vm[TRANSFORM_PARAMS](weights))


def module_max_batch(vm: relax.VirtualMachine, device: Device) -> int | None:
    """The largest batch one call of `vm`'s main takes, or None for no limit: a CUDA module indexes
    in int32 up to a batch it records (hetero.schedules.cuda.indices.narrow_batch_indices)."""
    if device.target.kind.name != "cuda":
        return None
    from .schedules.cuda.indices import recorded_max_batch

    return recorded_max_batch(vm)


def tir_pipeline(device: Device) -> str:
    """The TIR lowering (``tir_pipeline`` of ``relax.build``) the kernels of :func:`relax_pipeline` need."""
    if device.target.kind.name == "cuda":
        from .schedules.cuda.pipeline import tir_pipeline as cuda_tir_pipeline

        return cuda_tir_pipeline(device.precision, device.target)
    return "default"


def module_key(network: Network, device: Device, tuning: Tuning | None = None) -> str:
    parts = [
        network.key,
        str(device.target),
        str(device.target.host),
        device.precision,
        tvm.__version__,
        BUILD_ID,
    ] + ([f"tuned at batch {tuning.batch}, records {tuning.digest()}"] if tuning else [])
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def compile_network(network: Network, device: Device, use_cache: bool = True, tuning: Tuning | None = None) -> Compiled:
    """Build (or load from the cache) the module that runs `network` on `device`: for every batch size,
    or, with a tuning, for exactly its batch with its records applied."""
    key = module_key(network, device, tuning)
    path = cache_dir() / f"{network.name}-{device.target.kind.name}-{device.precision}-{key}.so"
    if use_cache and path.exists():
        return Compiled(tvm.runtime.load_module(str(path)), path, 0.0, cached=True)
    start = time.perf_counter()
    try:
        module = static_module(network, tuning.batch) if tuning else network.module
        executable = relax.build(module, device.target, relax_pipeline=relax_pipeline(device, tuning),
                                 tir_pipeline=tir_pipeline(device))
    except Exception as exc:  # TVM raises many types; the user needs the first line only
        raise CompileError(f"compiling {network.name} for {device.name} failed: {one_line(exc)}") from exc
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        staged = Path(scratch) / path.name
        executable.export_library(str(staged))
        os.replace(staged, path)
    return Compiled(tvm.runtime.load_module(str(path)), path, seconds, cached=False)
