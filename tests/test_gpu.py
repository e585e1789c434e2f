"""CUDA GPUs, for real where there are any; CI has none, so these skip there."""

import numpy as np
import pytest

import hetero
from hetero.devices import with_precision
from hetero.engines import load_engine
from hetero.engines.tvm import PIPELINE_CHUNKS, PIPELINE_MIN_CHUNK
from hetero.schedules.cuda.pipeline import describe_schedules
from hetero.session import infer

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
    report = infer(network, devices, inputs=inputs, table=tmp_path / "t.json", profile_batches=[1, 2, 4], progress=False,
                   precision="fp32")  # exact, to compare with the CPU's outputs
    assert sum(s.size for s in report.shares) == 9
    assert any(s.size for s in report.shares if s.device.kind == "cuda")
    np.testing.assert_allclose(report.outputs, reference, rtol=1e-3, atol=1e-4)


def test_a_gpu_call_runs_in_chunks_with_the_outputs_of_separate_calls():
    network = hetero.get_network(SMALL_NETWORK)
    engine = load_engine(network, GPUS[0])
    inputs = network.random_input(PIPELINE_CHUNKS * PIPELINE_MIN_CHUNK + 6, seed=4)
    assert len(engine.chunks(len(inputs))) == PIPELINE_CHUNKS  # each of the two device buffers is reused
    assert engine._stream, "a CUDA engine computes on a stream of its own"
    chunked, _ = engine.infer(inputs)
    separate = np.concatenate([engine.infer(inputs[first : first + 10])[0] for first in range(0, len(inputs), 10)])
    np.testing.assert_allclose(chunked, separate, rtol=1e-5, atol=1e-6)


def test_a_run_computes_in_tf32_by_default_where_the_gpu_has_it(tmp_path):
    network = hetero.get_network(SMALL_NETWORK)
    report = infer(network, GPUS[0].name, batch=3, table=tmp_path / "t.json", profile_batches=[1, 2], progress=False)
    arch = int(GPUS[0].target.attrs["arch"].removeprefix("sm_").rstrip("a"))
    assert [s.device.precision for s in report.shares] == ["tf32" if arch >= 80 else "fp32"]
    reference, _ = load_engine(network, hetero.parse_devices("cpu")[0]).infer(network.random_input(3))
    error = np.abs(report.outputs.astype(np.float64) - reference).max() / np.abs(reference).max()
    assert error < 2e-2


@pytest.mark.parametrize("precision,bound,largest_bytes", [
    ("tf32", 2e-2, 64 * 114 * 114 * 4),  # per sample: the max pool's padded input, in float32
    ("fp16", 1e-2, 64 * 112 * 112 * 4),  # the first conv's float32 accumulator (activations are float16)
])
def test_tensor_core_precisions_stay_within_the_stated_error(precision, bound, largest_bytes):
    network = hetero.get_network("resnet-18")
    inputs = network.random_input(5, seed=3)
    reference, _ = load_engine(network, hetero.parse_devices("cpu")[0]).infer(inputs)
    gpu = with_precision([GPUS[0]], precision)[0]
    engine = load_engine(network, gpu)
    outputs, _ = engine.infer(inputs)
    # int32 offsets hold up to the batch at which the largest buffer reaches 2**31 bytes: cp.async
    # takes its byte offsets as int
    assert engine.max_call == (2**31 - 1) // largest_bytes
    error = np.abs(outputs.astype(np.float64) - reference).max() / np.abs(reference).max()
    assert error < bound  # the bound README.md and --help state
    if precision == "tf32" and gpu.target.attrs["arch"] == "sm_90a":  # an H100 or H200: its 3x3 convs were on wgmma
        assert sum(k.rule == "wgmma-conv" for k in describe_schedules(network.module, gpu.target, precision)) >= 10


def test_a_gpu_tuning_records_and_its_module_computes_the_same(tmp_path):
    from hetero import tune

    from .test_models import tiny_onnx

    tiny_onnx(tmp_path / "tiny.onnx")
    network = hetero.get_network(str(tmp_path / "tiny.onnx"))
    tuning = tune.tuning_for(tmp_path / "t.json", network, GPUS[0], 2)
    tune.tune(network, GPUS[0], tuning, trials=4)
    assert tuning.has_records()
    inputs = network.random_input(2, seed=5)
    reference, _ = load_engine(network, hetero.parse_devices("cpu")[0]).infer(inputs)
    outputs, _ = load_engine(network, GPUS[0], "tvm", tuning=tuning).infer(inputs)
    np.testing.assert_allclose(outputs, reference, rtol=1e-3, atol=1e-4)
