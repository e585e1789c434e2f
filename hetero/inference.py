"""What a run does around its compute: the request checked, a batch planned over the devices and each device's
engine chosen, the report of a split run, and what a split teaches the table; the devices and engines are
prepared by hetero.prepare. hetero.session puts these together: `hetero.infer("resnet-18", "cpu,gpu0", batch=100)`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from .buckets import BucketRun, row_lengths
from .devices import Device
from .engines import Engine, copy_threads
from .errors import HeteroError
from .execute import ShareResult
from .models import Network
from .partition import CONCURRENCY_SLOWDOWN, PARTITIONERS, predicted_times, split_or_single
from .selection import Fastest, fastest_at
from .table import Profile, ProfileTable

DEFAULT_TABLE = Path("profiles") / "profile_table.json"
DEFAULT_TUNE_BATCH = 16
DEFAULT_BUDGET_S = 60.0


@dataclass
class Fault:
    """A device that did not do what was planned for it, and what became of its work."""

    device: str
    stage: str  # "load" (compile or upload), "profile" (no batch size ran) or "run"
    error: str
    moved: int = 0  # samples it had been given and did not finish, run by the other devices instead


@dataclass
class InferenceReport:
    """Everything one split run did, for people (cli) and programs (JSON) alike."""

    network: str
    batch: int
    partitioner: str
    partition_s: float
    predicted_s: float
    wall_s: float
    shares: list[ShareResult]  # one per device that ran, then those that took over a failed device's samples
    outputs: np.ndarray
    profiled: list[str]
    faults: list[Fault] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # engines a probe dropped in this run, in words
    unit: str = "img/s"  # what its throughput counts: Network.rate_unit
    buckets: list[BucketRun] = field(default_factory=list)  # sequence buckets, one split each, the shares in order

    @property
    def throughput(self) -> float:
        return self.batch / self.wall_s if self.wall_s > 0 else float("inf")

    def to_dict(self) -> dict:
        return {
            "network": self.network,
            "batch": self.batch,
            "partitioner": self.partitioner,
            "partition_ms": self.partition_s * 1e3,
            "predicted_ms": self.predicted_s * 1e3,
            "wall_ms": self.wall_s * 1e3,
            "throughput_img_s": self.throughput,  # the key programs read, whatever the unit
            "unit": self.unit,
            "profiled": self.profiled,
            "devices": [
                {
                    "device": r.device.name,
                    "engine": r.engine,
                    "hardware": r.device.hardware,
                    "precision": r.device.precision,
                    "samples": r.size,
                    "first_sample": r.start,
                    "completed": r.completed,
                    "calls": r.calls,
                    "predicted_ms": r.predicted_s * 1e3,
                    "measured_ms": r.wall_s * 1e3,
                    "exec_ms": r.timing.exec_s * 1e3 if r.timing else 0.0,
                    "io_ms": (r.timing.h2d_s + r.timing.d2h_s) * 1e3 if r.timing else 0.0,
                    "compile_s": r.compile_s,
                    "error": r.error,
                    "takes_over_from": r.takes_over_from,
                }
                | ({"sequence": length} if length else {})
                for r, length in zip(self.shares, row_lengths(self.buckets) or [0] * len(self.shares), strict=True)
            ],
            "buckets": [dataclasses.asdict(b) for b in self.buckets],
            "faults": [dataclasses.asdict(f) for f in self.faults],
            "dropped": self.dropped,
        }


def reserve_cores(devices: Sequence[Device]) -> list[Device]:
    """Leave each accelerator the cores its engine's threads use to feed it (its copy threads,
    engines.copy_threads, the thread that queues its work and the one that feeds it chunks and takes
    their outputs: hetero.feed), so a busy CPU pool cannot starve them.

    TVM's CPU kernels wait at barriers for their slowest thread, so a CPU share whose threads are
    descheduled by a GPU's copies slows as a whole (on a 32-core host, resnet-50's 10-sample CPU share
    took 5x its prediction next to two GPUs). A CPU device that already names its thread count keeps it.
    """
    reserved = (copy_threads() + 2) * sum(1 for d in devices if not d.host)
    cores = os.cpu_count() or 1
    cpu_threads = max(1, cores - reserved) if reserved else 0
    return [dataclasses.replace(d, threads=cpu_threads) if d.host and not d.threads else d for d in devices]


def check_host_memory(network: Network, batch: int, what: str = "batch") -> None:
    """Refuse, before allocating, a batch whose inputs and outputs alone exceed the host's free memory.

    Devices run large shares in chunks, but the whole batch lives in host memory; without this check an
    oversized batch ends in the kernel's out-of-memory killer rather than in an error line.
    """
    needed = batch * (network.input_bytes + network.output_bytes)
    free = psutil.virtual_memory().available
    if needed > free:
        raise HeteroError(f"{what} {batch} needs {needed / 2**30:.1f} GiB of host memory for its inputs and "
                          f"outputs, more than the {free / 2**30:.1f} GiB free")


def plan(profiles: Sequence[Profile], batch: int, partitioner: str = "exact") -> tuple[list[int], list[float], float]:
    """Shares per device, each device's predicted seconds, and the seconds the partitioner took."""
    if partitioner not in PARTITIONERS:
        raise HeteroError(f"unknown partitioner {partitioner!r}; choose from: {', '.join(PARTITIONERS)}")
    costs = [profile.cost_curve(batch) for profile in profiles]
    slowdowns = [p.company_slowdown(prior=1 + CONCURRENCY_SLOWDOWN) for p in profiles]
    start = time.perf_counter()
    try:
        shares = split_or_single(costs, batch, partitioner, slowdowns)
    except ValueError as exc:
        raise HeteroError(str(exc)) from exc
    seconds = time.perf_counter() - start
    return shares, predicted_times(costs, shares, slowdowns), seconds


def share_limits(profiles: Sequence[Profile], devices: Sequence[Device]) -> list[int | None]:
    """The most samples each device takes in one call, larger shares running in chunks of that size:
    the largest size its profile showed to fit, where a size failed; on a CPU, else, the largest size
    profiled, since a call's buffers are fresh memory the first time (squeezenet_v1.1 on this
    project's 2-core machine: 143 ms for a first call of 16 samples, 88 ms after; benchmarks/HISTORY.md) and
    its time per sample is flat beyond the profile; None, one call, elsewhere."""
    limits = []
    for profile, device in zip(profiles, devices, strict=True):
        limit = profile.max_batch() or None
        if limit is None and device.host:
            limit = profile.largest_measured() or None
        limits.append(limit)
    return limits


def learn_company(table: ProfileTable, profiles: Sequence[Profile], results: Sequence[ShareResult]) -> bool:
    """Record, for each device that worked in a split beside others, its share's time against its profile's
    prediction, so later plans charge it its own slowdown in company (a CPU next to two busy GPUs took
    twice its prediction), and count the split for each device that sat it out; whether the table changed (the
    caller saves it: a session does so in batches)."""
    planned = results[: len(profiles)]  # the shares that took over from failed devices come after
    worked = [(p, r) for p, r in zip(profiles, planned) if r.size and r.error is None]
    working = {id(p) for p, _ in worked}  # identical devices share one profile
    idle = {id(p): p for p, r in zip(profiles, planned) if not r.size and r.error is None and id(p) not in working}
    if len(worked) < 2 and not idle:
        return False
    for profile in idle.values():
        profile.record_idle()
        table.put(profile)
    if len(worked) > 1:  # a device alone is not in company
        for profile, result in worked:
            profile.record_company(result.wall_s, result.size)
            table.put(profile)
    return True


def check_request(net: Network, batch: int | None, inputs: np.ndarray | Mapping[str, np.ndarray] | None,
                  profile_batches: Sequence[int]) -> None:
    """Refuse a run that cannot work before anything is compiled, profiled or allocated."""
    if net.open_dimensions:
        raise HeteroError(f"{net.name} leaves {', '.join(net.open_dimensions)} open: give its inputs by name "
                          f"({', '.join(t.name for t in net.inputs)}), whose sizes fix it")
    if inputs is None:
        if batch is None or batch < 1:
            raise HeteroError(f"batch must be at least 1, got {batch}")
        check_host_memory(net, batch)
    else:
        net.check_inputs(inputs)
    if profile_batches:
        check_host_memory(net, max(profile_batches), "profiling batch")


def choose_engines(options: list[list[tuple[Engine, Profile]]], batch: int,
                   partitioner: str = "exact") -> tuple[list[Engine], list[Profile]]:
    """Per device, the engine to run: a first plan over each device's fastest engine at every size gives
    each device its share, and the engine predicted fastest for that share runs it."""
    first, _, _ = plan([Fastest([profile for _, profile in pairs]) for pairs in options], batch, partitioner)
    chosen = [pairs[fastest_at([profile for _, profile in pairs], share or batch)]
              for pairs, share in zip(options, first, strict=True)]
    return [engine for engine, _ in chosen], [profile for _, profile in chosen]


