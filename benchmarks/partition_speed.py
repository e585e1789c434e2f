"""How long each partitioner takes to split batch 1000 over 8 devices (exact must stay well under 1 ms).

Run from the repository root: python -m benchmarks.partition_speed
"""

from __future__ import annotations

import numpy as np

from hetero.partition import PARTITIONERS, makespan, split_or_single
from hetero.table import Measurement, Profile
from hetero.timer import Timer

BATCH = 1000
PROFILED = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)
# (fixed overhead s, seconds per sample, largest batch that fits or None): a CPU, an iGPU, six GPUs of
# three kinds, two of them short of memory, so the curves have overhead-dominated starts and chunked tails.
DEVICES = [
    (0.002, 0.0100, None),
    (0.004, 0.0040, None),
    (0.006, 0.0010, None),
    (0.006, 0.0011, None),
    (0.005, 0.0009, 64),
    (0.005, 0.0009, 64),
    (0.008, 0.0006, 128),
    (0.008, 0.0006, None),
]


def _profile(index: int, overhead: float, per_sample: float, fits: int | None) -> Profile:
    """A profile as profiling would record it, with a little noise in the repeats."""
    rng = np.random.default_rng(index)
    measurements = []
    for batch in PROFILED:
        if fits is not None and batch > fits:
            measurements.append(Measurement(batch, [], [], [], error="out of memory"))
            break
        runs = (overhead + per_sample * batch) * rng.normal(1, 0.02, size=5)
        measurements.append(Measurement(batch, runs.tolist(), [1e-5 * batch] * 5, [1e-6 * batch] * 5))
    return Profile(f"device {index}", "resnet-18", measurements)


def main() -> None:
    costs = [_profile(i, *device).cost_curve(BATCH) for i, device in enumerate(DEVICES)]
    print(f"batch {BATCH} over {len(costs)} devices (median of 50 repeats)")
    runs = dict(PARTITIONERS)
    runs["exact, or the best device alone (what Inference.py runs)"] = lambda c, b: split_or_single(c, b, "exact")
    for name, partition in runs.items():
        number = 1 if name == "greedy" else 20
        seconds = Timer(lambda: partition(costs, BATCH), name).timeit(50, warmup=0, number=number).median
        shares = partition(costs, BATCH)
        print(
            f"{name:>6}: {seconds * 1e6:8.1f} us per call, "
            f"makespan {makespan(costs, shares) * 1e3:.2f} ms, shares {shares}"
        )


if __name__ == "__main__":
    main()
