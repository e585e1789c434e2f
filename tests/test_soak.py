"""Soak: 100 split runs in one process on the CPU, every fifth with a device failing, leak neither memory nor threads."""

import dataclasses
import gc
import itertools
import threading

import numpy as np
import psutil

import hetero
from hetero.engines import load_engine

from .conftest import SMALL_NETWORK
from .test_reliability import FaultyEngine, linear_profile, numbered, run_engines, table_with

WARMUP = 20  # runs before the baseline: allocator pools, TVM's workspace and the worker threads settle
RUNS = 100
# What the process may grow by over RUNS runs: measured growth is under 0.1 MiB (over 800 runs too), while
# keeping even one input sample (0.6 MB) per run would add 60 MB.
RSS_TOLERANCE = 4 * 2**20
NATIVE_LATE_WORKERS = 2


def test_split_runs_do_not_grow_memory_or_threads(tmp_path):
    network = hetero.get_network(SMALL_NETWORK)
    cpu = hetero.parse_devices("cpu")[0]
    devices = [dataclasses.replace(cpu, name=f"cpu-{x}", hardware=f"{cpu.hardware} {x}", threads=1) for x in "ab"]
    calls = itertools.count(1)
    flaky = FaultyEngine(network, devices[0], lambda batch: RuntimeError("injected") if next(calls) % 5 == 0 else None)
    steady = FaultyEngine(network, devices[1])
    table = table_with(tmp_path, *(linear_profile(d, network) for d in devices))
    inputs = numbered(network, 2)
    reference, _ = load_engine(network, cpu).infer(inputs)
    process = psutil.Process()
    faults = 0

    def soak(runs: int) -> None:
        nonlocal faults
        for _ in range(runs):
            report = run_engines(network, [flaky, steady], inputs, table.path)
            np.testing.assert_allclose(report.outputs, reference, rtol=1e-4, atol=1e-5)
            faults += len(report.faults)

    try:
        soak(WARMUP)
        gc.collect()
        rss, threads, os_threads = process.memory_info().rss, threading.active_count(), process.num_threads()
        soak(RUNS)
        gc.collect()
        grown = process.memory_info().rss - rss
        assert grown < RSS_TOLERANCE, f"RSS grew by {grown / 2**20:.1f} MiB over {RUNS} runs"
        # Threads left by earlier tests may end meanwhile, so the count may fall, never rise; a native pool
        # (OpenMP's, TVM's) may still start a worker late, where a thread kept per run or per failure would
        # add at least RUNS // 5.
        assert threading.active_count() <= threads, "Python threads leaked"
        assert process.num_threads() <= os_threads + NATIVE_LATE_WORKERS, "OS threads leaked"
        assert faults == (WARMUP + RUNS) // 5, "every fifth run had its failure recovered"
    finally:
        flaky.close()
        steady.close()
