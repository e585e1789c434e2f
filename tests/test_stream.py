"""Streams: every device pulls chunks of one input until none are left; outputs in input order, resumable."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

import hetero
from hetero.engines import load_engine
from hetero.errors import HeteroError
from hetero.session import stream
from hetero.stream import PARTIAL, PROGRESS

from .conftest import ROOT, SMALL_NETWORK
from .test_models import tiny_onnx, tiny_reference
from .test_reliability import FaultyEngine

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    weights = tiny_onnx(folder / "tiny.onnx")
    return folder / "tiny.onnx", weights


@pytest.fixture(scope="module")
def two_cpus():
    cpu = hetero.parse_devices("cpu")[0]
    return [dataclasses.replace(cpu, name=f"cpu-{x}", threads=1) for x in "ab"]


def _inputs(path, samples, seed=0):
    x = np.random.default_rng(seed).standard_normal((samples, 3, 8, 8)).astype(np.float32)
    np.save(path, x)
    return x


def test_a_stream_over_two_devices_writes_every_output_in_order(tmp_path, tiny, two_cpus):
    model, weights = tiny
    x = _inputs(tmp_path / "x.npy", 5000)
    report = stream(str(model), two_cpus, tmp_path / "x.npy", tmp_path / "y.npy", table=tmp_path / "t.json",
                    profile_batches=[1, 8, 64], progress=False)
    y = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(y, tiny_reference(x, weights), rtol=1e-4, atol=1e-4)
    assert report.computed == 5000 and sum(d.samples for d in report.devices) == 5000
    assert all(d.samples for d in report.devices), "both devices pulled chunks"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.json.lock", "x.npy", "y.npy"]


def test_a_stream_equals_one_split_sample_by_sample(tmp_path, tiny, two_cpus):
    model, _ = tiny
    x = _inputs(tmp_path / "x.npy", 300, seed=4)
    split = hetero.infer(str(model), two_cpus, inputs=x, table=tmp_path / "t.json", profile_batches=[1, 8],
                         progress=False).outputs
    streamed = stream(str(model), two_cpus, x, table=tmp_path / "t.json", profile_batches=[1, 8],
                      progress=False).outputs
    np.testing.assert_array_equal(streamed, split)


def test_arrays_arriving_in_pieces_come_out_in_order(tmp_path, tiny):
    model, weights = tiny
    pieces = [np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)
              for seed, n in enumerate((7, 130, 1))]
    outputs = list(hetero.stream_arrays(str(model), "cpu", iter(pieces), table=tmp_path / "t.json",
                                        profile_batches=[1, 8], progress=False))
    assert [len(out) for out in outputs] == [7, 130, 1]
    for piece, out in zip(pieces, outputs):
        np.testing.assert_allclose(out, tiny_reference(piece, weights), rtol=1e-4, atol=1e-4)


def test_a_device_failing_mid_stream_loses_nothing(tmp_path, tiny, two_cpus):
    model, weights = tiny
    x = _inputs(tmp_path / "x.npy", 3000, seed=2)
    network = hetero.get_network(str(model))

    class FailsOnItsThirdChunk(FaultyEngine):
        """Profiles like any engine, then fails on the third chunk it streams."""

        def __init__(self, net, device):
            chunks = iter(range(10**9))
            super().__init__(net, device, lambda batch: RuntimeError("lost") if self.streaming and next(chunks) == 2
                             else None)
            self.streaming = False

        def prepare(self, samples, limit=None):
            super().prepare(samples, limit)
            self.streaming = True

    def load(net, device):
        return FailsOnItsThirdChunk(net, device) if device.name == "cpu-a" else FaultyEngine(net, device)

    report = stream(network, two_cpus, tmp_path / "x.npy", tmp_path / "y.npy", table=tmp_path / "t.json",
                    profile_batches=[1, 8, 64], progress=False, load=load)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), tiny_reference(x, weights), rtol=1e-4, atol=1e-4)
    assert [f.device for f in report.faults] == ["cpu-a"] and "lost" in report.faults[0].error


LONG = 20000  # samples of the long stream: ten times the short one's


def test_host_memory_stays_flat_however_long_the_stream(tmp_path, tiny):
    model, _ = tiny
    cpu = hetero.parse_devices("cpu")
    peaks = []
    for samples in (2000, LONG):
        _inputs(tmp_path / f"x{samples}.npy", samples)
    stream(str(model), cpu, tmp_path / "x2000.npy", tmp_path / "warm.npy", table=tmp_path / "t.json",
           profile_batches=[1, 64], progress=False)  # engines built and profiled outside the measurement
    for samples in (2000, LONG):
        tracemalloc.start()
        stream(str(model), cpu, tmp_path / f"x{samples}.npy", tmp_path / f"y{samples}.npy",
               table=tmp_path / "t.json", profile_batches=[1, 64], progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    input_bytes = LONG * 3 * 8 * 8 * 4  # a twentieth of the long stream's input: far more than its chunks hold
    assert peaks[1] < peaks[0] + input_bytes / 20, f"peak host memory grew with the stream: {peaks}"


def test_an_output_of_another_run_is_not_resumed(tmp_path, tiny):
    model, _ = tiny
    _inputs(tmp_path / "x.npy", 100)
    (tmp_path / f"y.npy{PROGRESS}").write_text(json.dumps({"identity": {"network": "other"}, "done": [[0, 50]]}))
    with pytest.raises(HeteroError, match="earlier run into this output had another network or input"):
        stream(str(model), "cpu", tmp_path / "x.npy", tmp_path / "y.npy", table=tmp_path / "t.json",
               profile_batches=[1], progress=False)


def test_a_killed_stream_resumes_where_it_stopped(tmp_path):
    """The process is killed (SIGKILL) mid-stream; the same command then computes only what was not recorded,
    and the output equals a run that was never interrupted."""
    network = hetero.get_network(SMALL_NETWORK)
    x = network.random_input(40, seed=3)
    np.save(tmp_path / "x.npy", x)
    command = [sys.executable, str(ROOT / "Inference.py"), "--network", SMALL_NETWORK, "--input",
               str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"), "--stream", "--table",
               str(tmp_path / "t.json"), "--profile-batches", "1,2", "--no-progress", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    record = tmp_path / f"y.npy{PROGRESS}"
    deadline = time.monotonic() + 240
    while first.poll() is None and time.monotonic() < deadline:
        if record.exists() and json.loads(record.read_text() or "{}").get("done"):
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, "the stream ended before it could be killed"
    done = sum(end - start for start, end in json.loads(record.read_text())["done"])
    assert 0 < done < 40 and not (tmp_path / "y.npy").exists() and (tmp_path / f"y.npy{PARTIAL}").exists()

    second = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert report["resumed"] == done and report["computed"] == 40 - done, "no recorded sample computed again"
    reference, _ = load_engine(network, hetero.parse_devices("cpu")[0]).infer(x)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), reference, rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.json.lock", "x.npy", "y.npy"]
