"""CUDA GPUs, for real where there are any; CI has none, so these skip there."""

import numpy as np
import pytest

import hetero
from hetero.execute import load_engine
from hetero.inference import infer

from .conftest import SMALL_NETWORK

GPUS = [d for d in hetero.available_devices() if d.kind == "cuda"]
pytestmark = pytest.mark.skipif(not GPUS, reason="no CUDA GPU on this machine")


def test_each_gpu_is_compiled_for_its_own_architecture():
    for gpu in GPUS:
        assert gpu.target.kind.name == "cuda"
        assert gpu.target.attrs["arch"].startswith("sm_")
        assert gpu.target.host.kind.name == "llvm"


def test_split_across_cpu_and_gpus_equals_cpu_alone(tmp_path):
    network = hetero.get_network(SMALL_NETWORK)
    inputs = network.random_input(9, seed=11)
    reference, _ = load_engine(network, hetero.parse_devices("cpu")[0]).infer(inputs)
    devices = hetero.parse_devices(",".join(["cpu"] + [g.name for g in GPUS]))
    report = infer(network, devices, inputs=inputs, table=tmp_path / "t.json", profile_batches=[1, 2, 4], progress=False)
    assert sum(s.size for s in report.shares) == 9
    assert any(s.size for s in report.shares if s.device.kind == "cuda")
    np.testing.assert_allclose(report.outputs, reference, rtol=1e-3, atol=1e-4)
