"""The server's batcher: earliest deadline first, batches sized by each device's own profile, admission that
refuses rather than answers late, expired and cancelled requests dropped, failing devices leaving the pool,
requests split over devices, and a drain on close.

Fake engines sleep a fixed time per sample and answer each sample's sum, so every test runs in well under a
second; one test runs a real TVM engine."""

import threading
import time
from concurrent.futures import CancelledError
from types import SimpleNamespace

import numpy as np
import pytest

import hetero
from hetero.engines import Engine, Timing, load_engine
from hetero.errors import HeteroError
from hetero.serve import batcher as batcher_module
from hetero.serve.batcher import Batcher, Expired, Rejected
from hetero.table import Measurement, Profile

from .test_models import tiny_onnx


class Sleepy(Engine):
    """Sleeps `per_sample_s` a sample and answers each sample's sum; remembers every sample's first value
    in call order; raises from its `fails_at`th call on."""

    name = "sleepy"
    package = "none"
    version = "1"

    def __init__(self, device, per_sample_s, fails_at=None):
        super().__init__(SimpleNamespace(input_shape=(2,), output_shape=(1,), dtype="float32",
                                         input_dtype=np.dtype("float32"), output_dtype=np.dtype("float32")),
                         SimpleNamespace(name=device))
        self.per_sample_s, self.fails_at = per_sample_s, fails_at
        self.seen, self.calls = [], 0

    def run(self, batch):
        self.calls += 1
        if self.fails_at is not None and self.calls >= self.fails_at:
            raise RuntimeError(f"{self.device.name} lost")
        self.seen.extend(batch[:, 0].tolist())
        time.sleep(self.per_sample_s * len(batch))
        return batch.sum(axis=1, keepdims=True), Timing(0.0, self.per_sample_s * len(batch), 0.0)


def linear(per_sample_s, name="fake") -> Profile:
    return Profile(name, "net", [Measurement(b, [per_sample_s * b] * 3, [0.0] * 3, [0.0] * 3) for b in (1, 8, 64)])


def pool(*specs):
    """(engine, profile) pairs of Sleepy engines from (device, per_sample_s[, fails_at])."""
    engines = [Sleepy(*spec) for spec in specs]
    return [(engine, linear(engine.per_sample_s, engine.device.name)) for engine in engines]


class Recorder:
    def __init__(self):
        self.batches, self.answers, self.failures, self.outs = [], [], [], []

    def batch(self, device, size, compute_s):
        self.batches.append((device, size))

    def answered(self, queue_s, compute_s, within_deadline):
        self.answers.append(within_deadline)

    def failed(self, reason):
        self.failures.append(reason)

    def device_out(self, device, error):
        self.outs.append((device, error))


def samples(first, count=1):
    """`count` samples whose first value is `first`, `first` + 1, ...: they say which request they are."""
    values = np.arange(first, first + count, dtype=np.float32)
    return np.stack([values, np.ones_like(values)], axis=1)


def hold(devices):
    """Block each engine's worker until the returned event is set: batches taken meanwhile wait behind it."""
    gate = threading.Event()
    for engine, _ in devices:
        engine.on_worker(gate.wait)
    return gate


def test_outputs_go_to_their_requests_in_order_in_deadline_order():
    devices = pool(("one", 0.001))
    gate = hold(devices)
    batcher = Batcher(devices, latency_s=2.0)
    blocker = batcher.submit(samples(100))  # taken at once, then waits behind the gate
    time.sleep(0.05)
    futures = {name: batcher.submit(samples(first, 3), deadline_s)
               for name, first, deadline_s in [("a", 10, 1.5), ("b", 20, 0.6), ("c", 30, 0.9), ("d", 40, 0.6)]}
    gate.set()
    for name, first in [("a", 10), ("b", 20), ("c", 30), ("d", 40)]:
        np.testing.assert_array_equal(futures[name].result(2), samples(first, 3).sum(axis=1, keepdims=True))
    assert blocker.result(2)[0, 0] == 101
    batcher.close()
    order = [int(value) // 10 * 10 for value in devices[0][0].seen]
    assert order == [100, 20, 20, 20, 40, 40, 40, 30, 30, 30, 10, 10, 10], "earliest deadline first"


def test_a_fast_device_takes_bigger_batches_than_a_slow_one():
    recorder = Recorder()
    devices = pool(("fast", 0.0005), ("slow", 0.01))
    gate = hold(devices)
    batcher = Batcher(devices, latency_s=0.2, observer=recorder)
    futures = [batcher.submit(samples(i)) for i in range(60)]
    gate.set()
    for i, future in enumerate(futures):
        assert future.result(2)[0, 0] == i + 1
    batcher.close()
    largest = {name: max((size for device, size in recorder.batches if device == name), default=0)
               for name in ("fast", "slow")}
    assert largest["slow"] <= 20, "the slow device finishes 20 samples at most within 0.2 s"
    assert largest["fast"] > largest["slow"]


def test_a_request_predicted_to_miss_its_deadline_is_rejected_at_once():
    recorder = Recorder()
    devices = pool(("one", 0.01))
    batcher = Batcher(devices, latency_s=0.1, observer=recorder)
    started = time.monotonic()
    with pytest.raises(Rejected, match="even when idle") as refused:
        batcher.submit(samples(0, 50))  # 0.5 s of work for a 0.1 s deadline
    assert time.monotonic() - started < 0.05 and refused.value.retry_after_s == pytest.approx(0.4, abs=0.01)
    gate = hold(devices)
    admitted = [batcher.submit(samples(i, 4), 0.45) for i in range(0, 40, 4)]  # 400 ms of work ahead
    with pytest.raises(Rejected, match="queued ahead") as refused:
        batcher.submit(samples(100, 20), 0.46)  # 200 ms more, after those
    # 600 ms of work against a 460 ms deadline, plus what time passed since the admitted were queued
    assert 0.1 < refused.value.retry_after_s <= 0.16
    gate.set()
    assert all(len(future.result(2)) == 4 for future in admitted)
    batcher.close()
    assert recorder.failures == ["rejected", "rejected"]


def test_what_the_caller_keeps_to_answer_comes_off_the_deadline():
    devices = pool(("one", 0.01))
    batcher = Batcher(devices, latency_s=1.0)
    assert len(batcher.submit(samples(0, 5), 0.1, reserve_s=0.04).result(2)) == 5  # 50 ms of work by 60 ms
    with pytest.raises(Rejected, match="deadline of 100.0 ms, 60.0 ms of it kept to answer"):
        batcher.submit(samples(0, 5), 0.1, reserve_s=0.06)  # 50 ms by 40 ms
    batcher.close()


def test_a_full_queue_rejects_with_the_time_until_there_is_room():
    devices = pool(("one", 0.02))
    gate = hold(devices)
    batcher = Batcher(devices, latency_s=5.0, max_queue=8)
    first = batcher.submit(samples(0, 4))  # the device takes it, then waits behind the gate
    time.sleep(0.05)
    queued = [batcher.submit(samples(i, 4)) for i in (10, 20)]
    with pytest.raises(Rejected, match="queue is full") as refused:
        batcher.submit(samples(30, 2))
    assert 0.04 <= refused.value.retry_after_s <= 0.12, "2 samples (40 ms) after what is left of the batch in flight"
    assert batcher.status()["queued"] == 2 and batcher.status()["queued_samples"] == 8
    gate.set()
    for future in [first, *queued]:
        assert len(future.result(2)) == 4
    batcher.close()


def test_expired_and_cancelled_requests_are_not_computed():
    recorder = Recorder()
    devices = pool(("one", 0.001))
    gate = hold(devices)
    batcher = Batcher(devices, latency_s=1.0, observer=recorder)
    blocker = batcher.submit(samples(0))
    time.sleep(0.05)
    expiring = batcher.submit(samples(10), deadline_s=0.05)
    cancelled = batcher.submit(samples(20))
    kept = batcher.submit(samples(30))
    assert cancelled.cancel()
    time.sleep(0.1)
    gate.set()
    with pytest.raises(Expired):
        expiring.result(2)
    with pytest.raises(CancelledError):
        cancelled.result(2)
    assert kept.result(2)[0, 0] == 31 and blocker.result(2)[0, 0] == 1
    batcher.close()
    assert devices[0][0].seen == [0, 30]
    assert sorted(recorder.failures) == ["cancelled", "expired"]


def test_a_failing_device_leaves_the_pool_and_the_other_answers_its_requests():
    recorder = Recorder()
    devices = pool(("good", 0.001), ("bad", 0.001, 1))
    batcher = Batcher(devices, latency_s=2.0, observer=recorder)
    futures = []
    while batcher.status()["devices"]["bad"]["in"] and len(futures) < 100:  # until the bad device takes one
        futures.append(batcher.submit(samples(2 * len(futures), 2)))
        time.sleep(0.005)
    for i, future in enumerate(futures):
        np.testing.assert_array_equal(future.result(2), samples(2 * i, 2).sum(axis=1, keepdims=True))
    status = batcher.status()
    assert batcher.ready and not status["devices"]["bad"]["in"] and status["devices"]["good"]["in"]
    assert status["devices"]["bad"]["error"] == "bad lost" and recorder.outs == [("bad", "bad lost")]
    assert status["devices"]["good"]["samples"] == 2 * len(futures) and status["devices"]["bad"]["samples"] == 0
    batcher.close()


def test_with_no_device_left_every_request_fails():
    devices = pool(("bad", 0.001, 1))
    batcher = Batcher(devices, latency_s=1.0)
    with pytest.raises(HeteroError, match="no device is left: bad: bad lost"):
        batcher.submit(samples(0)).result(2)
    assert not batcher.ready
    with pytest.raises(HeteroError, match="no device is left"):
        batcher.submit(samples(1))
    batcher.close()


def test_a_request_no_device_finishes_alone_in_time_is_split_over_two():
    recorder = Recorder()
    devices = pool(("a", 0.01), ("b", 0.01))
    batcher = Batcher(devices, latency_s=0.15, observer=recorder)
    inputs = samples(0, 20)  # 200 ms on one device, 100 ms on both
    np.testing.assert_array_equal(batcher.submit(inputs).result(2), inputs.sum(axis=1, keepdims=True))
    batcher.close()
    assert sorted(recorder.batches) == [("a", 10), ("b", 10)]


def test_a_device_slower_than_its_profile_is_predicted_slower():
    devices = pool(("one", 0.003))
    devices = [(devices[0][0], linear(0.001))]  # profiled 3x faster than it runs
    batcher = Batcher(devices, latency_s=2.0)
    for i in range(4):
        batcher.submit(samples(i, 8)).result(2)
    slowdown = batcher.status()["devices"]["one"]["slowdown"]
    batcher.close()
    assert 2.5 < slowdown < 6


def test_a_slowdown_that_refuses_everything_is_forgotten_after_a_while(monkeypatch):
    """Refusing every request computes nothing, so nothing new is learned: old measurements must expire."""
    monkeypatch.setattr(batcher_module, "RECENT_S", 0.3)
    devices = pool(("one", 0.004))
    devices = [(devices[0][0], linear(0.001))]  # profiled 4x faster than it runs
    batcher = Batcher(devices, latency_s=2.0)
    for i in range(4):
        batcher.submit(samples(i, 8)).result(2)
    with pytest.raises(Rejected):  # 8 samples take about 32 ms now; predicted so, they miss 20 ms
        batcher.submit(samples(9, 8), deadline_s=0.02)
    time.sleep(0.4)
    admitted = batcher.submit(samples(9, 8), deadline_s=0.02)  # the profile again: 8 ms predicted
    admitted.result(2)
    batcher.close()


def test_close_drains_what_is_queued_and_in_flight_then_refuses():
    devices = pool(("one", 0.005))
    batcher = Batcher(devices, latency_s=2.0)
    futures = [batcher.submit(samples(i, 5)) for i in range(0, 30, 5)]
    batcher.close(drain=True)
    assert all(future.done() and len(future.result()) == 5 for future in futures)
    assert not batcher.ready
    with pytest.raises(Rejected, match="shutting down"):
        batcher.submit(samples(0))


def test_close_without_drain_fails_what_is_queued():
    devices = pool(("one", 0.001))
    gate = hold(devices)
    batcher = Batcher(devices, latency_s=2.0)
    in_flight = batcher.submit(samples(0))
    time.sleep(0.05)
    queued = batcher.submit(samples(10))
    threading.Timer(0.05, gate.set).start()
    batcher.close(drain=False)
    assert in_flight.result()[0, 0] == 1
    with pytest.raises(HeteroError, match="shut down"):
        queued.result()


def test_a_real_engine_answers_each_request(tmp_path):
    pytest.importorskip("onnx")
    tiny_onnx(tmp_path / "tiny.onnx")
    network = hetero.get_network(str(tmp_path / "tiny.onnx"))
    engine = load_engine(network, hetero.parse_devices("cpu")[0], "tvm")
    x = np.random.default_rng(0).standard_normal((9, *network.input_shape)).astype(np.float32)
    reference, _ = engine.infer(x)
    batcher = Batcher([(engine, linear(0.001))], latency_s=5.0)
    futures = [batcher.submit(x[start:end]) for start, end in [(0, 1), (1, 6), (6, 9)]]
    outputs = np.concatenate([future.result(30) for future in futures])
    batcher.close()
    np.testing.assert_allclose(outputs, reference, rtol=1e-5, atol=1e-5)


def test_requests_of_different_keys_never_share_a_batch():
    """A network served at two sequence lengths: each length's requests run on that length's own engine of the one
    device, batched with requests of that length only, however they arrive."""
    short, long = Sleepy("cpu", 0.001), Sleepy("cpu", 0.002)
    recorder = Recorder()
    gate = hold([(short, None), (long, None)])
    batcher = Batcher({8: [(short, linear(0.001, "cpu"))], 16: [(long, linear(0.002, "cpu"))]}, latency_s=2.0,
                      observer=recorder)
    blocker = batcher.submit(samples(1000), key=8)  # taken at once, then waits behind the gate
    time.sleep(0.05)
    futures = {first: batcher.submit(samples(first, 2), key=8 if first % 20 else 16) for first in range(10, 90, 10)}
    gate.set()
    for first, future in futures.items():
        np.testing.assert_array_equal(future.result(2), samples(first, 2).sum(axis=1, keepdims=True))
    assert blocker.result(2)[0, 0] == 1001
    batcher.close()
    assert sorted(int(value) // 10 * 10 for value in short.seen) == [10, 10, 30, 30, 50, 50, 70, 70, 1000]
    assert sorted(int(value) // 10 * 10 for value in long.seen) == [20, 20, 40, 40, 60, 60, 80, 80]
    assert [size for _, size in recorder.batches] == [1, 8, 8], "each length's requests in one batch of their own"
    assert batcher.status()["devices"]["cpu"]["engine"] == "sleepy"


def test_admission_counts_work_queued_at_another_key_at_what_it_costs():
    """10 samples of a length that costs 30 ms a sample, queued ahead: a request of 250 samples of a length that
    costs 3 ms is predicted done after 300 + 750 ms, not 30 + 750, and refused for a 930 ms deadline. (The costs
    are large enough that a loaded machine's delays leave the admitted requests within their deadlines.)"""
    short, long = Sleepy("cpu", 0.003), Sleepy("cpu", 0.03)
    gate = hold([(short, None), (long, None)])
    batcher = Batcher({8: [(short, linear(0.003, "cpu"))], 16: [(long, linear(0.03, "cpu"))]}, latency_s=3.0)
    blocker = batcher.submit(samples(0), key=8)  # taken at once, then waits behind the gate
    time.sleep(0.05)
    queued = batcher.submit(samples(10, 10), 0.9, key=16)
    with pytest.raises(Rejected, match="after the 10 samples queued ahead of it"):
        batcher.submit(samples(100, 250), 0.93, key=8)
    admitted = batcher.submit(samples(100, 50), 0.93, key=8)
    gate.set()
    assert len(blocker.result(2)) == 1 and len(queued.result(2)) == 10 and len(admitted.result(2)) == 50
    batcher.close()
