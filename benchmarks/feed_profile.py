"""Where a GPU stream's time goes: the host's copy rates, the link's upload rates (from page-locked,
pageable and registered memory), and a traced stream: each call's host stages (launched, staged, queued)
and GPU stages (upload, compute, download, from CUDA events) on one clock.

    python -m benchmarks.feed_profile --network resnet-50 --samples 8192

Prints the rates, then per stream: img/s, the GPU's computing and uploading time as shares of the wall
time, the compute stream's idle gaps between calls and what each waited for, and a few calls' timelines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import hetero
from hetero.benchmark import host_array
from hetero.devices import Device, with_precision
from hetero.engines.base import ParallelCopy
from hetero.engines.pytorch import CudaPipeline, TorchCompileEngine
from hetero.models import Network
from hetero.timer import Timer


def rate(seconds: float, nbytes: int) -> str:
    return f"{nbytes / seconds / 1e9:.1f} GB/s"


def timed(action: Callable[[], object]) -> float:
    """The median seconds of `action` over 3 calls after one untimed, the GPU synchronized after each."""
    return Timer(action, sync=torch.cuda.synchronize).timeit(3).median


def copies(chunk: np.ndarray) -> None:
    pinned = torch.empty(chunk.shape, dtype=torch.float32, pin_memory=True)
    half = torch.empty(chunk.shape, dtype=torch.float16, pin_memory=True)
    for threads in (1, 2, 4, 8, 12):
        copy = ParallelCopy(threads, "probe")
        for name, target in (("float32", pinned.numpy()), ("float16", half.numpy())):
            seconds = timed(lambda: copy(target, chunk))  # noqa: B023 -- called before the loop moves on
            print(f"copy {chunk.nbytes >> 20} MiB into page-locked {name}, {threads} threads: {rate(seconds, chunk.nbytes)}")
        copy.shutdown()


def uploads(chunk: np.ndarray, whole: np.ndarray) -> None:
    pinned = torch.empty(chunk.shape, dtype=torch.float32, pin_memory=True)
    device = torch.empty_like(pinned, device="cuda")
    print(f"upload from page-locked memory: {rate(timed(lambda: device.copy_(pinned, non_blocking=True)), chunk.nbytes)}")
    pageable = torch.from_numpy(chunk)
    print(f"upload from pageable memory: {rate(timed(lambda: device.copy_(pageable, non_blocking=True)), chunk.nbytes)}")
    halves = torch.from_numpy(chunk[: len(chunk) // 2]), torch.from_numpy(chunk[len(chunk) // 2 :])
    with ThreadPoolExecutor(2) as pool:
        seconds = timed(lambda: [done.result() for done in (pool.submit(device[: len(halves[0])].copy_, halves[0]),
                                                            pool.submit(device[len(halves[0]) :].copy_, halves[1]))])
    print(f"upload from pageable memory, two threads: {rate(seconds, chunk.nbytes)}")
    cudart = torch.cuda.cudart()
    for name, array in (("one chunk", chunk), ("the whole input", whole)):
        pointer, nbytes = array.ctypes.data, array.nbytes
        begun = time.perf_counter()
        error = cudart.cudaHostRegister(pointer, nbytes, 0)
        registered_s = time.perf_counter() - begun
        if int(error) != 0:
            print(f"cudaHostRegister of {name} failed: {error}")
            continue
        if array is chunk:
            seconds = timed(lambda: device.copy_(pageable, non_blocking=True))
            print(f"upload from registered memory: {rate(seconds, chunk.nbytes)}")
        begun = time.perf_counter()
        cudart.cudaHostUnregister(pointer)
        print(f"cudaHostRegister of {name} ({nbytes >> 20} MiB): {registered_s * 1e3:.1f} ms "
              f"({rate(registered_s, nbytes)}); unregister {(time.perf_counter() - begun) * 1e3:.1f} ms")


def report_trace(pipeline: CudaPipeline, wall_s: float) -> None:
    """The compute stream's idle time between calls, split by what the next call was waiting for: its GPU
    work queued after the previous computation ended (the host copy not done, or the launcher late), else
    its upload."""
    calls = [(trace, [pipeline.gpu_ms(mark) for mark in trace.marks[:4]]) for trace in pipeline.trace]
    waits = {"its upload": 0.0, "its staging (host copy)": 0.0, "the launcher": 0.0}
    for (_, before), (trace, marks) in zip(calls, calls[1:]):
        gap = marks[2] - before[3]
        if gap > 0.05:
            late = trace.queued_ms > before[3]
            waits["its staging (host copy)" if late and trace.staged_ms > before[3] else
                  "the launcher" if late else "its upload"] += gap
    compute = sum(marks[3] - marks[2] for _, marks in calls)
    upload = sum(marks[1] - marks[0] for _, marks in calls)
    staging = statistics.median(trace.staged_ms - trace.launched_ms for trace, _ in calls)
    print(f"  traced {len(calls)} calls over {wall_s * 1e3:.0f} ms: computing {compute:.0f} ms, uploading "
          f"{upload:.0f} ms, median staging {staging:.1f} ms; compute idle between calls: "
          + ", ".join(f"waiting for {what} {ms:.0f} ms" for what, ms in waits.items()))
    print("  call: launched, staged, queued (host ms) | upload start-end, compute start-end (GPU ms)")
    for index, (trace, marks) in enumerate(calls[8:16], start=8):
        print(f"  {index:3d}: {trace.launched_ms:8.1f} {trace.staged_ms:8.1f} {trace.queued_ms:8.1f} | "
              f"{marks[0]:8.1f}-{marks[1]:8.1f} {marks[2]:8.1f}-{marks[3]:8.1f}")


def streams(net: Network, samples: int, table: str) -> None:
    """Three streams of `samples` per way of staging (a page-locked copy in float32 or float16), the last
    traced; then the engine's throughput on resident inputs. (Uploading from the caller's pages locked in place
    is measured above for the link alone: the stream's copy threads already keep the GPU computing.)"""
    inputs = host_array(net, samples)
    gpu = with_precision(hetero.parse_devices("gpu0"), "fp16")
    rates: dict[str, float] = {}
    for staging in ("copy", "half"):
        os.environ["HETERO_STAGING"] = staging
        engines: list[TorchCompileEngine] = []

        def load(network: Network, device: Device) -> TorchCompileEngine:
            engines.append(TorchCompileEngine(network, device))  # noqa: B023 -- used within this iteration
            return engines[-1]  # noqa: B023

        options = hetero.Options(table=table, profile_batches=(1, 16, 64, 256), budget_s=4, progress=False, load=load)
        with hetero.Session(net, gpu, options) as session:
            for run in range(3):
                pipeline = engines[-1].pipeline if engines else None
                if pipeline is not None and run == 2:
                    pipeline.start_trace()
                report = session.stream(inputs)
                device = report.devices[0]
                print(f"{net.name} stream ({staging}) {run}: {report.throughput:.0f} img/s; GPU computing "
                      f"{device.timing.exec_s / report.wall_s:.0%} and uploading "
                      f"{device.timing.h2d_s / report.wall_s:.0%} of {report.wall_s:.2f} s; "
                      f"{device.chunks} chunks of {device.chunk}", flush=True)
                if pipeline is not None and pipeline.trace:
                    report_trace(pipeline, report.wall_s)
                if run:
                    rates[staging] = max(rates.get(staging, 0.0), report.throughput)
            if staging == "copy":
                print(f"{net.name} resident, 256 a call: {engines[-1].resident_throughput(256):.0f} img/s")
            engines[-1].close()
    print(f"fastest staging: {max(rates, key=rates.__getitem__)} (" + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
          + " img/s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--network", default="resnet-50")
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--table", default="/tmp/feed-profile.json")
    parser.add_argument("--streams-only", action="store_true")
    args = parser.parse_args()
    net = hetero.get_network(args.network)
    if not args.streams_only:
        whole = host_array(net, 4096)
        copies(whole[:256])
        uploads(np.ascontiguousarray(whole[:256]), whole)
    streams(net, args.samples, args.table)


if __name__ == "__main__":
    main()
