"""OpenCL devices as pyopencl reports them, and the index TVM's OpenCL runtime gives each one.

TVM's runtime (OpenCLWorkspace::Init in src/backend/opencl/runtime/opencl_device_api.cc) numbers the GPU
devices of OpenCL 1.2 or later on every platform; only when there is no such GPU does it number
the CPU devices instead (PoCL, for one), and it never numbers accelerators. It keeps platforms in
an unordered map, so its order across platforms need not be the platform order: when the runtime
is loaded, hetero asks TVM which device each index is; without it the numbering is predicted, which
is all that listing devices and compiling for them need.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import tvm
from tvm.base import _LOADED_LIBS

RUNTIME_LIBRARY = "libtvm_runtime_opencl.so"
_TVM_MIN_VERSION = (1, 2)  # CL_TARGET_OPENCL_VERSION of TVM's OpenCL runtime
TVM_ONLY_PLATFORM = "an OpenCL platform pyopencl does not see"  # for devices only TVM's runtime lists
_PREFERENCE = ("integrated GPU", "GPU", "CPU", "accelerator")  # the order `igpu`, `igpu1`, ... take


@dataclass(frozen=True)
class CLDevice:
    """One OpenCL device: what discovery reports and what a TVM target for it needs."""

    platform: str
    name: str
    type: str  # "gpu", "cpu" or "accelerator"
    version: tuple[int, int]  # from CL_DEVICE_VERSION, which TVM's runtime checks
    driver: str
    compute_units: int
    memory: int  # global memory, bytes
    local_memory: int  # bytes per work group: TVM's max_shared_memory_per_block
    max_work_group_size: int  # TVM's max_threads_per_block
    shared_memory: bool  # global memory is the host's memory
    handle: object = field(default=None, compare=False, repr=False)  # the pyopencl.Device

    @property
    def kind(self) -> str:
        if self.type == "gpu":
            return "integrated GPU" if self.shared_memory else "GPU"
        return "CPU" if self.type == "cpu" else "accelerator"

    @property
    def hardware(self) -> str:
        """Name and platform: one GPU seen through two drivers is two devices to profile."""
        return f"{self.name} on {self.platform}"

    def summary(self) -> str:
        where = "shared with the host" if self.shared_memory else "on the device"
        return (
            f"{self.kind}, OpenCL {self.version[0]}.{self.version[1]}, {self.compute_units} compute units, "
            f"{self.memory / 2**30:.1f} GiB memory {where}"
        )

    def target_attrs(self) -> dict:
        """The OpenCL target TVM's Target.from_device detects, from pyopencl's numbers (no TVM runtime needed)."""
        return {
            "kind": "opencl",
            "max_threads_per_block": self.max_work_group_size,
            "max_shared_memory_per_block": self.local_memory,
            "thread_warp_size": 1,  # what TVM's OpenCL runtime reports for every device
        }

    def signature(self) -> tuple:
        """What TVM's runtime can tell about a device, to recognise it among pyopencl's (not memory: PoCL's varies)."""
        return (self.name, self.driver, f"{self.version[0]}.{self.version[1]}", self.compute_units)


def _version(text: str) -> tuple[int, int]:
    match = re.match(r"OpenCL (\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _read(platform, device) -> CLDevice:
    import pyopencl as cl

    if device.type & cl.device_type.GPU:
        kind = "gpu"
    elif device.type & cl.device_type.CPU:
        kind = "cpu"
    else:
        kind = "accelerator"
    try:
        shared = bool(device.host_unified_memory)
    except cl.Error:  # deprecated since OpenCL 2.0, so a driver may refuse to answer
        shared = kind == "cpu"
    return CLDevice(
        platform=platform.name.strip(),
        name=device.name.strip(),
        type=kind,
        version=_version(device.version),
        driver=device.driver_version.strip(),
        compute_units=device.max_compute_units,
        memory=device.global_mem_size,
        local_memory=device.local_mem_size,
        max_work_group_size=device.max_work_group_size,
        shared_memory=shared,
        handle=device,
    )


def icd_vendor_files(filenames: str) -> dict[str, str]:
    """The .icd files (name: driver library) that stand for an OCL_ICD_FILENAMES list of drivers."""
    drivers = dict.fromkeys(name for name in filenames.split(":") if name)
    return {f"{rank}-{Path(driver).name}.icd": driver + "\n" for rank, driver in enumerate(drivers)}


@contextmanager
def _drivers_registered_for_pyopencl(vendors_dir: Path) -> Iterator[None]:
    """pyopencl bundles its own ICD loader, which reads OCL_ICD_VENDORS (else /etc/OpenCL/vendors) but
    not OCL_ICD_FILENAMES, the list some systems register drivers with (the H100 machines: NVIDIA's
    driver only there, /etc/OpenCL/vendors holding PoCL's alone). So while pyopencl's loader starts,
    that list is written out as a vendors folder for it. The environment is put back afterwards:
    TVM's runtime links the system's loader, which reads both and would see every driver twice."""
    filenames, vendors = os.environ.get("OCL_ICD_FILENAMES"), os.environ.get("OCL_ICD_VENDORS")
    if not filenames or vendors is not None:
        yield
        return
    vendors_dir.mkdir(parents=True, exist_ok=True)
    for name, content in icd_vendor_files(filenames).items():
        (vendors_dir / name).write_text(content)
    os.environ["OCL_ICD_VENDORS"] = str(vendors_dir)
    try:
        yield
    finally:
        del os.environ["OCL_ICD_VENDORS"]


def platform_devices() -> list[CLDevice]:
    """Every OpenCL device here, in platform order; none without pyopencl or an OpenCL platform."""
    try:
        import pyopencl as cl
    except ImportError:
        return []
    try:
        with tempfile.TemporaryDirectory() as scratch, _drivers_registered_for_pyopencl(Path(scratch)):
            platforms = cl.get_platforms()
    except cl.Error:  # the ICD loader found no platform
        return []
    found = []
    for platform in platforms:
        try:
            devices = platform.get_devices()
        except cl.Error:  # a platform with no device, e.g. Mesa's with no supported GPU
            continue
        found.extend(_read(platform, device) for device in devices)
    return found


def runtime_available() -> bool:
    """Whether `import tvm` loaded TVM's OpenCL runtime, so `tvm.opencl(i)` devices can run."""
    return tvm.get_global_func("device_api.opencl", allow_missing=True) is not None


def runtime_missing(lib_dir: Path | None = None) -> str:
    """One line on why TVM's OpenCL runtime is not loaded, and what would fix it."""
    lib_dir = lib_dir or Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    library = lib_dir / RUNTIME_LIBRARY
    if library.exists():
        return (
            f"TVM's OpenCL runtime {library} is there but `import tvm` did not load it, so OpenCL devices "
            f"cannot run; it needs the OpenCL ICD loader libOpenCL.so.1 (ocl-icd-libopencl1) and must be "
            f"built for TVM {tvm.__version__}"
        )
    return (
        f"TVM's OpenCL runtime {RUNTIME_LIBRARY} is not in {lib_dir} (the apache-tvm wheel from PyPI does "
        f"not ship it), so OpenCL devices cannot run; build TVM {tvm.__version__} from source with "
        f"USE_OPENCL=ON and copy its {RUNTIME_LIBRARY} there"
    )


def tvm_reachable(devices: Iterable[CLDevice]) -> list[CLDevice]:
    """The devices TVM's runtime numbers: GPUs of OpenCL 1.2 or later, else such CPUs."""
    usable = [d for d in devices if d.version >= _TVM_MIN_VERSION]
    return [d for d in usable if d.type == "gpu"] or [d for d in usable if d.type == "cpu"]


def match_tvm_numbering(devices: Sequence[CLDevice], tvm_devices: Sequence[CLDevice]) -> list[tuple[int, CLDevice]]:
    """(TVM index, device) for every device TVM's runtime lists: pyopencl's report of it where pyopencl
    sees the same device, else TVM's own (the two may load different ICD loaders that read different
    vendor lists: on the H100 machines TVM's sees NVIDIA's OpenCL platform and pyopencl's does not)."""
    pending = list(devices)
    numbered = []
    for index, seen_by_tvm in enumerate(tvm_devices):
        match = next((d for d in pending if d.signature() == seen_by_tvm.signature()), None)
        if match is not None:
            pending.remove(match)
        numbered.append((index, match or seen_by_tvm))
    return numbered


@contextmanager
def _without_runtime_warnings() -> Iterator[None]:
    """Drop the warnings TVM's OpenCL runtime writes to the C++ stderr as it finds its devices
    ("Using CPU OpenCL device" wherever PoCL is the only platform, "No OpenCL device", ...): hetero
    says the same in its own words (`left_out`, --list-devices), and an error must stay one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not ("opencl_device_api.cc" in line and ": Warning: " in line):
                    sys.stderr.write(line)
            sys.stderr.flush()


@lru_cache(maxsize=1)
def _initialise_runtime() -> None:
    """TVM's OpenCL runtime looks for its devices on the first query of any tvm.opencl(i)."""
    with _without_runtime_warnings():
        _ = tvm.opencl(0).exist


def tvm_devices() -> list[CLDevice]:
    """The devices TVM's OpenCL runtime numbers, as it describes them."""
    _initialise_runtime()
    found = []
    while tvm.opencl(len(found)).exist:
        dev = tvm.opencl(len(found))
        major, _, minor = dev.compute_version.partition(".")
        found.append(CLDevice(
            platform=TVM_ONLY_PLATFORM,
            name=dev.device_name,
            type="gpu",  # TVM's runtime numbers GPUs, and CPUs only where no platform has a GPU
            version=(int(major or 0), int(minor or 0)),
            driver=dev.driver_version,
            compute_units=dev.multi_processor_count,
            memory=dev.total_global_memory,
            local_memory=dev.max_shared_memory_per_block,
            max_work_group_size=dev.max_threads_per_block,
            shared_memory=False,
        ))
    return found


def tvm_numbering(devices: Sequence[CLDevice]) -> list[tuple[int, CLDevice]]:
    """(TVM index, device) for each device TVM can run on: asked of TVM when its runtime is loaded."""
    if runtime_available():
        return match_tvm_numbering(devices, tvm_devices())
    return list(enumerate(tvm_reachable(devices)))


def name_devices(numbered: Sequence[tuple[int, CLDevice]]) -> list[tuple[str, int, CLDevice]]:
    """`igpu` for the most preferred device (an integrated GPU first), then `igpu1`, `igpu2`, ..."""
    ranked = sorted(numbered, key=lambda pair: _PREFERENCE.index(pair[1].kind))
    return [("igpu" if rank == 0 else f"igpu{rank}", index, d) for rank, (index, d) in enumerate(ranked)]


def left_out(devices: Sequence[CLDevice], numbered: Sequence[tuple[int, CLDevice]]) -> list[str]:
    """A line for each OpenCL device here that TVM cannot run on, saying why."""
    used = [d for _, d in numbered]
    lines = []
    for d in devices:
        if any(d is u for u in used):
            continue
        if d.version < _TVM_MIN_VERSION:
            why = "TVM's OpenCL runtime needs OpenCL 1.2 or later"
        elif d.type == "cpu" and any(u.type == "gpu" for u in used):
            why = "TVM's OpenCL runtime uses CPU devices only where there is no OpenCL GPU"
        elif d.type == "accelerator":
            why = "TVM's OpenCL runtime uses no accelerator devices"
        else:
            why = "TVM's OpenCL runtime did not list it"
        lines.append(f"not usable: {d.hardware} ({d.summary()}): {why}")
    return lines
