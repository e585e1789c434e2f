"""What a run does before and around its compute: devices and engines prepared (loaded, probed, profiled
into the table), a batch planned over the devices, the report of a split run, and what a split teaches
the table. hetero.session puts these together: `hetero.infer("resnet-18", "cpu,gpu0", batch=100)`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from .devices import DEFAULT_PRECISION, Device, parse_devices, with_precision
from .engines import Engine, copy_threads, engine_key, load_engine
from .errors import HeteroError, one_line
from .execute import ShareResult
from .models import Network
from .partition import CONCURRENCY_SLOWDOWN, PARTITIONERS, predicted_times, split_or_single
from .profile import SEED_BATCHES, ProfilingInterrupted, probe_engine, probe_sizes, profile_engine
from .selection import Fastest, candidate_engines, default_engine_choice, fastest_at, parse_engine_choice, probe_losers
from .table import Measurement, Profile, ProfileTable, key_change
from .tune import TuningError, tunable, tune, tuning_for

DEFAULT_TABLE = Path("profiles") / "profile_table.json"
DEFAULT_TUNE_BATCH = 16
DEFAULT_BUDGET_S = 60.0
SLOW_LOAD_S = 10.0  # engines loaded together for longer than this are named with their times, in a note

log = logging.getLogger(__name__)


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
            "throughput_img_s": self.throughput,
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
                for r in self.shares
            ],
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


def complete(profile: Profile | None) -> bool:
    """Whether `profile` is a whole profile to plan with: neither interrupted nor a probe's drop."""
    return profile is not None and not profile.interrupted and profile.dropped is None


def measure_profile(engine: Engine, table: ProfileTable, batches: Sequence[int], budget_s: float, progress: bool,
                    earlier: Sequence[Measurement] = ()) -> Profile:
    """Profile `engine` (keeping the sizes in `earlier`) into the table, saved as soon as it is complete; on Ctrl-C
    what was measured is saved marked as partial, for the next run to finish."""
    try:
        profile = profile_engine(engine, batches, budget_s, progress, earlier)
    except ProfilingInterrupted as stop:
        if stop.profile.measurements:
            table.put(stop.profile)
            table.save()
        raise
    table.put(profile)
    table.save()
    return profile


def _warn_superseded(table: ProfileTable, device: Device, key: str, network: Network) -> None:
    for old in table.superseded(key, network.key):
        log.warning(f"{device.name}: not using the table's profile of {network.name} measured under "
                    f"{key_change(old.device_key, key)}; measuring again")


def ensure_profiles(
    engines: Sequence[Engine],
    table: ProfileTable,
    batches: Sequence[int] = SEED_BATCHES,
    reprofile: bool = False,
    budget_s: float = DEFAULT_BUDGET_S,
    progress: bool = True,
) -> tuple[list[Profile], list[str]]:
    """Each engine's profile from the table, measuring (and saving) the ones missing or asked for again.

    Each profile is saved as soon as it is complete, and an interrupted one (or a probe's drop) is finished
    from the sizes it has. Profiles of the same hardware under another key (another TVM, target or driver)
    are not trusted: the user is told, and the device is measured afresh.
    """
    profiles, measured = [], []
    for engine in engines:
        key, network = engine.profile_key, engine.network.key
        stored = table.get(key, network)
        if complete(stored) and not reprofile:
            profiles.append(stored)
            continue
        if stored is None:
            _warn_superseded(table, engine.device, key, engine.network)
        earlier = stored.measurements if stored is not None and not reprofile else ()
        profile = measure_profile(engine, table, batches, budget_s, progress, earlier)
        if engine.device.name not in measured:
            measured.append(engine.device.name)
        profiles.append(profile)
    return profiles, measured


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


def check_request(net: Network, batch: int | None, inputs: np.ndarray | None, profile_batches: Sequence[int]) -> None:
    """Refuse a run that cannot work before anything is compiled, profiled or allocated."""
    if inputs is None:
        if batch is None or batch < 1:
            raise HeteroError(f"batch must be at least 1, got {batch}")
        check_host_memory(net, batch)
    else:
        net.check_inputs(inputs)
    if profile_batches:
        check_host_memory(net, max(profile_batches), "profiling batch")


def _with_tunings(net: Network, engines: list[Engine], table_path: Path, trials: int, batch: int) -> list[Engine]:
    """The engines, each CPU or CUDA one swapped for its tuned twin where tuning records exist at `batch` (after
    running `trials` more trials when asked) and the tuned module runs that batch faster than hetero's."""
    chosen = []
    for engine in engines:
        if not engine.tunable:
            if trials:
                log.warning(f"{engine.device.name} ({engine.name}) not tuned: --tune tunes TVM's engine on CPU "
                            "and CUDA devices")
            chosen.append(engine)
            continue
        tuning = tuning_for(table_path, net, engine.device, batch)
        if trials:
            log.warning(f"tuning {net.name} for {engine.device.name} at batch {batch}: {trials} MetaSchedule "
                        f"trials, records in {tuning.records}")
            tune(net, engine.device, tuning, trials)
        if not tuning.has_records():
            chosen.append(engine)
            continue
        try:
            tuned = load_engine(net, engine.device, "tvm", tuning=tuning)
            tuned_s = tuned.on_worker(tuned.time_module, True).result()
            own_s = tuned.on_worker(tuned.time_module, False).result()
        except Exception as exc:  # unreadable records, a compile that fails: run untuned, as before tuning
            log.warning(f"{engine.device.name}: the tuning records in {tuning.records} cannot be used "
                        f"({one_line(exc)}); running hetero's own schedules")
            chosen.append(engine)
            continue
        faster = tuned_s < own_s
        log.warning(f"{engine.device.name}: the module tuned at batch {batch} ran {tuned_s * 1e3:.1f} ms against "
                    f"{own_s * 1e3:.1f} ms with hetero's own schedules; {'using' if faster else 'not using'} it")
        chosen.append(tuned if faster else engine)
    return chosen


@dataclass(eq=False)
class Candidate:
    """One engine of one device as the choice sees it: its name, its device, the table key of its profiles and
    what the table holds there, all known without loading it; the engine itself once loaded."""

    name: str
    device: Device
    key: str
    stored: Profile | None = None  # the table's profile under `key`: whole, partial, or a probe's drop
    engine: Engine | None = None
    probe: list[Measurement] = field(default_factory=list)  # what this run's probe measured

    @property
    def complete(self) -> bool:
        return complete(self.stored)

    def measured(self) -> list[Measurement]:
        """The sizes measured and not yet in a whole profile: a partial profile's or a drop's, and the probe's."""
        kept = {m.batch: m for m in (self.stored.measurements if self.stored and not self.complete else ())}
        kept.update((m.batch, m) for m in self.probe)
        return [kept[batch] for batch in sorted(kept)]

    def probed(self, sizes: Sequence[int]) -> bool:
        """Whether every probe size is measured (up to the first that failed)."""
        by_batch = {m.batch: m for m in self.measured()}
        for size in sizes:
            if size not in by_batch:
                return False
            if by_batch[size].error is not None:
                return True
        return True

    def seconds(self, sizes: Sequence[int]) -> list[float]:
        """Seconds at each probe size: predicted by a whole profile, else measured (inf where a size failed or
        was not reached)."""
        if self.complete:
            return [self.stored.predict(size) for size in sizes]
        by_batch = {m.batch: m for m in self.measured()}
        return [by_batch[s].total_median if s in by_batch and by_batch[s].error is None else math.inf for s in sizes]


def _load(net: Network, jobs: Sequence[tuple[Candidate, Sequence[int]]]) -> list[tuple[Candidate, str]]:
    """Load each job's candidate, then run it once at each of the job's sizes (what a first call costs:
    torch.compile compiling, cuDNN choosing its algorithms, is paid here rather than in a probe); the
    candidates that failed to load, with why.

    Different engines load at the same time: they are independent, and loading is mostly compiling (TVM's
    build, inductor's) in native code that releases the GIL and in compiler processes, so the slowest sets
    the time rather than their sum. One engine's loads on several devices run one after the other, so a
    module compiled for one device is in the disk cache for the next, not compiled twice at once."""
    took: list[str] = []

    def load(group: list[tuple[Candidate, Sequence[int]]]) -> list[tuple[Candidate, str]]:
        failed = []
        for candidate, warm in group:
            start = time.perf_counter()
            try:
                candidate.engine = load_engine(net, candidate.device, candidate.name)
            except Exception as exc:  # a compile error, or a device that cannot hold the weights
                failed.append((candidate, one_line(exc)))
                continue
            for size in warm:
                with suppress(Exception):  # a size that fails here is measured as failed by the probe
                    candidate.engine.infer(np.zeros((size, *net.input_shape), net.dtype))
            took.append(f"{candidate.name} on {candidate.device.name} {time.perf_counter() - start:.1f} s")
        return failed

    start = time.perf_counter()
    try:
        return _in_parallel(load, jobs)
    finally:
        if len(jobs) > 1 and time.perf_counter() - start > SLOW_LOAD_S:
            log.warning(f"loading {len(jobs)} engines at once took {time.perf_counter() - start:.1f} s "
                        f"({', '.join(took)})")


def _in_parallel(load: Callable[[list[tuple[Candidate, Sequence[int]]]], list[tuple[Candidate, str]]],
                 jobs: Sequence[tuple[Candidate, Sequence[int]]]) -> list[tuple[Candidate, str]]:
    """`load` called on the jobs of each engine in a thread of its own; what it returns, joined."""
    groups: dict[str, list[tuple[Candidate, Sequence[int]]]] = {}
    for candidate, warm in jobs:
        groups.setdefault(candidate.name, []).append((candidate, warm))
    if len(groups) < 2:
        return [f for group in groups.values() for f in load(group)]
    pool = ThreadPoolExecutor(len(groups), "hetero-load")
    try:
        return [f for done in [pool.submit(load, group) for group in groups.values()] for f in done.result()]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # all done, or Ctrl-C: not held up by the compiles left


def _without(candidates: list[Candidate], failed: Sequence[tuple[Candidate, str]]) -> list[Candidate]:
    return [c for c in candidates if all(c is not f for f, _ in failed)]


def _load_engines(
    net: Network, devices: Sequence[Device], choice: dict[str, str], table: ProfileTable, batches: Sequence[int],
    reprofile: bool, trials: int = 0, tune_batch: int = DEFAULT_TUNE_BATCH,
) -> tuple[list[list[Candidate]], list[Fault]]:
    """Per device, its candidate engines (hetero.selection), each keyed and looked up in the table without being
    loaded. Loaded now (hetero.inference._load: several at once) are the ones a probe or a profile must measure,
    and TVM's where a tuning applies; a device none of whose engines loads is left out and reported, not fatal."""
    options, jobs, tuned, scheduled = [], [], set(), set()
    for device in devices:
        keys: dict[str, str] = {}

        def known(name: str, device: Device = device) -> bool:
            keys[name] = engine_key(name, device)
            return table.get(keys[name], net.key) is not None

        names = candidate_engines(net, device, choice[device.name], known)
        candidates = [Candidate(name, device, keys.get(name) or engine_key(name, device)) for name in names]
        for candidate in candidates:
            candidate.stored = None if reprofile else table.get(candidate.key, net.key)
        if "tvm" in names and tunable(device) and (
                trials > 0 or tuning_for(table.path, net, device, tune_batch).has_records()):
            tuned.add(device.name)
        elif trials:
            log.warning(f"{device.name} not tuned: --tune tunes TVM's engine on CPU and CUDA devices")
        sizes = probe_sizes(batches) if len(candidates) > 1 else []
        # an identical device's engine (same key) is measured once, by the first: the others may need none
        jobs += [(c, sizes) for c in candidates if (c.name == "tvm" and device.name in tuned)
                 or not (c.complete or sizes and c.probed(sizes) or c.key in scheduled)]
        scheduled.update(c.key for c in candidates)
        options.append(candidates)
    failed = _load(net, jobs)
    kept, faults = [], []
    for candidates in options:
        device = candidates[0].device
        for candidate in candidates:
            if candidate.name == "tvm" and device.name in tuned and candidate.engine is not None:
                candidate.engine = _with_tunings(net, [candidate.engine], table.path, trials, tune_batch)[0]
                candidate.key = candidate.engine.profile_key
                candidate.stored = None if reprofile else table.get(candidate.key, net.key)
        errors = [f"{c.name}: {e}" if len(candidates) > 1 else e for c, e in failed if c.device is device]
        candidates = _without(candidates, failed)
        if candidates:
            kept.append(candidates)
            for error in errors:
                log.warning(f"{device.name}: engine {error}; running the others")
        else:
            faults.append(Fault(device.name, "load", "; ".join(errors) or "no engine can run it"))
            log.warning(f"{device.name} left out: {faults[-1].error}")
    return kept, faults


def _settle(net: Network, candidates: list[Candidate], table: ProfileTable, batches: Sequence[int], budget_s: float,
            progress: bool, reprofile: bool = False) -> tuple[list[Candidate], list[str], bool]:
    """One device's candidates, each with a whole profile in `stored`: where there are several, each without
    one is first probed (hetero.profile.probe_engine) and those clearly slower there than the device's fastest
    are dropped, recorded in the table so that later runs neither load nor probe them again; the rest are
    profiled. Also the drops decided now, in words, and whether anything was measured."""
    device, notes, measured = candidates[0].device, [], False
    if not reprofile:  # what an identical device (same keys) measured earlier in this run
        for candidate in candidates:
            candidate.stored = table.get(candidate.key, net.key)
    if len(candidates) > 1:
        # A drop stands while the profile it lost to is whole here; else it is judged again from its probe.
        whole = {c.key for c in candidates if c.complete}
        candidates = [c for c in candidates if not (c.stored and c.stored.dropped and c.stored.beaten_by in whole)]
    if len(candidates) > 1:
        sizes = probe_sizes(batches)
        unprobed = [c for c in candidates if not c.complete and not c.probed(sizes)]
        failed = _load(net, [(c, sizes) for c in unprobed if c.engine is None])
        for candidate, error in failed:
            log.warning(f"{device.name}: engine {candidate.name}: {error}; running the others")
        candidates = _without(candidates, failed)
        for candidate in _without(unprobed, failed):
            candidate.probe = probe_engine(candidate.engine, sizes, candidate.measured())
            measured = True
        losers = probe_losers([c.name for c in candidates], [c.seconds(sizes) for c in candidates], sizes)
        for index, (winner, reason) in losers.items():
            loser, winner = candidates[index], candidates[winner]
            if not loser.complete:  # a whole profile costs nothing to keep as an option
                table.put(Profile(loser.key, net.key, loser.measured(), dropped=reason, beaten_by=winner.key))
                table.save()
                notes.append(f"{device.name}: {loser.name} not profiled further, {reason}")
                log.warning(notes[-1])
        candidates = [c for k, c in enumerate(candidates) if c.complete or k not in losers]
    failed = _load(net, [(c, ()) for c in candidates if not c.complete and c.engine is None])
    for candidate, error in failed:
        log.warning(f"{device.name}: engine {candidate.name}: {error}; running the others")
    candidates = _without(candidates, failed)
    for candidate in candidates:
        if not candidate.complete:
            if candidate.stored is None and not candidate.measured():
                _warn_superseded(table, device, candidate.key, net)
            candidate.stored = measure_profile(candidate.engine, table, batches, budget_s, progress,
                                               candidate.measured())
            measured = True
    return candidates, notes, measured


def _runnable(
    net: Network, options: list[list[tuple[Engine, Profile]]], faults: list[Fault]
) -> list[list[tuple[Engine, Profile]]]:
    """Per device, the engines that ran at least one profiled size; a device with none is added to `faults`."""
    kept = []
    for pairs in options:
        ran = [(engine, profile) for engine, profile in pairs if profile.max_batch() != 0]
        if ran:
            kept.append(ran)
            continue
        error = "; ".join(next(m.error for m in profile.measurements if m.error) for _, profile in pairs)
        faults.append(Fault(pairs[0][0].device.name, "profile", f"every profiled batch size failed: {error}"))
        log.warning(f"{faults[-1].device} left out: {faults[-1].error}")
    if not kept:
        raise HeteroError(f"no device can run {net.name}: " + "; ".join(f"{f.device}: {f.error}" for f in faults))
    return kept


def choose_engines(options: list[list[tuple[Engine, Profile]]], batch: int,
                   partitioner: str = "exact") -> tuple[list[Engine], list[Profile]]:
    """Per device, the engine to run: a first plan over each device's fastest engine at every size gives
    each device its share, and the engine predicted fastest for that share runs it."""
    first, _, _ = plan([Fastest([profile for _, profile in pairs]) for pairs in options], batch, partitioner)
    chosen = [pairs[fastest_at([profile for _, profile in pairs], share or batch)]
              for pairs, share in zip(options, first, strict=True)]
    return [engine for engine, _ in chosen], [profile for _, profile in chosen]


@dataclass
class Ready:
    """Engines loaded and profiled: per device, its engines with their profiles, ready to be chosen from."""

    table: ProfileTable
    options: list[list[tuple[Engine, Profile]]]
    faults: list[Fault]
    profiled: list[str]  # the devices profiled now
    dropped: list[str] = field(default_factory=list)  # engines a probe dropped now, in words


Pick = Callable[[list[list[tuple[Candidate, Profile]]]], Sequence[Candidate]]


def _made_engines(net: Network, devices: Sequence[Device],
                  load: Callable[[Network, Device], Engine]) -> tuple[list[list[Engine]], list[Fault]]:
    """Per device, the one engine `load` makes for it; a device for which it fails is left out and reported."""
    options, faults = [], []
    for device in devices:
        try:
            options.append([load(net, device)])
        except Exception as exc:  # a compile error, or a device that cannot hold the weights
            faults.append(Fault(device.name, "load", one_line(exc)))
            log.warning(f"{device.name} left out: {faults[-1].error}")
    return options, faults


def _load_picked(net: Network, options: list[list[tuple[Candidate, Profile]]], pick: Pick | None,
                 faults: list[Fault]) -> list[list[tuple[Engine, Profile]]]:
    """Per device, the candidate `pick` takes (every candidate without `pick`), loaded where it is not yet; a
    candidate that fails to load is left out and the pick made again among the others."""
    while True:
        picked = pick(options) if pick is not None else [c for pairs in options for c, _ in pairs]
        failed = _load(net, [(c, ()) for c in picked if c.engine is None])
        if not failed:
            return [[(c.engine, p) for c, p in pairs if any(c is chosen for chosen in picked)] for pairs in options]
        remaining = []
        for pairs in options:
            errors = [f"{c.name}: {e}" for c, e in failed if c.device is pairs[0][0].device]
            left = [(c, p) for c, p in pairs if all(c is not f for f, _ in failed)]
            if left:
                remaining.append(left)
                for error in errors:
                    log.warning(f"{pairs[0][0].device.name}: engine {error}; running the others")
            else:
                faults.append(Fault(pairs[0][0].device.name, "load", "; ".join(errors)))
                log.warning(f"{faults[-1].device} left out: {faults[-1].error}")
        if not remaining:
            raise HeteroError(f"no device can run {net.name}: " + "; ".join(f"{f.device}: {f.error}" for f in faults))
        options = remaining


def prepare_engines(
    net: Network,
    devices: str | Sequence[Device],
    table: str | Path | ProfileTable = DEFAULT_TABLE,
    profile_batches: Sequence[int] = SEED_BATCHES,
    reprofile: bool = False,
    budget_s: float = DEFAULT_BUDGET_S,
    progress: bool = True,
    load: Callable[[Network, Device], Engine] | None = None,
    precision: str = DEFAULT_PRECISION,
    engine: str | None = None,
    tune_trials: int = 0,
    tune_batch: int = DEFAULT_TUNE_BATCH,
    pick: Pick | None = None,
) -> Ready:
    """What every run does before it computes: devices parsed (the CPU leaving accelerators their feeding
    cores), each device's candidate engines profiled into the table (tuned where asked; where a device has
    several, a probe first drops those clearly slower), and the devices and engines that cannot run left out
    as faults.

    Engines are loaded only to be measured or run: with `pick` (per device, the candidate to run, chosen
    from the profiles alone, as :func:`choose_engines` does), a run whose profiles are all in the table
    loads one engine per device, and the options hold only those; without it, every candidate is loaded.
    `load`, where given, makes each device's one engine instead."""
    chosen = reserve_cores(with_precision(parse_devices(devices) if isinstance(devices, str) else list(devices),
                                          precision))
    if tune_trials and not any(tunable(d) for d in chosen):
        raise TuningError(f"--tune works on CPU and CUDA devices, and {', '.join(d.name for d in chosen)} "
                          f"has none")
    if not isinstance(table, ProfileTable):
        table = ProfileTable.load(Path(table), create=True)
    if load is not None:
        made, faults = _made_engines(net, chosen, load)
        made = [_with_tunings(net, engines, table.path, tune_trials, tune_batch) for engines in made]
        profiles, measured = ensure_profiles([e for engines in made for e in engines], table, profile_batches,
                                             reprofile, budget_s, progress)
        profiled = iter(profiles)
        return Ready(table, _runnable(net, [[(e, next(profiled)) for e in engines] for engines in made], faults),
                     faults, measured)
    choice = parse_engine_choice(engine or default_engine_choice(), chosen)
    candidates, faults = _load_engines(net, chosen, choice, table, profile_batches, reprofile, tune_trials,
                                       tune_batch)
    settled, dropped, measured = [], [], []
    for device_candidates in candidates:
        kept, notes, measured_now = _settle(net, device_candidates, table, profile_batches, budget_s, progress,
                                            reprofile)
        dropped += notes
        if measured_now:
            measured.append(device_candidates[0].device.name)
        if kept:
            settled.append([(c, c.stored) for c in kept])
        else:
            faults.append(Fault(device_candidates[0].device.name, "load", "none of its engines loaded"))
    options = _runnable(net, settled, faults)
    return Ready(table, _load_picked(net, options, pick, faults), faults, measured, dropped)
