"""The multi-device path for real: two CPU-backed devices in two threads give the single-device output."""

import dataclasses
import threading

import numpy as np
import pytest
import tvm

import hetero
from hetero.compile import compile_network
from hetero.engines import load_engine
from hetero.engines import tvm as tvm_engine
from hetero.engines.tvm import TVMEngine, profile_key
from hetero.execute import ShareResult, run_split
from hetero.inference import learn_company, plan
from hetero.session import infer
from hetero.table import ProfileTable

from .conftest import SMALL_NETWORK
from .test_models import tiny_onnx


@pytest.fixture(scope="module")
def two_cpus():
    cpu = hetero.parse_devices("cpu")[0]
    threads = max(1, (cpu.target.attrs["num-cores"]) // 2)
    return [dataclasses.replace(cpu, name="cpu-a", threads=threads), dataclasses.replace(cpu, name="cpu-b", threads=threads)]


def test_split_over_two_devices_equals_one_device(tmp_path, two_cpus):
    network = hetero.get_network(SMALL_NETWORK)
    inputs = network.random_input(5, seed=7)
    reference, _ = load_engine(network, hetero.parse_devices("cpu")[0]).infer(inputs)

    report = infer(network, two_cpus, inputs=inputs, table=tmp_path / "t.json", profile_batches=[1, 2], progress=False)

    assert [s.size for s in report.shares] == [s.size for s in report.shares if s.size > 0], "a device got no work"
    assert sum(s.size for s in report.shares) == 5
    assert report.shares[0].start == 0 and report.shares[1].start == report.shares[0].size
    np.testing.assert_allclose(report.outputs, reference, rtol=1e-4, atol=1e-5)
    assert report.profiled == ["cpu-a"], "the second device has the same identity, so its profile is reused"
    assert len(ProfileTable.load(tmp_path / "t.json").profiles()) == 1, "both devices share one hardware identity"


def test_outputs_stay_in_input_order_for_any_split(two_cpus):
    network = hetero.get_network(SMALL_NETWORK)
    engines = [load_engine(network, device) for device in two_cpus]
    inputs = network.random_input(4, seed=3)
    whole, _ = engines[0].infer(inputs)
    engines[1].infer(inputs[:1])  # each engine's worker thread exists from its first run on
    threads_before = threading.active_count()
    for shares in ([4, 0], [0, 4], [1, 3], [3, 1]):
        outputs, results, wall_s = run_split(engines, inputs, shares, [0.0, 0.0])
        np.testing.assert_allclose(outputs, whole, rtol=1e-4, atol=1e-5)
        assert [r.size for r in results] == shares and wall_s > 0
    assert threading.active_count() == threads_before, "a split run left threads behind"


def test_engine_input_buffer_serves_every_batch_size():
    """Each engine stages inputs in one buffer that grows and is reused: no call may see another's rows."""
    network = hetero.get_network(SMALL_NETWORK)
    engine = load_engine(network, hetero.parse_devices("cpu")[0])
    inputs = network.random_input(6, seed=11)
    whole, _ = engine.infer(inputs)
    for first, last in [(4, 6), (0, 6), (1, 2), (0, 5)]:
        part, _ = engine.infer(inputs[first:last])
        np.testing.assert_allclose(part, whole[first:last], rtol=1e-5, atol=1e-6)
    doubles, _ = engine.infer(inputs.astype(np.float64))
    np.testing.assert_allclose(doubles, whole, rtol=1e-5, atol=1e-6)


def test_engine_runs_a_batch_above_its_module_limit_in_calls_within_it():
    """A CUDA module indexes in int32 up to a batch it records (Engine.max_call): above it, calls of at most that."""
    network = hetero.get_network(SMALL_NETWORK)
    cpu = hetero.parse_devices("cpu")[0]
    engine = TVMEngine(network, cpu, compile_network(network, cpu))
    inputs = network.random_input(7, seed=5)
    whole, _ = engine.infer(inputs)
    sizes, call_module = [], engine._call_module
    engine._call_module = lambda batch, module: (sizes.append(len(batch)), call_module(batch, module))[1]
    engine.max_call = 3
    chunked, timing = engine.infer(inputs)
    assert sizes == [3, 3, 1]
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    assert timing.exec_s > 0
    engine.close()


def test_staging_copies_with_helper_threads_row_for_row(monkeypatch):
    monkeypatch.setattr(tvm_engine.ParallelCopy, "MIN_BYTES", 0)  # every copy is split over the threads
    buffer = tvm_engine.BatchBuffer(tvm.cpu(), (3, 5), "float32")
    copy = tvm_engine.ParallelCopy(3, "test-copy")
    rng = np.random.default_rng(0)
    for rows in (7, 2, 9, 1, 9):
        batch = rng.standard_normal((rows, 3, 5))
        np.testing.assert_array_equal(buffer.fill(batch, copy).numpy(), batch.astype(np.float32))
    copy.shutdown()


def test_prepare_runs_each_new_call_size_once_and_leaves_failures_to_the_run():
    """What a fresh process pays on a size's first call (kernels loading, the VM's buffers, fresh host
    memory) is paid before the timed run, once per size."""
    network = hetero.get_network(SMALL_NETWORK)
    cpu = hetero.parse_devices("cpu")[0]
    engine = TVMEngine(network, cpu, compile_network(network, cpu))
    sizes, call_module = [], engine._call_module
    engine._call_module = lambda batch, module, chunks=None: (sizes.append(len(batch)), call_module(batch, module, chunks))[1]
    engine.prepare(3)
    engine.prepare(3)
    assert sizes == [3]
    engine.prepare(5, limit=2)  # runs as calls of 2, 2 and 1
    assert sizes == [3, 1, 2]
    engine.infer(network.random_input(4))
    engine.prepare(4)  # ran already
    assert sizes == [3, 1, 2, 4]

    broken = TVMEngine(network, cpu, compile_network(network, cpu))
    broken._call_module = lambda batch, module, chunks=None: (_ for _ in ()).throw(RuntimeError("device lost"))
    broken.prepare(2)  # does not raise: the run meets the failure and re-plans
    engine.close()
    broken.close()


def test_each_split_teaches_the_table_how_devices_run_in_company(tmp_path, two_cpus):
    network = hetero.get_network(SMALL_NETWORK)
    table = tmp_path / "t.json"
    first = infer(network, two_cpus, batch=4, table=table, profile_batches=[1, 2], progress=False)
    assert all(s.size for s in first.shares), "the test needs both devices to work"
    learned = ProfileTable.load(table).get(profile_key(two_cpus[0]), hetero.get_network(SMALL_NETWORK).key)
    assert len(learned.company) == 2, "both devices share one profile, and each share was recorded"
    assert learned.company == pytest.approx([s.wall_s / learned.predict(s.size) for s in first.shares])

    learned.company = [4.0] * 3  # as if this device ran four times slower than profiled next to the other
    shares, predicted, _ = plan([learned, learned], 4)
    assert shares in ([4, 0], [0, 4]) and max(predicted) == pytest.approx(learned.predict(4)), (
        "a device that slow in company is not worth splitting over")


def test_a_device_the_plan_leaves_idle_counts_the_splits_it_sits_out(tmp_path, two_cpus):
    network = hetero.get_network(SMALL_NETWORK)
    table_path = tmp_path / "t.json"
    infer(network, two_cpus[:1], batch=2, table=table_path, profile_batches=[1, 2], progress=False)
    table = ProfileTable.load(table_path)
    profile = table.get(profile_key(two_cpus[0]), hetero.get_network(SMALL_NETWORK).key)
    other = dataclasses.replace(profile, device_key="another device", company=[], idle_splits=0)
    working = ShareResult(two_cpus[0], "tvm", 0, 2, 0.01, wall_s=0.01)
    idle = ShareResult(two_cpus[1], "tvm", 2, 0, 0.0)
    assert learn_company(table, [profile, other], [working, idle]), "the table changed"
    table.save()
    assert other.idle_splits == 1 and profile.idle_splits == 0
    assert profile.company == [], "a device alone is not in company"
    assert ProfileTable.load(table_path).get("another device", hetero.get_network(SMALL_NETWORK).key).idle_splits == 1


def test_an_accelerators_call_runs_in_chunks_with_the_same_outputs_in_order(tmp_path):
    tiny_onnx(tmp_path / "tiny.onnx")  # the chunks' logic on a network whose 67 samples take no time
    network = hetero.get_network(tmp_path / "tiny.onnx")
    cpu = hetero.parse_devices("cpu")[0]
    inputs = network.random_input(2 * tvm_engine.PIPELINE_MIN_CHUNK + 3, seed=5)
    whole, _ = load_engine(network, cpu).infer(inputs)
    engine = TVMEngine(network, cpu, compile_network(network, cpu))
    try:
        # an accelerator computes on a buffer apart from where its inputs are staged: host memory stands in
        engine._on_device = [tvm_engine.BatchBuffer(tvm.cpu(), tuple(network.input_shape), network.dtype)
                             for _ in range(2)]
        assert engine.chunks(len(inputs)) == [34, 33]
        chunked, timing = engine.infer(inputs)
    finally:
        engine.close()
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    assert timing.h2d_s > 0 and timing.exec_s > 0 and timing.d2h_s > 0
