"""The data path: a device's loop keeps its engine's calls in flight, hands it views of the input, delivers
outputs in order, gives back what a failing engine did not finish, and shares the end of a queue fairly."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

import hetero
from hetero.engines import Engine, Timing
from hetero.engines.tvm import TVMEngine
from hetero.errors import UnreadableInput
from hetero.feed import ChunkSizer, DeviceStream, WorkQueue, feed

from .test_models import tiny_onnx


class Deferred:
    def __init__(self, engine, batch):
        self.engine, self.batch = engine, batch

    def result(self):
        self.engine.open -= 1
        self.engine.results += 1
        if self.engine.fail_at == self.engine.results:
            raise RuntimeError("device lost")
        return self.batch[:, :2] * 2, Timing(0.0, 0.0, 0.0)


class Overlapping(Engine):
    """Computes at result(): counts the calls open at once and keeps every batch it was launched with."""

    name = "overlapping"
    package = "none"
    version = "1"

    def __init__(self, in_flight=3, fail_at=None):
        super().__init__(SimpleNamespace(output_shape=(2,), dtype="float32", input_shape=(3,),
                                         input_dtype=np.dtype("float32"), output_dtype=np.dtype("float32")),
                         SimpleNamespace(name="fake"))
        self.in_flight, self.fail_at = in_flight, fail_at
        self.open = self.most_open = self.results = 0
        self.launched = []

    def run(self, batch):
        raise AssertionError("the feed launches calls")

    def launch(self, batch):
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        self.launched.append(batch)
        return Deferred(self, batch)


def _feed(engine, source, chunk, queue=None, read=None):
    queue = queue or WorkQueue([(0, len(source))])
    delivered = []
    stats = DeviceStream("fake", engine.name, chunk)
    feed(engine, queue, read or (lambda start, end: source[start:end]),
         lambda start, end, out: delivered.append((start, end, out.copy())), stats,
         ChunkSizer(chunk, chunk, 0, adaptive=False))
    return delivered, stats, queue


def test_the_feed_keeps_calls_in_flight_on_views_of_the_input_and_delivers_in_order():
    source = np.arange(300, dtype=np.float32).reshape(100, 3)
    engine = Overlapping(in_flight=3)
    delivered, stats, _ = _feed(engine, source, 7)
    assert engine.most_open == 3
    assert all(np.shares_memory(batch, source) for batch in engine.launched), "inputs are sliced, not copied"
    assert [start for start, _, _ in delivered] == list(range(0, 100, 7))
    np.testing.assert_array_equal(np.concatenate([out for _, _, out in delivered]), source[:, :2] * 2)
    assert stats.samples == 100 and stats.chunks == 15 and stats.error is None


def test_a_failing_engine_gives_back_every_range_it_did_not_deliver():
    source = np.zeros((50, 3), np.float32)
    delivered, stats, queue = _feed(Overlapping(in_flight=3, fail_at=3), source, 5)
    assert stats.error == "device lost" and [s for s, _, _ in delivered] == [0, 5]
    assert queue.left() == [(10, 15), (15, 20), (20, 25), (25, 50)]


def test_an_unreadable_input_stops_the_queue_and_keeps_its_range():
    source = np.zeros((40, 3), np.float32)

    def read(start, end):
        if start == 20:
            raise UnreadableInput("image 20 does not decode")
        return source[start:end]

    queue = WorkQueue([(0, 40)])
    with pytest.raises(UnreadableInput):
        _feed(Overlapping(in_flight=2), source, 10, queue, read)
    assert queue.take(10, wait=False) is None, "stopped"
    assert queue.left()[0] == (20, 30)


def test_near_the_end_each_device_takes_its_part_of_what_is_left_by_its_throughput():
    queue = WorkQueue([(0, 1000)])
    queue.report("gpu", 990.0)
    queue.report("cpu", 10.0)
    assert queue.take(64, device="cpu") == (0, 10), "1% of what is left"
    assert queue.take(2000, device="gpu") == (10, 991), "99% of what is left, rounded up"
    queue = WorkQueue([(0, 50)])
    queue.report("gpu", 990.0)
    queue.report("cpu", 10.0)
    assert queue.take(64, wait=False, device="cpu") is None, "the GPU would finish its part sooner"
    assert queue.take(64, wait=False, device="gpu") == (0, 50)
    queue = WorkQueue([(0, 1)])
    queue.report("a", 5.0)
    queue.report("b", 5.0)
    assert queue.take(8, wait=False, device="a") == (0, 1), "the fastest always takes one"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_onnx(folder / "tiny.onnx")
    return hetero.get_network(str(folder / "tiny.onnx"))


def test_a_split_and_a_stream_hand_every_engine_views_of_the_callers_array(tmp_path, tiny, monkeypatch):
    """One data path: hetero.infer's split and hetero.stream both feed engines slices of the input."""
    launched = []
    original = TVMEngine.launch

    def spy(self, batch):
        launched.append(batch)
        return original(self, batch)

    monkeypatch.setattr(TVMEngine, "launch", spy)
    cpu = hetero.parse_devices("cpu")[0]
    devices = [dataclasses.replace(cpu, name=f"cpu-{x}", threads=1) for x in "ab"]
    x = np.random.default_rng(0).standard_normal((600, 3, 8, 8)).astype(np.float32)
    split = hetero.infer(tiny, devices, inputs=x, table=tmp_path / "t.json", profile_batches=[1, 8, 64],
                         progress=False)
    from_split = [b for b in launched if np.shares_memory(b, x)]
    before = len(launched)
    streamed = hetero.stream(tiny, devices, x, table=tmp_path / "t.json", profile_batches=[1, 8, 64], progress=False)
    from_stream = [b for b in launched[before:] if np.shares_memory(b, x)]
    assert sum(map(len, from_split)) == 600, "the split's calls were slices of x"
    assert sum(map(len, from_stream)) == 600, "the stream's calls were slices of x"
    np.testing.assert_allclose(streamed.outputs, split.outputs, rtol=1e-5, atol=1e-5)
