"""Measure how long a device takes per sample at each batch size, the numbers the partitioner plans with.

Execution and host-device copies are timed apart, after a warm-up run, as medians of repeats. Slow
devices stay practical: once a device has spent its time budget and its per-sample time has
flattened, larger batches are predicted from the last ones instead of measured. A size that fails
(out of memory, say) is recorded with its reason and caps the batch the device is given per call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tvm
from tqdm import tqdm

from .devices import Device
from .engines import Engine
from .errors import one_line
from .models import Network
from .table import Measurement, Profile
from .timer import SETTLE_S, Timer, interleave

SEED_BATCHES = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)
MIN_REPEATS = 3
MAX_REPEATS = 10
SECONDS_PER_SIZE = 1.0  # keep repeating a size until this much time is spent (or MAX_REPEATS)
FLAT = 0.10  # per-sample times within 10% of each other count as flattened
HARD_LIMIT = 4  # beyond this many budgets a device stops growing the batch even if not flat
PROBE_LARGEST = 16  # the larger probe size, at most: large enough to show a GPU engine's throughput, small
# enough that a CPU probes resnet-50 in seconds


def measure_batch(engine: Engine, batch: int) -> Measurement:
    """Time one batch size: one warm-up run, then repeats; a failure is recorded, not raised."""
    try:
        inputs = engine.network.random_input(batch)
        engine.infer(inputs)
        timings = []
        spent = 0.0
        while len(timings) < MIN_REPEATS or (spent < SECONDS_PER_SIZE and len(timings) < MAX_REPEATS):
            _, timing = engine.infer(inputs)
            timings.append(timing)
            spent += timing.total_s
    except Exception as exc:  # out of memory and friends: the size is recorded as failed
        return Measurement(batch, [], [], [], error=one_line(exc))
    return Measurement(
        batch,
        exec_s=[t.exec_s for t in timings],
        h2d_s=[t.h2d_s for t in timings],
        d2h_s=[t.d2h_s for t in timings],
    )


def _budget_spent(measurements: list[Measurement]) -> float:
    """The profiling time that counts against the budget: each measured size's runs, its warm-up counted
    as one more typical run. What a first call costs once (torch.compile compiling for tens of seconds, a
    driver building programs) is not the size's cost, and would otherwise stop the profile at its first size."""
    return sum(m.total_median * (len(m.exec_s) + 1) for m in measurements if m.error is None)


def _flattened(measurements: list[Measurement]) -> bool:
    ok = [m for m in measurements if m.error is None]
    if len(ok) < 3:
        return False
    last = [m.per_sample_s for m in ok[-3:]]
    return (max(last) - min(last)) / min(last) <= FLAT


def probe_sizes(batches: Sequence[int]) -> list[int]:
    """The sizes engines are probed at before one of them is profiled (hetero.inference): the smallest size of
    `batches` and the largest up to PROBE_LARGEST, which are among the sizes the profile measures anyway."""
    sizes = sorted(set(batches))
    return sorted({sizes[0], max([s for s in sizes if s <= PROBE_LARGEST], default=sizes[0])})


def probe_engine(engine: Engine, sizes: Sequence[int], earlier: Sequence[Measurement] = ()) -> list[Measurement]:
    """The engine measured at `sizes` as its profile would measure them (those in `earlier` kept), up to the
    first size that fails."""
    kept = {m.batch: m for m in earlier}
    time.sleep(SETTLE_S)  # another engine may just have run on this device and left threads spinning
    measurements: list[Measurement] = []
    for batch in sizes:
        measurements.append(kept.get(batch) or measure_batch(engine, batch))
        if measurements[-1].error is not None:
            break
    return measurements


class ProfilingInterrupted(KeyboardInterrupt):
    """Ctrl-C while profiling, carrying the sizes measured so far (an interrupted Profile) to be saved."""

    def __init__(self, profile: Profile):
        super().__init__()
        self.profile = profile


def profile_engine(
    engine: Engine,
    batches: Sequence[int] = SEED_BATCHES,
    budget_s: float = 60.0,
    progress: bool = True,
    earlier: Sequence[Measurement] = (),
) -> Profile:
    """Profile one network on one device over `batches`, within `budget_s` seconds where possible.

    Sizes found in `earlier` (an interrupted profile's measurements) are kept rather than measured again;
    Ctrl-C raises ProfilingInterrupted with what has been measured.
    """
    sizes = sorted(set(batches))
    kept = {m.batch: m for m in earlier}
    time.sleep(SETTLE_S)  # another engine may just have run on this device and left threads spinning
    measurements: list[Measurement] = []
    stopped = None
    bar = tqdm(sizes, desc=f"profiling {engine.network.name} on {engine.device.name} ({engine.name})", unit="size",
               disable=not progress, leave=False)
    try:
        for batch in bar:
            measurement = kept.get(batch)
            if measurement is None:
                spent = _budget_spent(measurements)
                if measurements and spent > budget_s and _flattened(measurements):
                    stopped = (f"time budget {budget_s:g}s spent and per-sample time flat; "
                               f"sizes from {batch} up are extrapolated")
                    break
                if measurements and measurements[-1].error is None:
                    expected = measurements[-1].per_sample_s * batch * (MIN_REPEATS + 1)
                    if spent + expected > HARD_LIMIT * budget_s:
                        stopped = (f"batch {batch} would pass {HARD_LIMIT}x the time budget of {budget_s:g}s; "
                                   f"sizes from {batch} up are extrapolated")
                        break
                measurement = measure_batch(engine, batch)
            measurements.append(measurement)
            if measurement.error is not None:
                stopped = f"batch {batch} failed, so larger sizes were not tried: {measurement.error}"
                break
    except KeyboardInterrupt:
        done = ", ".join(str(m.batch) for m in measurements) or "none"
        partial = Profile(engine.profile_key, engine.network.key, measurements,
                          f"interrupted by the user; sizes measured: {done}", interrupted=True,
                          unit=engine.network.rate_unit)
        raise ProfilingInterrupted(partial) from None
    finally:
        bar.close()
    return Profile(engine.profile_key, engine.network.key, measurements, stopped, unit=engine.network.rate_unit)


@dataclass(frozen=True)
class Transfer:
    """Host-to-device and device-to-host copy time of one batch's input and output."""

    batch: int
    input_bytes: int
    output_bytes: int
    h2d_s: float
    d2h_s: float


def measure_transfers(network: Network, device: Device, batches: Sequence[int], repeats: int = 5) -> list[Transfer]:
    """Median copy times of a batch's input to the device and its output back, per batch size."""
    dev = device.tvm_device()
    rows = []
    for batch in batches:
        host_in = network.random_input(batch)
        host_out = np.ones((batch, *network.output_shape), dtype=network.output_dtype)
        out_on_device = tvm.runtime.tensor(host_out, dev)
        upload = Timer(lambda: tvm.runtime.tensor(host_in, dev), "h2d", sync=dev.sync)
        download = Timer(out_on_device.numpy, "d2h")
        # one device's own copies, nothing left running between them: no pause; the warm-up round wakes
        # allocators and drivers
        h2d, d2h = interleave([upload, download], repeats, warmup=1, settle_s=0.0)
        rows.append(Transfer(batch, host_in.nbytes, host_out.nbytes, h2d.median, d2h.median))
    return rows
