"""What a run does before it computes: each device's engines loaded (several at once), probed where a device
has several, profiled into the table and tuned where asked; the devices and engines that cannot run left out
as faults. :func:`prepare_engines` is the way in; hetero.session chooses from what it returns
(hetero.inference.choose_engines) and runs it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .devices import DEFAULT_PRECISION, Device, parse_devices, with_precision
from .engines import Engine, engine_key, load_engine
from .errors import HeteroError, one_line
from .inference import DEFAULT_BUDGET_S, DEFAULT_TABLE, DEFAULT_TUNE_BATCH, Fault, reserve_cores
from .models import Network
from .profile import SEED_BATCHES, ProfilingInterrupted, probe_engine, probe_sizes, profile_engine
from .selection import candidate_engines, default_engine_choice, parse_engine_choice, probe_losers
from .table import Measurement, Profile, ProfileTable, key_change
from .tune import TuningError, tunable, tune, tuning_for

SLOW_LOAD_S = 10.0  # engines loaded together for longer than this are named with their times, in a note

log = logging.getLogger(__name__)


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


def load_candidates(net: Network, jobs: Sequence[tuple[Candidate, Sequence[int]]]) -> list[tuple[Candidate, str]]:
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
                    candidate.engine.infer(np.zeros((size, *net.input_shape), net.input_dtype))
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


def load_engines(
    net: Network, devices: Sequence[Device], choice: dict[str, str], table: ProfileTable, batches: Sequence[int],
    reprofile: bool, trials: int = 0, tune_batch: int = DEFAULT_TUNE_BATCH,
) -> tuple[list[list[Candidate]], list[Fault]]:
    """Per device, its candidate engines (hetero.selection), each keyed and looked up in the table without being
    loaded. Loaded now (:func:`load_candidates`: several at once) are the ones a probe or a profile must measure,
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
    failed = load_candidates(net, jobs)
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
        failed = load_candidates(net, [(c, sizes) for c in unprobed if c.engine is None])
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
                table.put(Profile(loser.key, net.key, loser.measured(), dropped=reason, beaten_by=winner.key,
                                  unit=net.rate_unit))
                table.save()
                notes.append(f"{device.name}: {loser.name} not profiled further, {reason}")
                log.warning(notes[-1])
        candidates = [c for k, c in enumerate(candidates) if c.complete or k not in losers]
    failed = load_candidates(net, [(c, ()) for c in candidates if not c.complete and c.engine is None])
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
        failed = load_candidates(net, [(c, ()) for c in picked if c.engine is None])
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
    candidates, faults = load_engines(net, chosen, choice, table, profile_batches, reprofile, tune_trials,
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
