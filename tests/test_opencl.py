"""OpenCL devices (`igpu`): TVM's numbering and hetero's names, then a real platform where there is one.

CI installs PoCL, a CPU OpenCL platform, so the tests on a real platform run there: discovery, the
one-line refusal without TVM's OpenCL runtime, and the OpenCL C that hetero compiles for a network,
built by the platform's own compiler. Running on OpenCL needs that runtime and skips without it.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from tvm import relax

import hetero
from hetero import opencl
from hetero.compile import relax_pipeline
from hetero.devices import OPENCL_RUNTIME_MISSING, DeviceError, OpenCLBackend
from hetero.engines import load_engine
from hetero.opencl import CLDevice
from hetero.session import infer

from .conftest import ROOT, SMALL_NETWORK, run_script
from .test_cli import one_error_line

PLATFORM_DEVICES = opencl.platform_devices()
OPENCL_DEVICES = [d for d in hetero.available_devices() if d.kind == "opencl"]
needs_platform = pytest.mark.skipif(not PLATFORM_DEVICES, reason="no OpenCL platform here (install pocl-opencl-icd)")
needs_runtime = pytest.mark.skipif(
    not (OPENCL_DEVICES and opencl.runtime_available()), reason=OPENCL_RUNTIME_MISSING or "no OpenCL device here"
)


def _cl(name, type="gpu", shared=False, version=(3, 0), platform="P"):
    return CLDevice(platform, name, type, version, "1.0", 8, 2**30, 65536, 256, shared)


def test_tvm_numbers_gpus_and_uses_cpus_only_where_there_is_no_gpu():
    pocl = _cl("pocl", type="cpu", shared=True, platform="PoCL")
    old = _cl("old", version=(1, 1))
    dgpu = _cl("dgpu", platform="NVIDIA")
    igpu = _cl("igpu", shared=True, platform="Intel")
    accelerator = _cl("fpga", type="accelerator")
    devices = [pocl, old, dgpu, accelerator, igpu]
    assert opencl.tvm_reachable(devices) == [dgpu, igpu]
    lines = opencl.left_out(devices, list(enumerate([dgpu, igpu])))
    assert [line.split(" (")[0] for line in lines] == [
        "not usable: pocl on PoCL",
        "not usable: old on P",
        "not usable: fpga on P",
    ]
    assert "only where there is no OpenCL GPU" in lines[0] and "1.2 or later" in lines[1]
    assert opencl.tvm_reachable([pocl, old, accelerator]) == [pocl]


def test_integrated_gpu_is_igpu_whatever_index_tvm_gives_it():
    pocl = _cl("pocl", type="cpu", shared=True)
    dgpu = _cl("dgpu")
    igpu = _cl("igpu", shared=True)
    named = opencl.name_devices([(0, dgpu), (1, igpu)])
    assert [(name, index, d.name) for name, index, d in named] == [("igpu", 1, "igpu"), ("igpu1", 0, "dgpu")]
    assert [name for name, _, _ in opencl.name_devices([(0, pocl)])] == ["igpu"]


def test_indices_follow_what_tvm_reports_not_platform_order():
    a = _cl("a", platform="P1")
    b = _cl("b", platform="P2")
    twin_1 = _cl("twin", platform="P3")
    twin_2 = _cl("twin", platform="P3")
    only_tvm = _cl("ghost", platform=opencl.TVM_ONLY_PLATFORM)  # a device pyopencl's ICD loader misses
    numbered = opencl.match_tvm_numbering([a, b, twin_1, twin_2], [_cl("b"), only_tvm, _cl("a")])
    assert [(index, d.name) for index, d in numbered] == [(0, "b"), (1, "ghost"), (2, "a")]
    assert numbered[0][1] is b and numbered[1][1] is only_tvm and numbered[2][1] is a
    numbered = opencl.match_tvm_numbering([twin_1, twin_2], [_cl("twin"), _cl("twin")])
    assert [index for index, _ in numbered] == [0, 1]
    assert numbered[0][1] is twin_1 and numbered[1][1] is twin_2
    assert opencl.match_tvm_numbering([a, b], []) == [], "without TVM's runtime listing a device, none is usable"


def test_devices_only_tvm_sees_are_offered_and_explained(monkeypatch):
    """On the H100 machines TVM's OpenCL runtime lists the GPUs through NVIDIA's platform while pyopencl
    sees only PoCL: the GPUs become igpu, igpu1 and PoCL is explained."""
    pocl = _cl("pocl", type="cpu", shared=True, platform="Portable Computing Language")
    h100 = _cl("H100", platform=opencl.TVM_ONLY_PLATFORM)
    monkeypatch.setattr(opencl, "platform_devices", lambda: [pocl])
    monkeypatch.setattr(opencl, "runtime_available", lambda: True)
    monkeypatch.setattr(opencl, "tvm_devices", lambda: [h100, h100])
    numbered = opencl.tvm_numbering([pocl])
    assert [name for name, _, _ in opencl.name_devices(numbered)] == ["igpu", "igpu1"]
    notes = OpenCLBackend.notes()
    assert notes[0].startswith("not usable: pocl on Portable Computing Language") and "no OpenCL GPU" in notes[0]
    assert [line.split(" (")[0] for line in notes[1:]] == ["note: H100", "note: H100"]
    assert "not by pyopencl" in notes[1]


def test_missing_runtime_says_where_it_was_looked_for_and_what_to_do(tmp_path):
    missing = opencl.runtime_missing(tmp_path)
    assert f"{opencl.RUNTIME_LIBRARY} is not in {tmp_path}" in missing
    assert "USE_OPENCL=ON" in missing and "\n" not in missing
    (tmp_path / opencl.RUNTIME_LIBRARY).write_bytes(b"not a shared library")
    present = opencl.runtime_missing(tmp_path)
    assert f"{tmp_path / opencl.RUNTIME_LIBRARY} is there but `import tvm` did not load it" in present
    assert "libOpenCL.so.1" in present


@needs_platform
def test_discovery_reads_every_device_of_a_real_platform():
    for d in PLATFORM_DEVICES:
        assert d.name and d.platform and d.type in ("gpu", "cpu", "accelerator")
        assert d.version >= (1, 0) and d.compute_units >= 1
        assert d.memory > 0 and d.local_memory > 0 and d.max_work_group_size >= 1
        if d.type == "cpu":
            assert d.shared_memory
    numbered = opencl.tvm_numbering(PLATFORM_DEVICES)
    assert [index for index, _ in numbered] == list(range(len(numbered)))
    assert len(OPENCL_DEVICES) == len(numbered)
    assert len(OpenCLBackend.notes()) == len(PLATFORM_DEVICES) - len(numbered) + (not opencl.runtime_available())


@needs_platform
def test_igpu_is_compiled_for_its_own_limits_and_listed_with_them():
    by_name = {name: (index, d) for name, index, d in opencl.name_devices(opencl.tvm_numbering(PLATFORM_DEVICES))}
    assert OPENCL_DEVICES[0].name == "igpu"
    for device in OPENCL_DEVICES:
        index, cl_device = by_name[device.name]
        assert (device.index, device.hardware) == (index, cl_device.hardware)
        attrs = device.target.attrs
        assert device.target.kind.name == "opencl" and device.target.host.kind.name == "llvm"
        assert attrs["max_threads_per_block"] == cl_device.max_work_group_size
        assert attrs["max_shared_memory_per_block"] == cl_device.local_memory
        assert f"{cl_device.compute_units} compute units" in device.describe()
    listing = run_script("Inference.py", "--list-devices")
    assert listing.returncode == 0, listing.stderr
    first = f"igpu: {OPENCL_DEVICES[0].hardware} (opencl); "  # PoCL's memory size differs from run to run
    assert any(line.startswith(first) and "compute units" in line for line in listing.stdout.splitlines())


@needs_platform
@pytest.mark.skipif(opencl.runtime_available(), reason="TVM's OpenCL runtime is loaded here")
def test_igpu_without_tvm_opencl_runtime_is_one_clear_line():
    with pytest.raises(DeviceError, match="USE_OPENCL=ON"):
        hetero.parse_devices("cpu,igpu")
    line = one_error_line(run_script("Inference.py", "--network", SMALL_NETWORK, "--batch", "2", "--device", "igpu"))
    assert opencl.RUNTIME_LIBRARY in line and "USE_OPENCL=ON" in line


def _opencl_source(module) -> str:
    if module.kind == "opencl":
        return module.inspect_source()
    return "".join(_opencl_source(imported) for imported in module.imports)


@needs_platform
def test_generated_opencl_builds_on_each_device_as_tvm_runtime_builds_it():
    import pyopencl as cl

    network = hetero.get_network(SMALL_NETWORK)
    by_name = {name: d for name, _, d in opencl.name_devices(opencl.tvm_numbering(PLATFORM_DEVICES))}
    for device in OPENCL_DEVICES:
        executable = relax.build(network.module, device.target, relax_pipeline=relax_pipeline(device))
        # TVM's runtime splits the source at these markers and builds one program per kernel.
        pieces = [piece.split("\n", 1) for piece in _opencl_source(executable.mod).split("// Function: ")[1:]]
        assert len(pieces) > 10
        context = cl.Context([by_name[device.name].handle])
        for name, source in pieces:
            program = cl.Program(context, source).build()
            assert cl.Kernel(program, name).function_name == name


@needs_runtime
def test_split_across_cpu_and_igpu_equals_cpu_alone(tmp_path):
    network = hetero.get_network(SMALL_NETWORK)
    inputs = network.random_input(7, seed=5)
    reference, _ = load_engine(network, hetero.parse_devices("cpu")[0]).infer(inputs)
    devices = hetero.parse_devices("cpu,igpu")
    report = infer(network, devices, inputs=inputs, table=tmp_path / "t.json", profile_batches=[1, 2, 4], progress=False)
    assert sum(s.size for s in report.shares) == 7
    np.testing.assert_allclose(report.outputs, reference, rtol=1e-3, atol=1e-4)


def test_drivers_listed_in_ocl_icd_filenames_become_vendor_files():
    files = opencl.icd_vendor_files("libpocl.so.2::/usr/lib/libnvidia-opencl.so.1:libpocl.so.2")
    assert files == {"0-libpocl.so.2.icd": "libpocl.so.2\n", "1-libnvidia-opencl.so.1.icd": "/usr/lib/libnvidia-opencl.so.1\n"}


@needs_platform
@pytest.mark.parametrize("filenames, finds_pocl", [("libpocl.so.2", True), ("libnot-a-driver.so", False)])
def test_pyopencl_sees_the_drivers_ocl_icd_filenames_lists(filenames, finds_pocl):
    """pyopencl's own ICD loader ignores OCL_ICD_FILENAMES; hetero hands it the list (a fresh process each
    time: a loader reads its drivers once)."""
    script = "from hetero import opencl; print(sum('Portable' in d.platform for d in opencl.platform_devices()))"
    env = {k: v for k, v in os.environ.items() if k != "OCL_ICD_VENDORS"}
    seen = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**env, "OCL_ICD_FILENAMES": filenames, "PYTHONPATH": str(ROOT)})
    assert (int(seen.stdout.strip()) > 0) == finds_pocl, seen.stderr
