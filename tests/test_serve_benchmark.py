"""The serving benchmark (python -m hetero.serve.benchmark): its load generator's statistics on fake targets whose
latencies are known, and one short sweep point against a real hetero server on a tiny network."""

import math
import re
import time

import numpy as np
import pytest

from hetero.serve.loadgen import Outcome, Rejected, closed_loop, open_loop, poisson_arrivals, summarize


def test_summarize_counts_percentiles_over_answers_and_goodput_within_the_deadline():
    answered = [Outcome(ms / 1e3, "ok") for ms in range(1, 101)]  # 1..100 ms
    outcomes = answered + [Outcome(0.0001, "rejected")] * 20 + [Outcome(0.2, "error")] * 5
    stats = summarize("4 clients", outcomes, seconds=2.0, request_batch=3, deadline_s=0.050)
    assert (stats.sent, stats.ok, stats.rejected, stats.errors, stats.good) == (125, 100, 20, 5, 50)
    assert stats.p50_ms == pytest.approx(50.5) and stats.p95_ms == pytest.approx(95.05)
    assert stats.p99_ms == pytest.approx(99.01)
    assert stats.throughput == pytest.approx(100 * 3 / 2) and stats.goodput == pytest.approx(50 * 3 / 2)
    assert stats.good_fraction == pytest.approx(50 / 125)
    empty = summarize("1/s", [Outcome(0.0, "rejected")], 1.0, 1, 0.05)
    assert empty.ok == 0 and math.isnan(empty.p99_ms) and empty.goodput == 0 and empty.good_fraction == 0


def _fake(latency_s: float, reject_every: int = 0):
    """A target answering each request after `latency_s`, and turning every `reject_every`-th away."""
    count = [0]

    def make():
        def send():
            count[0] += 1
            if reject_every and count[0] % reject_every == 0:
                raise Rejected("429")
            if count[0] % 7 == 0:
                raise ConnectionError("reset")
            time.sleep(latency_s)
        return send
    return make


def test_closed_loop_keeps_each_client_busy_and_counts_failures():
    outcomes, seconds = closed_loop(_fake(0.01, reject_every=5), clients=4, seconds=0.5)
    stats = summarize("4 clients", outcomes, seconds, 1, deadline_s=0.05)
    # 4 clients, each ~10 ms an answered request for 0.5 s (failures are instant): ~200 answers at most
    assert 80 < stats.ok < 220 and stats.rejected > 0 and stats.errors > 0
    assert 9 < stats.p50_ms < 40 and stats.good == stats.ok and 0.4 < seconds < 1.0


def test_open_loop_sends_at_the_arrival_rate_and_counts_waiting_for_a_worker():
    arrivals = poisson_arrivals(200, 2.0, seed=1)
    assert 330 < len(arrivals) < 470 and np.all(np.diff(arrivals) > 0) and arrivals[-1] < 2.0
    outcomes, _ = open_loop(_fake(0.005), rate=100, seconds=0.5, workers=8)
    assert 25 < len(outcomes) < 90
    # one worker for requests 50 ms apart on average, each taking 100 ms: the queue grows, and latency with it
    slow, _ = open_loop(_fake(0.1), rate=20, seconds=0.5, workers=1)
    latencies = [o.latency_s for o in slow if o.status == "ok"]
    assert max(latencies) > 0.15


def test_one_sweep_point_against_a_real_server(tmp_path):
    pytest.importorskip("tritonclient.http")
    pytest.importorskip("uvicorn")
    from hetero.serve.benchmark import hetero_server, plain_loop, triton_target

    from .test_models import tiny_onnx

    tiny_onnx(tmp_path / "tiny.onnx")
    args = type("Args", (), {"network": str(tmp_path / "tiny.onnx"), "latency_ms": 5000.0, "engine": "onnxruntime",
                             "table": str(tmp_path / "table.json"), "profile_batches": [1, 8], "seconds": 0.5,
                             "sequence_length": None})()
    x = np.zeros((2, 3, 8, 8), np.float32)
    with hetero_server(args, "cpu") as (http_address, _, line):
        assert "tiny" in line
        outcomes, seconds = closed_loop(triton_target("http", http_address, "tiny", {"input": x}, ["output"]), 2, 1.0)
    stats = summarize("2 clients", outcomes, seconds, 2, 5.0)
    assert stats.ok > 5 and stats.errors == stats.rejected == 0 and stats.good == stats.ok
    # the ceiling beside it: the same engine in its plain loop, in calls of its largest profiled batch
    ceiling = plain_loop(args, "cpu")
    samples_s = float(re.search(r"calls of 8 samples \(its largest profiled\), no server: ([\d.]+) samples/s", ceiling)[1])
    assert "cpu's onnxruntime engine" in ceiling and samples_s > 0
