"""How a batch of images reaches a CUDA GPU: pageable copy against hetero's page-locked staging.

Side by side in one run, for each batch size: a fresh device tensor filled from the numpy array
(what an engine did before staging: the driver copies pageable memory through its own bounce
buffer) against `hetero.execute.BatchBuffer`s (copy into reused page-locked memory, spread over
threads, then one DMA into a reused device buffer). Prints ms per upload, GB/s and the ratio.

    python -m benchmarks.gpu_upload [--batches 1,16,64,128] [--repeats 20] [--gpu 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import tvm

from hetero.execute import BatchBuffer, staging_device


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16,64,128")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--gpu", type=int, default=0)
    args = parser.parse_args()
    gpu = tvm.cuda(args.gpu)
    sample = (3, 224, 224)
    staging, on_device = BatchBuffer(staging_device(gpu), sample, "float32"), BatchBuffer(gpu, sample, "float32")
    print(f"{gpu.device_name}: upload of float32 {sample} images, median of {args.repeats}")
    print("batch | MB | pageable ms | staged ms | pageable GB/s | staged GB/s | pageable/staged")
    for batch in (int(b) for b in args.batches.split(",")):
        images = np.random.default_rng(0).standard_normal((batch, *sample), dtype=np.float32)

        def pageable():
            tvm.runtime.tensor(images, gpu)
            gpu.sync()

        def staged():
            on_device.view(batch).copyfrom(staging.fill(images))
            gpu.sync()

        staged()
        np.testing.assert_array_equal(on_device.view(batch).numpy(), images)
        old, new = _median_seconds(pageable, args.repeats), _median_seconds(staged, args.repeats)
        gigabytes = images.nbytes / 1e9
        print(f"{batch} | {images.nbytes / 1e6:.1f} | {old * 1e3:.2f} | {new * 1e3:.2f} | "
              f"{gigabytes / old:.1f} | {gigabytes / new:.1f} | {old / new:.2f}")


if __name__ == "__main__":
    main()
