"""Where a GPU stream's time goes: the host's copy rates, the link's upload rate, and a stream's own
record of how long the GPU uploaded and computed (CUDA events) against its wall time.

    python -m benchmarks.feed_profile --network resnet-50 --samples 8192

Prints, per stream: img/s, the GPU's computing and uploading time as shares of the stream's wall time,
and the chunk size; before that, one thread's and several threads' copy into page-locked memory (float32
to float32 and to float16) and one upload of the same bytes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import hetero
from hetero.benchmark import host_array
from hetero.devices import with_precision
from hetero.engines.base import ParallelCopy


def rate(seconds: float, nbytes: int) -> str:
    return f"{nbytes / seconds / 1e9:.1f} GB/s"


def copies(samples: np.ndarray) -> None:
    pinned = torch.empty(samples.shape, dtype=torch.float32, pin_memory=True)
    half = torch.empty(samples.shape, dtype=torch.float16, pin_memory=True)
    for threads in (1, 4, 8):
        copy = ParallelCopy(threads, "probe")
        for name, target in (("float32", pinned.numpy()), ("float16", half.numpy())):
            copy(target, samples)
            begun = time.perf_counter()
            copy(target, samples)
            print(f"copy into page-locked {name}, {threads} threads: {rate(time.perf_counter() - begun, samples.nbytes)}")
        copy.shutdown()
    device = torch.empty_like(pinned, device="cuda")
    for _ in range(2):
        torch.cuda.synchronize()
        begun = time.perf_counter()
        device.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()
    print(f"upload from page-locked memory: {rate(time.perf_counter() - begun, samples.nbytes)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--network", default="resnet-50")
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--table", default="/tmp/feed-profile.json")
    args = parser.parse_args()
    net = hetero.get_network(args.network)
    inputs = host_array(net, args.samples)
    copies(inputs[:445])
    gpu = with_precision(hetero.parse_devices("gpu0"), "fp16")
    for run in range(3):
        report = hetero.stream(net, gpu, inputs, table=args.table, profile_batches=[1, 16, 64, 256], budget_s=4,
                               progress=False, engine="torch-compile")
        device = report.devices[0]
        print(f"{args.network} stream {run}: {report.throughput:.0f} img/s; GPU computing "
              f"{device.timing.exec_s / report.wall_s:.0%} and uploading {device.timing.h2d_s / report.wall_s:.0%} "
              f"of {report.wall_s:.2f} s; {device.chunks} chunks of {device.chunk}", flush=True)


if __name__ == "__main__":
    main()
