"""Compute devices: parse the user's names (`cpu`, `igpu`, `gpu0`, ...) into one `Device` record.

Each kind of device has one small backend class that knows how to find its devices, build a TVM
target for them and tell whether TVM can run on them; nothing else in hetero branches on the kind.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
from dataclasses import dataclass, field
from functools import lru_cache

import tvm

from . import opencl
from .errors import HeteroError


class DeviceError(HeteroError):
    """A device name that is malformed, or names a device this machine does not have."""


@dataclass(frozen=True)
class Device:
    """One device as hetero uses it: the user's name for it, and everything TVM needs to run on it."""

    name: str  # the user's name: cpu, igpu, igpu1, gpu0, ...
    kind: str  # TVM device type name: cpu, opencl, cuda
    index: int  # TVM device index
    hardware: str  # what the hardware calls itself, e.g. "NVIDIA H100 80GB HBM3"
    target: tvm.target.Target = field(compare=False, hash=False)
    threads: int = 0  # CPU worker threads for this device's runs; 0 means TVM's default
    precision: str = "fp32"  # arithmetic of its compiled network: fp32, or tf32 / fp16 on CUDA GPUs
    details: str = field(default="", compare=False)  # what --list-devices adds, e.g. an OpenCL device's memory

    @property
    def key(self) -> str:
        """Identity under which profiles are stored: the same hardware, target, precision, thread count
        and TVM reuse them."""
        threads = f" | {self.threads} threads" if self.threads else ""
        return f"{self.hardware} | {self.target} | {self.precision}{threads} | tvm {tvm.__version__}"

    @property
    def host(self) -> bool:
        """Whether this is the host processor itself rather than an accelerator the host feeds."""
        return self.kind == "cpu"

    def tvm_device(self) -> tvm.runtime.Device:
        return tvm.device(self.kind, self.index)

    def describe(self) -> str:
        line = f"{self.name}: {self.hardware} ({self.target.kind.name})"
        return f"{line}; {self.details}" if self.details else line


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_target() -> tvm.target.Target:
    """LLVM target for this host; mtriple is explicit because the wheel's default triple rejects -mcpu."""
    return tvm.target.Target(
        {
            "kind": "llvm",
            "mtriple": f"{platform.machine()}-linux-gnu",
            "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
            "num-cores": os.cpu_count() or 1,
        }
    )


class CPUBackend:
    """The host processor, compiled with LLVM."""

    prefix = "cpu"

    @staticmethod
    def discover() -> list[Device]:
        return [Device("cpu", "cpu", 0, _cpu_model_name(), cpu_target())]


class CUDABackend:
    """NVIDIA GPUs, each compiled for its own architecture so mixed generations work in one run."""

    prefix = "gpu"

    @staticmethod
    def discover() -> list[Device]:
        found = []
        index = 0
        while tvm.cuda(index).exist:
            from .schedules.cuda.wgmma import with_wgmma

            dev = tvm.cuda(index)
            target = with_wgmma(tvm.target.Target(tvm.target.Target.from_device(dev), cpu_target()))
            found.append(Device(f"gpu{index}", "cuda", index, dev.device_name, target))
            index += 1
        return found


class OpenCLBackend:
    """Integrated GPUs, and any OpenCL device TVM runs on; found with pyopencl (see hetero.opencl)."""

    prefix = "igpu"
    runtime_available = staticmethod(opencl.runtime_available)

    @staticmethod
    def target(index: int, cl_device: opencl.CLDevice) -> tvm.target.Target:
        """What TVM detects on the device once its runtime is loaded; until then the same from pyopencl."""
        if opencl.runtime_available():
            device_target = tvm.target.Target.from_device(tvm.opencl(index))
        else:
            device_target = tvm.target.Target(cl_device.target_attrs())
        return tvm.target.Target(device_target, cpu_target())

    @classmethod
    def discover(cls) -> list[Device]:
        numbered = opencl.tvm_numbering(opencl.platform_devices())
        return [
            Device(
                name,
                "opencl",
                index,
                cl_device.hardware,
                cls.target(index, cl_device),
                details=f"{cl_device.summary()}, tvm.opencl({index})",
            )
            for name, index, cl_device in opencl.name_devices(numbered)
        ]

    @staticmethod
    def notes() -> list[str]:
        """Lines for --list-devices: OpenCL devices TVM cannot use, and a missing TVM OpenCL runtime."""
        devices = opencl.platform_devices()
        numbered = opencl.tvm_numbering(devices)
        lines = opencl.left_out(devices, numbered)
        lines += [
            f"note: {d.name} (tvm.opencl({index})) is listed by TVM's OpenCL runtime but not by pyopencl, whose "
            f"own OpenCL ICD loader reads another vendor list; hetero describes it as TVM does"
            for index, d in numbered
            if d.platform == opencl.TVM_ONLY_PLATFORM
        ]
        if devices and not opencl.runtime_available():
            lines.append(f"note: {OPENCL_RUNTIME_MISSING}")
        return lines


# Only read where the runtime is missing; describe() prints it under the device list.
OPENCL_RUNTIME_MISSING = "" if opencl.runtime_available() else opencl.runtime_missing()


BACKENDS = (CPUBackend, OpenCLBackend, CUDABackend)
_NAME = re.compile(r"^(cpu|igpu|gpu)(\d*)$")


@lru_cache(maxsize=1)
def available_devices() -> tuple[Device, ...]:
    """Every device this machine has that hetero knows how to find."""
    return tuple(device for backend in BACKENDS for device in backend.discover())


@lru_cache(maxsize=1)
def the_cpu() -> tuple[Device, ...]:
    return tuple(CPUBackend.discover())


def describe() -> str:
    """This machine's devices, one line each (``--list-devices``), then notes on the OpenCL devices left out."""
    return "\n".join([device.describe() for device in available_devices()] + OpenCLBackend.notes())


def parse_devices(spec: str) -> list[Device]:
    """Turn `cpu,igpu,gpu0` into devices, failing with one line that names the devices found."""
    names = [part.strip() for part in spec.split(",")]
    # the CPU alone needs no search of OpenCL platforms (importing pyopencl took 0.14 s of a 1-second run)
    found = the_cpu() if set(names) == {"cpu"} else available_devices()
    here = {device.name: device for device in found}
    found_line = ", ".join(here) or "none"
    devices = []
    for name in names:
        match = _NAME.match(name)
        if not match or (match.group(1) == "gpu" and not match.group(2)):
            raise DeviceError(
                f"malformed device {name!r}; use cpu, igpu, igpu1, ..., gpu0, gpu1, ... (devices here: {found_line})"
            )
        if name in (d.name for d in devices):
            raise DeviceError(f"device {name!r} is listed twice")
        if name not in here:
            raise DeviceError(f"device {name!r} not found; devices here: {found_line}")
        device = here[name]
        if device.kind == "opencl" and not OpenCLBackend.runtime_available():
            raise DeviceError(f"device {name!r} ({device.hardware}): {OPENCL_RUNTIME_MISSING}")
        devices.append(device)
    return devices


PRECISIONS = ("fp32", "tf32", "fp16")
# PyTorch's default arithmetic for convolutions on a GPU (cuDNN in TF32): a user comparing the two
# gets the same arithmetic from both
DEFAULT_PRECISION = "tf32"


def with_precision(devices: list[Device], precision: str) -> list[Device]:
    """Devices set to compute in `precision`: tf32 and fp16 apply to CUDA GPUs (tensor cores), tf32
    only to those that have TF32 tensor cores (sm_80 and newer; older ones stay fp32); the CPU and
    OpenCL devices stay fp32, which their schedules run fastest."""
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; choose from: {', '.join(PRECISIONS)}")
    if not any(d.kind == "cuda" for d in devices):
        return list(devices)
    from .schedules.cuda.pipeline import effective_precision

    return [dataclasses.replace(d, precision=effective_precision(d.target, precision)) if d.kind == "cuda" else d
            for d in devices]
