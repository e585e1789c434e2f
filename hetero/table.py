"""The profile table: per device and network, how long each profiled batch size took.

The table is a JSON file shared by every run on a machine (never pickle: it must stay readable and
safe to load). Runs that profile concurrently merge into it under a file lock instead of
overwriting each other, and a file that is not ours is refused rather than replaced.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tabulate import tabulate

from .errors import HeteroError
from .io import LOCK, lock_file, write_atomically
from .timer import noisy

FORMAT = "hetero-profile-table"
VERSION = 1

# A table may be edited by hand, and the planner trusts it: a measurement outside what hardware can do is
# refused when the table is loaded rather than planned with (batch 10**12 in a nanosecond printed as 1e21 img/s).
MAX_BATCH = 2**31 - 1  # samples in one call: buffers and runtimes index with 32-bit ints; no device holds more
MIN_CALL_S = 1e-6  # the fastest a device call can return, copies included: launch and synchronisation alone cost more
MIN_SAMPLE_S = 1e-9  # a sample of a CNN is far more than the few operations a device does in a nanosecond
MAX_TIME_S = 86400.0  # a day: no profiled call takes longer, and the profiler spends about a second per size

Key = tuple[str, str]  # (device_key, network)
# A key is "<hardware> | <target> | <precision> | tvm <version> | engine <name> <version>[ | ...]":
# hardware first, the engine in the field that starts "engine " (a key without one is TVM's)
KEY_FIELDS = " | "
ENGINE_FIELD = "engine "


def engine_of(device_key: str) -> str:
    """The name of the engine whose profile is stored under `device_key`."""
    fields = [f for f in device_key.split(KEY_FIELDS) if f.startswith(ENGINE_FIELD)]
    return fields[0][len(ENGINE_FIELD):].split()[0] if fields else "tvm"


@dataclass
class Measurement:
    """One profiled batch size on one device; raw repeats are kept so noise stays visible.

    The derived times are only defined for a size that ran (`error` is None).
    """

    batch: int
    exec_s: list[float]
    h2d_s: list[float]
    d2h_s: list[float]
    error: str | None = None

    @property
    def exec_median(self) -> float:
        return statistics.median(self.exec_s)

    @property
    def h2d_median(self) -> float:
        return statistics.median(self.h2d_s)

    @property
    def d2h_median(self) -> float:
        return statistics.median(self.d2h_s)

    @property
    def total_median(self) -> float:
        """Seconds for the whole batch including its copies, what a share of a split costs."""
        return self.exec_median + self.h2d_median + self.d2h_median

    @property
    def per_sample_s(self) -> float:
        return self.total_median / self.batch

    @property
    def noisy(self) -> bool:
        """Whether the repeats disagree enough that predictions from this size are doubtful."""
        return noisy(self.exec_s)


@dataclass
class Profile:
    """How one device runs one network, and the predictions the partitioner plans with.

    An `interrupted` profile holds the sizes measured before the user stopped profiling: it is kept so
    that nothing measured is lost, and the next run measures the rest instead of trusting it. A `dropped`
    profile holds the one or two sizes of a probe after which the engine was not profiled further, being
    clearly slower there than the device's engine whose profile is stored under `beaten_by`: runs that
    choose between engines leave it out without loading it, and a run that needs it measures the rest.
    """

    device_key: str
    network: str
    measurements: list[Measurement]
    stopped: str | None = None
    interrupted: bool = False
    # Measured over predicted seconds of this device's latest shares in splits with other devices.
    company: list[float] = field(default_factory=list)
    # Splits since this device last had a share: it learns nothing while idle.
    idle_splits: int = 0
    dropped: str | None = None  # why the probe dropped this engine (hetero.inference), None for a profile
    beaten_by: str | None = None  # the key of the profile it was measured against
    unit: str = "img/s"  # what its rates count: the network's rate_unit (samples/s for a text network)

    COMPANY_KEPT = 8
    COMPANY_TRUSTED = 3
    IDLE_RETRY = 10

    def __post_init__(self) -> None:
        self.measurements = sorted(self.measurements, key=lambda m: m.batch)

    def record_company(self, measured_s: float, samples: int) -> None:
        """Remember how a share of `samples` in a split compared with its prediction from this profile."""
        expected = self.predict(samples)
        if samples > 0 and 0 < expected < math.inf:
            self.company = (self.company + [measured_s / expected])[-self.COMPANY_KEPT :]
            self.idle_splits = 0

    def record_idle(self) -> None:
        """Remember a split this device sat out."""
        self.idle_splits += 1

    def company_slowdown(self, prior: float) -> float:
        """How much slower than profiled to expect this device next to others: the median of its latest
        splits' ratios, `prior` standing in for the first COMPANY_TRUSTED it has not had yet, so that one
        noisy split cannot shut a device out of every later split.  After IDLE_RETRY splits without a
        share it is `prior` again until the device next has one: a slowdown learned in a busier moment
        would otherwise keep it idle, and so unmeasured, for good."""
        if self.idle_splits >= self.IDLE_RETRY:
            return prior
        return float(np.median(self.company + [prior] * max(0, self.COMPANY_TRUSTED - len(self.company))))

    def max_batch(self) -> int | None:
        """The largest size that ran below the smallest size that failed (0 if none ran); None if none failed.

        Only measured sizes count: a size between the last success and the failure was never shown to fit.
        """
        failed = [m.batch for m in self.measurements if m.error is not None]
        if not failed:
            return None
        return max((m.batch for m in self.measurements if m.error is None and m.batch < min(failed)), default=0)

    def largest_measured(self) -> int:
        """The largest size that ran (0 if none did)."""
        return max((m.batch for m in self.measurements if m.error is None), default=0)

    def _one_call(self, sizes: np.ndarray) -> np.ndarray:
        """Predicted seconds of running each size in one call, from the sizes that ran."""
        ran = [m for m in self.measurements if m.error is None]
        if not ran:
            return np.zeros(sizes.shape)
        # np.interp extrapolates the per-sample time flat beyond the profiled sizes
        return sizes * np.interp(sizes, [m.batch for m in ran], [m.per_sample_s for m in ran])

    def _seconds(self, sizes: np.ndarray) -> np.ndarray:
        """Predicted seconds per size, not yet made monotone.

        Above max_batch() the executor runs a share as consecutive chunks of max_batch() samples, so that is
        what is predicted; a device on which every size failed (max_batch() == 0) cannot run a sample: inf.
        """
        if not self.measurements:
            raise ValueError(f"no measurements of {self.network} on {self.device_key} to predict from")
        limit = self.max_batch()
        if limit is None:
            return self._one_call(sizes)
        if limit == 0:
            return np.where(sizes > 0, np.inf, 0.0)
        chunks, rest = np.divmod(sizes, limit)
        return chunks * self._one_call(np.array(float(limit))) + self._one_call(rest)

    def predict(self, batch: int) -> float:
        """Predicted seconds (execution and copies) for `batch` samples."""
        if batch < 0:
            raise ValueError(f"batch must be at least 0, got {batch}")
        return float(self._seconds(np.array(batch, dtype=float)))

    def cost_curve(self, n: int) -> np.ndarray:
        """Predicted seconds for 0..n samples, never falling as samples are added (what the partitioner needs)."""
        return np.maximum.accumulate(self._seconds(np.arange(n + 1, dtype=float)))


class TableError(HeteroError):
    """The table file is missing, unreadable, or not a profile table; the message is one line."""


def _profile_to_json(profile: Profile) -> dict:
    return {
        "stopped": profile.stopped,
        "interrupted": profile.interrupted,
        "measurements": [asdict(m) for m in profile.measurements],
        "company": profile.company,
        "idle_splits": profile.idle_splits,
        **({"dropped": profile.dropped, "beaten_by": profile.beaten_by} if profile.dropped is not None else {}),
        **({"unit": profile.unit} if profile.unit != "img/s" else {}),
    }


def _seconds_list(value: object, name: str, allow_empty: bool) -> list[float]:
    """A list of finite non-negative seconds from the file; ValueError for anything else."""
    if not isinstance(value, list) or not (value or allow_empty) or not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0 for t in value
    ):
        raise ValueError(f"{name} must be a list of seconds, got {value!r:.60}")
    return [float(t) for t in value]


class _Implausible(ValueError):
    """A measurement that is well formed but outside physical sense; the message says which and why."""


def _batch_text(batch: int) -> str:
    digits = str(batch)
    return digits if len(digits) <= 30 else f"{digits[:25]}... ({len(digits)} digits)"


def _implausibility(m: Measurement) -> str | None:
    """What makes a well-formed measurement physically impossible, None if nothing does."""
    if m.batch > MAX_BATCH:
        return f"more than {MAX_BATCH} samples in one call"
    for name in ("exec_s", "h2d_s", "d2h_s"):
        slowest = max(getattr(m, name), default=0.0)
        if slowest > MAX_TIME_S:
            return f"a time of {slowest:.3g} s in {name}, more than a day ({MAX_TIME_S:g} s)"
    if m.error is not None:
        return None
    # Repeats are timed apart per part, so the fastest call is bounded by the sum of each part's fastest.
    fastest = min(m.exec_s) + min(m.h2d_s) + min(m.d2h_s)
    if fastest < MIN_CALL_S:
        return (f"its fastest call took {fastest:.3g} s with copies, "
                f"less than the {MIN_CALL_S:g} s any device call takes")
    if fastest / m.batch < MIN_SAMPLE_S:
        return f"{fastest / m.batch:.3g} s per sample, less than the {MIN_SAMPLE_S:g} s any sample takes"
    return None


def _measurement_from_json(m: dict) -> Measurement:
    """A measurement checked so that every derived time is defined: what the partitioner relies on."""
    batch, error = m["batch"], m["error"]
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a whole number of at least 1, got {batch!r:.60}")
    if error is not None and not isinstance(error, str):
        raise ValueError(f"error must be text or null, got {error!r:.60}")
    ran = error is None
    exec_s = _seconds_list(m["exec_s"], "exec_s", allow_empty=not ran)
    if ran and min(exec_s) == 0:
        raise ValueError(f"batch {batch} has an execution time of 0")
    return Measurement(
        batch, exec_s, _seconds_list(m["h2d_s"], "h2d_s", not ran), _seconds_list(m["d2h_s"], "d2h_s", not ran), error
    )


def _profile_from_json(device_key: str, network: str, entry: dict) -> Profile:
    stopped, interrupted = entry["stopped"], entry.get("interrupted", False)  # tables from before it was kept
    if stopped is not None and not isinstance(stopped, str):
        raise ValueError(f"stopped must be text or null, got {stopped!r:.60}")
    if not isinstance(interrupted, bool):
        raise ValueError(f"interrupted must be true or false, got {interrupted!r:.60}")
    if not isinstance(entry["measurements"], list) or not entry["measurements"]:
        raise ValueError(f"the profile of {network!r:.60} on {device_key!r:.60} has no list of measurements")
    measurements = [_measurement_from_json(m) for m in entry["measurements"]]
    for m in measurements:
        if (why := _implausibility(m)) is not None:
            raise _Implausible(f"implausible measurement of {network!r:.60} on {device_key!r:.80} at batch "
                               f"{_batch_text(m.batch)}: {why}; remove the profile to measure it again")
    company = [s for s in _seconds_list(entry.get("company", []), "company", allow_empty=True) if s > 0]
    idle_splits = entry.get("idle_splits", 0)  # tables from before it was kept
    if not isinstance(idle_splits, int) or isinstance(idle_splits, bool) or idle_splits < 0:
        raise ValueError(f"idle_splits must be a whole number, got {idle_splits!r:.60}")
    dropped, beaten_by = entry.get("dropped"), entry.get("beaten_by")  # tables from before probes
    for name, value in (("dropped", dropped), ("beaten_by", beaten_by)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be text or null, got {value!r:.60}")
    unit = entry.get("unit", "img/s")  # tables from before text networks
    if unit not in ("img/s", "samples/s"):
        raise ValueError(f"unit must be img/s or samples/s, got {unit!r:.60}")
    return Profile(device_key, network, measurements, stopped, interrupted, company, idle_splits, dropped, beaten_by,
                   unit)


def _parse(raw: bytes, path: Path) -> dict[Key, Profile]:
    """The profiles in a table file's bytes; TableError for anything that is not a table we wrote."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise TableError(f"{path}: corrupt profile table, not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TableError(f"{path}: not a hetero profile table (no \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise TableError(f"{path}: profile table version {doc.get('version')!r} is not supported (expected {VERSION})")
    try:
        return {
            (device_key, network): _profile_from_json(device_key, network, entry)
            for device_key, networks in doc["profiles"].items()
            for network, entry in networks.items()
        }
    except _Implausible as exc:
        raise TableError(f"{path}: {exc}") from None
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise TableError(f"{path}: corrupt profile table ({type(exc).__name__}: {exc})") from None


def _dumps(profiles: dict[Key, Profile]) -> str:
    nested: dict[str, dict[str, dict]] = {}
    for (device_key, network), profile in sorted(profiles.items()):
        nested.setdefault(device_key, {})[network] = _profile_to_json(profile)
    return json.dumps({"format": FORMAT, "version": VERSION, "profiles": nested}, indent=1) + "\n"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on "<path>.lock" (flock: excludes other processes and other open tables)."""
    fd = lock_file(path.with_name(path.name + LOCK), wait=True)
    try:
        yield
    finally:
        os.close(fd)  # closing releases the lock


@dataclass
class ProfileTable:
    """All profiles in one table file; profiles put() here win over the file's when saved."""

    path: Path
    _profiles: dict[Key, Profile] = field(default_factory=dict, repr=False)
    _changed: set[Key] = field(default_factory=set, repr=False)  # keys put() here since load or save

    @classmethod
    def load(cls, path: str | Path, create: bool = False) -> ProfileTable:
        """The table at `path`; a missing file is an error unless `create` (then the table starts empty)."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if create:
                return cls(path)
            raise TableError(f"{path}: no such profile table") from None
        except OSError as exc:
            raise TableError(f"{path}: cannot read profile table ({exc.strerror})") from None
        return cls(path, _parse(raw, path))

    def get(self, device_key: str, network: str) -> Profile | None:
        return self._profiles.get((device_key, network))

    def superseded(self, device_key: str, network: str) -> list[Profile]:
        """Profiles of `network` by the same engine on the same hardware under another key (another
        target, TVM, engine version or driver).

        They do not apply to `device_key`: the caller tells the user so instead of trusting them silently.
        """
        hardware, engine = device_key.split(KEY_FIELDS)[0], engine_of(device_key)
        return [
            profile
            for (key, name), profile in sorted(self._profiles.items())
            if name == network and key != device_key and key.split(KEY_FIELDS)[0] == hardware
            and engine_of(key) == engine
        ]

    def put(self, profile: Profile) -> None:
        key = (profile.device_key, profile.network)
        self._profiles[key] = profile
        self._changed.add(key)

    def profiles(self) -> list[Profile]:
        return [self._profiles[key] for key in sorted(self._profiles)]

    def save(self) -> None:
        """Merge into the file under its lock and replace it atomically, keeping other processes' profiles.

        Profiles put() here win for their key; for other keys the file's copy wins, since it may be newer
        than the one loaded. A file that is corrupt or not a profile table raises TableError untouched.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            try:
                on_disk = _parse(self.path.read_bytes(), self.path)
            except FileNotFoundError:
                on_disk = {}
            merged = {**self._profiles, **on_disk, **{key: self._profiles[key] for key in self._changed}}
            # readers see the old or the new table, never half; 0644, since mkstemp's 0600 would hide it from others
            write_atomically(self.path, lambda f: f.write(_dumps(merged).encode()), mode=0o644)
        self._profiles = merged
        self._changed.clear()


def key_change(old: str, new: str) -> str:
    """How a stored key differs from a device's key of the same hardware, e.g. "tvm 0.26.0 (now tvm 0.27.0)"."""
    old_fields, new_fields = old.split(KEY_FIELDS)[1:], new.split(KEY_FIELDS)[1:]
    was = KEY_FIELDS.join(f for f in old_fields if f not in new_fields)
    now = KEY_FIELDS.join(f for f in new_fields if f not in old_fields)
    return f"{was or 'a key without ' + now} (now {now or 'without it'})"


def _row(m: Measurement) -> list:
    if m.error is not None:
        return [m.batch, None, None, None, None, None, m.error]
    return [
        m.batch,
        m.per_sample_s * 1e3,
        m.batch / m.total_median,
        m.exec_median * 1e3,
        m.h2d_median * 1e3,
        m.d2h_median * 1e3,
        "noisy" if m.noisy else "",
    ]


def format_table(table: ProfileTable) -> str:
    """The table for people: per profile a header line, then one row per profiled batch size."""
    if not table.profiles():
        return f"{table.path}: no profiles"
    blocks = []
    for profile in table.profiles():
        header = f"{profile.device_key}  [{profile.network}]"
        if profile.stopped:
            header += f"  stopped: {profile.stopped}"
        if profile.interrupted:
            header += "  (partial: the next run measures the rest)"
        if profile.dropped:
            header += f"  dropped after a probe: {profile.dropped}"
        if profile.company:
            header += (f"  in company: {statistics.median(profile.company):.2f}x its prediction "
                       f"(median of its last {len(profile.company)} splits)")
        if profile.idle_splits:
            header += f"  idle in the last {profile.idle_splits} splits"
        rows = tabulate(
            [_row(m) for m in profile.measurements],
            headers=["batch", "ms/sample", profile.unit, "exec ms", "H2D ms", "D2H ms", "note"],
            floatfmt=("", ".3f", ".1f", ".3f", ".3f", ".3f", ""),
        )
        blocks.append(f"{header}\n{rows}")
    return "\n\n".join(blocks)
