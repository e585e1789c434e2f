"""How a batch of images reaches a CUDA GPU: pageable copy against hetero's page-locked staging.

Side by side in one run, for each batch size: a fresh device tensor filled from the numpy array
(the driver copies pageable memory through its own bounce buffer) against hetero's
`BatchBuffer`s (rows copied into reused page-locked memory by N threads, then one DMA into a reused
device buffer), for several N, the engine's own `copy_threads()` among them. Prints ms per upload
and GB/s.

    python -m benchmarks.gpu_upload [--batches 1,16,64,128] [--threads 1,2,4,8] [--repeats 20] [--gpu 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import tvm

from hetero.engines import copy_threads
from hetero.engines.tvm import BatchBuffer, ParallelCopy, staging_device
from hetero.timer import Timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16,64,128")
    parser.add_argument("--threads", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--gpu", type=int, default=0)
    args = parser.parse_args()
    gpu = tvm.cuda(args.gpu)
    sample = (3, 224, 224)
    staging, on_device = BatchBuffer(staging_device(gpu), sample, "float32"), BatchBuffer(gpu, sample, "float32")
    counts = sorted({int(t) for t in args.threads.split(",")} | {copy_threads()})
    copiers = {n: ParallelCopy(n, f"upload-{n}") for n in counts}
    print(f"{gpu.device_name}: upload of float32 {sample} images, median of {args.repeats}; "
          f"hetero's engines copy with {copy_threads()} threads here")
    print("batch | MB | pageable ms (GB/s) | " + " | ".join(f"staged, {n} threads, ms (GB/s)" for n in counts))
    for batch in (int(b) for b in args.batches.split(",")):
        images = np.random.default_rng(0).standard_normal((batch, *sample), dtype=np.float32)

        def pageable():
            tvm.runtime.tensor(images, gpu)
            gpu.sync()

        def staged(copy):
            on_device.view(batch).copyfrom(staging.fill(images, copy))
            gpu.sync()

        cells = []
        for fn in [pageable] + [lambda copy=copiers[n]: staged(copy) for n in counts]:
            seconds = Timer(fn).timeit(args.repeats).median
            cells.append(f"{seconds * 1e3:.2f} ({images.nbytes / 1e9 / seconds:.1f})")
        np.testing.assert_array_equal(on_device.view(batch).numpy(), images)
        print(f"{batch} | {images.nbytes / 1e6:.1f} | " + " | ".join(cells))
    for copy in copiers.values():
        copy.shutdown()


if __name__ == "__main__":
    main()
