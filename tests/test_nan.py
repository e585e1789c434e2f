"""NaN and infinity propagate as in PyTorch and ONNX Runtime: a bad input never becomes a plausible output."""

import numpy as np
import pytest
import tvm
from tvm import relax

import hetero
from hetero.devices import parse_devices, with_precision
from hetero.engines import load_engine
from hetero.models import Network

from .conftest import SMALL_NETWORK

SAMPLE = (2, 4, 4)
GPUS = [d.name for d in hetero.available_devices() if d.kind == "cuda"]
# every device in every arithmetic it computes in; the GPUs' only where this machine has them
DEVICES = [("cpu", "fp32")] + [(gpu, precision) for gpu in GPUS for precision in ("fp32", "tf32", "fp16")]
TOLERANCE = {"fp32": 1e-5, "tf32": 2e-2, "fp16": 1e-2}


def _max_min_network() -> Network:
    """relu, a 2x2 max pool, clip to [-1, 1] (a min then a max) and an elementwise max/min of two
    halves of the channels: every way a CNN takes a max or a min."""
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, *SAMPLE), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x], attrs={"num_input": 1}):
        with bb.dataflow():
            pooled = bb.emit(relax.op.nn.max_pool2d(relax.op.nn.relu(x), pool_size=(2, 2), strides=(2, 2)))
            clipped = bb.emit(relax.op.clip(x, -1.0, 1.0))
            first, second = relax.op.strided_slice(x, [1], [0], [1]), relax.op.strided_slice(x, [1], [1], [2])
            larger = bb.emit(relax.op.maximum(first, second))
            smaller = bb.emit(relax.op.minimum(second, first))
            flat = [bb.emit(relax.op.reshape(t, (n, -1))) for t in (pooled, clipped, larger, smaller)]
            out = bb.emit_output(relax.op.concat(flat, axis=1))
        bb.emit_func_output(out)
    return Network("max-min", bb.finalize(), (), SAMPLE, (8 + 32 + 16 + 16,))


def _reference(x: np.ndarray) -> np.ndarray:
    """What PyTorch computes (torch.maximum, clamp, max_pool2d propagate NaN), in numpy."""
    relu = np.where(np.isnan(x), x, np.maximum(x, 0))
    windows = relu.reshape(len(x), 2, 2, 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(len(x), 2, 2, 2, 4)
    pooled = windows.max(axis=-1)  # numpy's max propagates NaN
    clipped = np.clip(x, -1, 1)
    larger, smaller = np.maximum(x[:, :1], x[:, 1:]), np.minimum(x[:, 1:], x[:, :1])
    return np.concatenate([t.reshape(len(x), -1) for t in (pooled, clipped, larger, smaller)], axis=1)


@pytest.mark.parametrize("device,precision", DEVICES)
def test_max_and_min_propagate_nan_and_inf(device, precision):
    x = np.random.default_rng(0).standard_normal((4, *SAMPLE)).astype(np.float32)
    x[0, 0, 0, 0] = np.nan  # in a pool window, relu, clip and the first operand of max
    x[1, 1, 3, 3] = np.nan  # the second operand of max
    x[2, 0, 1, 2] = np.inf
    x[3, 1, 2, 0] = -np.inf
    engine = load_engine(_max_min_network(), with_precision(parse_devices(device), precision)[0])
    out, _ = engine.infer(x)
    expected = _reference(x)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(out), np.isinf(expected))
    np.testing.assert_allclose(out, expected, rtol=TOLERANCE[precision], atol=TOLERANCE[precision])


@pytest.mark.parametrize("device,precision", DEVICES)
def test_nan_sample_gives_nan_outputs_and_leaves_the_others_alone(tmp_path, device, precision):
    """A registered CNN (convs, relu, max pools, concat): the sample with a NaN gives NaN, the sample with
    an infinity gives no finite plausible answer either, and the clean sample is unchanged."""
    network = hetero.get_network(SMALL_NETWORK)
    x = network.random_input(3)
    run = dict(table=tmp_path / "t.json", profile_batches=[1, 3], budget_s=0.5, progress=False, precision=precision)
    clean = hetero.infer(network, device, inputs=x, **run).outputs
    x[0, 0, 5, 5] = np.nan
    x[1, 1, 7, 7] = np.inf
    out = hetero.infer(network, device, inputs=x, **run).outputs
    assert np.isnan(out[0]).all()
    assert not np.isfinite(out[1]).any()
    np.testing.assert_allclose(out[2], clean[2], rtol=TOLERANCE[precision], atol=TOLERANCE[precision])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_tiny_onnx_model_as_onnxruntime(tmp_path, bad):
    """An ONNX model with a NaN or infinity in one sample gives what ONNX Runtime gives."""
    ort = pytest.importorskip("onnxruntime")
    from .test_models import tiny_onnx

    path = tmp_path / "tiny.onnx"
    tiny_onnx(path)
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    x[1, 2, 4, 4] = bad
    out = hetero.infer(str(path), "cpu", inputs=x, table=tmp_path / "t.json", profile_batches=[1, 3],
                       budget_s=0.5, progress=False).outputs
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
