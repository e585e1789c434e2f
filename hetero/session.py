"""A network prepared once on its devices, then run any number of times.

    with hetero.Session("resnet-50", "cpu,gpu0", hetero.Options(precision="fp16")) as session:
        session.run(inputs=batch)            # one batch split over the devices: an InferenceReport
        session.stream("x.npy", "y.npy")     # bulk: every device pulls chunks: a StreamReport
        session.engines()                    # per device, its fastest engine and profile (what a server runs)

Preparing is what every run does before it computes: devices parsed, engines loaded (only those a run
uses, where the table has every profile), profiles measured where the table lacks them. A session does it
once per use (a batch size, a stream, serving) and keeps the result; its profile table is read once, and
what its runs teach the table (each device's slowdown in company) is written at most every SAVE_EVERY_S
and when the session closes. :func:`infer` and :func:`stream` are one-call sessions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .buckets import DEFAULT_BUCKETS, Bucket, BucketRun, Buckets
from .devices import DEFAULT_PRECISION, Device
from .engines import Engine
from .errors import one_line
from .execute import run_split
from .images import ImageFolder
from .inference import (
    DEFAULT_BUDGET_S,
    DEFAULT_TABLE,
    DEFAULT_TUNE_BATCH,
    Fault,
    InferenceReport,
    check_request,
    choose_engines,
    learn_company,
    plan,
    share_limits,
)
from .models import Network, get_network
from .prepare import Pick, Ready, prepare_engines
from .profile import SEED_BATCHES
from .selection import fastest_per_device
from .stream import Pass, StreamReport, fastest_streaming, open_inputs, open_outputs, stream_into, whole_input
from .table import Profile, ProfileTable, TableError

log = logging.getLogger(__name__)

SAVE_EVERY_S = 30.0


@dataclass(frozen=True)
class Options:
    """How a session prepares and runs: one object for what infer, stream, the cluster and the server share."""

    table: str | Path | ProfileTable = DEFAULT_TABLE
    profile_batches: tuple[int, ...] = SEED_BATCHES
    reprofile: bool = False
    budget_s: float = DEFAULT_BUDGET_S  # profiling time per device once per-sample time has flattened
    progress: bool = True
    load: Callable[[Network, Device], Engine] | None = None  # makes each device's one engine instead
    precision: str = DEFAULT_PRECISION
    engine: str | None = None  # --engine's text; None: $HETERO_ENGINE, else auto
    tune_trials: int = 0
    tune_batch: int = DEFAULT_TUNE_BATCH
    partitioner: str = "exact"
    buckets: tuple[int, ...] = DEFAULT_BUCKETS  # the sequence lengths named inputs run at; (): each batch at its own


class Session:
    """`network` prepared on `devices` (names such as "cpu,gpu0", or Device records) with `options`."""

    def __init__(self, network: str | Network, devices: str | Sequence[Device] = "cpu", options: Options = Options()):
        self.network = get_network(network) if isinstance(network, str) else network
        self.devices = devices
        self.options = options
        table = options.table
        self.table = table if isinstance(table, ProfileTable) else ProfileTable.load(Path(table), create=True)
        self._prepared: dict[Hashable, Ready] = {}
        self._learned = False
        self._saved_at = time.monotonic()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def prepare(self, use: Hashable, pick: Pick | None, network: Network | None = None) -> Ready:
        """The engines and profiles for one use (a split of some size, a stream, serving) of `network` (the
        session's, or the one its named inputs fixed the sequence length of), prepared once."""
        network = network or self.network
        if (network.key, use) not in self._prepared:
            o = self.options
            self._prepared[network.key, use] = prepare_engines(
                network, self.devices, self.table, o.profile_batches, o.reprofile, o.budget_s, o.progress, o.load,
                o.precision, o.engine, o.tune_trials, o.tune_batch, pick)
        return self._prepared[network.key, use]

    def run(self, inputs: np.ndarray | Mapping[str, np.ndarray] | None = None, batch: int | None = None) -> InferenceReport:
        """`inputs` (or `batch` deterministic random samples) split over the devices, each running its share
        with the engine predicted fastest for it; a network of named inputs takes them by name, a mapping,
        run in sequence buckets (hetero.buckets) as the options say, one split per bucket.
        A device that fails to load, runs no profiled size, or fails on its share is reported in the faults
        while the others do its work; HeteroError only when none can."""
        if isinstance(inputs, Mapping):  # named inputs fix the dimensions the network leaves open
            check_request(self.network.fit(inputs), batch, inputs, self.options.profile_batches)
            return self._run_buckets(Buckets(self.network, inputs, self.options.buckets))
        check_request(self.network, batch, inputs, self.options.profile_batches)
        inputs = self.network.random_input(batch) if inputs is None else inputs
        return self._split(self.network, inputs, self._ready_to_split(self.network, len(inputs)))

    def _ready_to_split(self, net: Network, samples: int, per_size: bool = True) -> Ready:
        """The engines a split of `samples` runs, picked for that size; for a network fitted to a sequence
        length (not `per_size`), those first picked at that length, whatever later batches hold: each call's
        inputs fall into buckets of other sizes, and an engine is compiled and loaded once per length."""
        partitioner = self.options.partitioner
        return self.prepare(("split", samples if per_size else "any"),
                            lambda options: choose_engines(options, samples, partitioner)[0], net)

    def _split(self, net: Network, inputs: np.ndarray, ready: Ready) -> InferenceReport:
        """One split of `inputs` over the engines `ready` holds."""
        partitioner = self.options.partitioner
        engines, profiles = choose_engines(ready.options, len(inputs), partitioner)

        def replan(survivors: list[int], samples: int) -> tuple[list[int], list[float]]:
            shares, predicted, _ = plan([profiles[i] for i in survivors], samples, partitioner)
            return shares, predicted

        shares, predicted, partition_s = plan(profiles, len(inputs), partitioner)
        limits = share_limits(profiles, [engine.device for engine in engines])
        outputs, results, wall_s = run_split(engines, inputs, shares, predicted, limits, replan)
        self._learned |= learn_company(self.table, profiles, results)
        self._save(due=True)
        faults = ready.faults + [Fault(r.device.name, "run", r.error, r.size - r.completed) for r in results if r.error]
        return InferenceReport(network=net.name, batch=len(inputs), partitioner=partitioner, partition_s=partition_s,
                               predicted_s=max(predicted), wall_s=wall_s, shares=results, outputs=outputs,
                               profiled=ready.profiled, faults=faults, dropped=ready.dropped, unit=net.rate_unit)

    def _run_buckets(self, grouping: Buckets) -> InferenceReport:
        """One split per bucket, shortest first, after every bucket's engines are ready; the outputs in input
        order at the batch's length, the wall time that of them all, cutting and padding included."""
        if len(grouping.buckets) == 1 and grouping.buckets[0].network is grouping.full:
            return self._split(grouping.full, grouping.records,
                               self._ready_to_split(grouping.full, len(grouping.records), per_size=False))
        ready = [self._ready_to_split(b.network, len(b.samples), per_size=False) for b in grouping.buckets]
        outputs = np.empty(len(grouping.records), grouping.full.output_dtype)
        reports = []
        start = time.perf_counter()
        for bucket, bucket_ready in zip(grouping.buckets, ready, strict=True):
            report = self._split(bucket.network, grouping.inputs_of(bucket), bucket_ready)
            grouping.place(outputs, bucket, report.outputs)
            reports.append(report)
        wall_s = time.perf_counter() - start
        return InferenceReport(
            network=grouping.full.name, batch=len(outputs), partitioner=self.options.partitioner,
            partition_s=sum(r.partition_s for r in reports), predicted_s=sum(r.predicted_s for r in reports),
            wall_s=wall_s, shares=[share for r in reports for share in r.shares], outputs=outputs,
            profiled=list(dict.fromkeys(p for r in reports for p in r.profiled)),
            faults=list({(f.device, f.stage, f.error): f for r in reports for f in r.faults}.values()),
            dropped=list(dict.fromkeys(d for r in reports for d in r.dropped)), unit=grouping.full.rate_unit,
            buckets=[BucketRun(b.length, len(b.samples), r.wall_s, len(r.shares))
                     for b, r in zip(grouping.buckets, reports, strict=True)])

    def stream(self, inputs: str | Path | np.ndarray | ImageFolder | Mapping[str, str | Path | np.ndarray],
               output: str | Path | None = None, ray: str | None = None) -> StreamReport:
        """Every sample of `inputs` (an array, a .npy file, memory-mapped, or a folder of images; for a network
        of named inputs, a mapping of name to array or .npy file) through the network on all devices at once,
        the outputs written in input order to `output` (a .npy file) or returned. With an output file an
        interrupted run resumes. Named inputs run in sequence buckets (hetero.buckets) as the options say, one
        pass over the devices per bucket. With `ray` (a Ray cluster's address, or "auto"), every node's devices
        take part: hetero.cluster."""
        net = self.network
        if isinstance(inputs, Mapping):
            # read into one array of records, as a split's are: token ids are small beside images
            named = {name: np.load(value, mmap_mode="r", allow_pickle=False) if isinstance(value, (str, Path))
                     else value for name, value in inputs.items()}
            if ray is None:
                return self._stream_buckets(Buckets(self.network, named, self.options.buckets), output)
            # over a Ray cluster, in one stream at the inputs' own length: every node fits the network to it
            net = net.fit(named)
            inputs = net.to_records(named)
        if ray is not None:
            from .cluster import stream as cluster_stream

            o = self.options
            return cluster_stream(net, self.devices, inputs, output, self.table, o.profile_batches,
                                  o.budget_s, o.progress, o.load, o.precision, o.engine, address=ray)
        data = open_inputs(inputs, net)
        output = Path(output) if output is not None else None
        with open_outputs(net, data, inputs, output) as (ledger, outputs):
            part = whole_input(net, lambda: self._ready_to_stream(net), data, outputs)
            return stream_into(net.name, [part], len(data), output, ledger, outputs, self.options.progress,
                               net.rate_unit)

    def _ready_to_stream(self, net: Network) -> Ready:
        return self.prepare("stream", lambda options: fastest_streaming(options, net.input_bytes)[0], net)

    def _stream_buckets(self, grouping: Buckets, output: str | Path | None) -> StreamReport:
        """A stream of named inputs, one pass per sequence bucket, shortest first. Its record of the samples done
        counts positions in that order, so it says which buckets it was made with: a resumed run has the same."""
        full = grouping.full
        output = Path(output) if output is not None else None
        order = {"buckets": [bucket.length for bucket in grouping.buckets]}
        with open_outputs(full, grouping.records, grouping.records, output, order) as (ledger, outputs):
            passes, start = [], 0
            for bucket in grouping.buckets:
                passes.append(self._bucket_pass(grouping, bucket, start, outputs))
                start += len(bucket.samples)
            return stream_into(full.name, passes, len(grouping.records), output, ledger, outputs,
                               self.options.progress, full.rate_unit)

    def _bucket_pass(self, grouping: Buckets, bucket: Bucket, start: int, outputs: np.ndarray) -> Pass:
        """The pass of one bucket, whose samples are the positions [start, start + its samples) of the order."""

        def read(first: int, end: int) -> np.ndarray:
            return grouping.inputs_of(bucket, first - start, end - start)

        def write(first: int, end: int, result: np.ndarray) -> None:
            grouping.place(outputs, bucket, result, first - start)

        return Pass(bucket.network, lambda: self._ready_to_stream(bucket.network), start,
                    start + len(bucket.samples), read, write, bucket.length)

    def engines(self, network: Network | None = None) -> list[tuple[Engine, Profile]]:
        """Per device that can run, its fastest engine at its largest profiled batch, with its profile: for the
        session's network, or `network` (the session's fitted to a sequence length)."""
        ready = self.prepare("serve", fastest_per_device, network)
        return [pairs[0] for pairs in ready.options]

    @property
    def faults(self) -> list[Fault]:
        """The devices left out of any preparation so far."""
        return list({f.device: f for ready in self._prepared.values() for f in ready.faults}.values())

    def _save(self, due: bool = False) -> None:
        """Write what the runs taught the table: now, or, when `due`, if SAVE_EVERY_S has passed."""
        if not self._learned or (due and time.monotonic() - self._saved_at < SAVE_EVERY_S):
            return
        try:
            self.table.save()
        except (TableError, OSError) as exc:  # the outputs are done; a table that cannot be written only forgets
            log.warning(f"the runs' timings were not saved: {one_line(exc)}")
        self._learned, self._saved_at = False, time.monotonic()

    def close(self) -> None:
        self._save()


def infer(network: str | Network, devices: str | Sequence[Device] = "cpu", batch: int | None = None,
          inputs: np.ndarray | Mapping[str, np.ndarray] | None = None, options: Options = Options(),
          **changes) -> InferenceReport:
    """Run `inputs` (or `batch` deterministic random samples) through `network` split over `devices`, in one
    call: :meth:`Session.run` of a session with `options` (keywords such as `precision="fp16"` change them).
    A network of named inputs (a BERT-style encoder) takes `inputs` by name: {"input_ids": ..., ...}; with an
    "attention_mask" they run in sequence buckets (hetero.buckets; `buckets=(32, 64)` chooses them, `buckets=()`
    runs every sample at the inputs' length)."""
    with Session(network, devices, replace(options, **changes)) as session:
        return session.run(inputs, batch)


def stream(network: str | Network, devices: str | Sequence[Device] = "cpu",
           inputs: str | Path | np.ndarray | ImageFolder | Mapping[str, str | Path | np.ndarray] = "",
           output: str | Path | None = None, ray: str | None = None, options: Options = Options(),
           **changes) -> StreamReport:
    """Every sample of `inputs` through `network` on all `devices`, in one call: :meth:`Session.stream`."""
    with Session(network, devices, replace(options, **changes)) as session:
        return session.stream(inputs, output, ray)


def stream_arrays(network: str | Network, devices: str | Sequence[Device], arrays: Iterable[np.ndarray],
                  options: Options = Options(), **changes) -> Iterator[np.ndarray]:
    """The outputs of each array of `arrays` in turn, each streamed over all `devices` by one session: for
    inputs that arrive in pieces, such as a reader's batches."""
    with Session(network, devices, replace(options, **changes)) as session:
        for inputs in arrays:
            yield session.stream(inputs).outputs
