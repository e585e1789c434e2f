"""Bulk inference: any number of samples, pulled in chunks by every device until none are left.

A split of one batch plans each device's share once, so a device that slows down holds up the whole
batch. A stream instead keeps one queue of samples that each device pulls from through the data path
(hetero.feed), a chunk at a time, each device's chunk sized to take about the same time
(TARGET_CHUNK_S), first from its profile and then from its measured throughput, with as many chunks
in flight as its engine overlaps. Inputs are read straight from the array or memory-mapped file into
each engine's staging; outputs land in input order in a memory-mapped file, so host memory stays flat
however many samples there are.

Nothing finished is lost: each chunk's outputs are flushed to ``<output>.partial`` before the chunk is
recorded in ``<output>.progress.json``; after Ctrl-C, a crash or a kill, the same command computes
only what was not recorded, and when every sample is done the partial file becomes the output and the
record is removed. Before any work, the output is locked against other runs and the partial file's space
reserved on disk (hetero.io).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .buckets import BucketRun, row_lengths
from .engines import Engine
from .errors import HeteroError, UnreadableInput, one_line
from .feed import TARGET_CHUNK_S, ChunkSizer, Deliver, DeviceStream, Range, Read, WorkQueue, chunk_cap, feed
from .images import ImageFolder
from .inference import Fault, plan, share_limits
from .io import PARTIAL, open_partial, output_lock, write_atomically
from .models import Network
from .prepare import Ready
from .table import Profile

log = logging.getLogger(__name__)

STREAM_FROM = 1024  # inputs longer than this are streamed; shorter ones run as one split, as in the paper
PROGRESS = ".progress.json"


def streams(samples: int, output: Path) -> bool:
    """Whether Inference.py streams an input of `samples` into `output`: a long one, or one whose earlier
    run was interrupted (it resumes)."""
    return samples > STREAM_FROM or output.with_name(output.name + PROGRESS).exists()


class StreamInterrupted(KeyboardInterrupt):
    """Ctrl-C during a stream: the finished chunks are kept, and the message says how to resume."""


@dataclass
class StreamReport:
    network: str
    samples: int  # in the whole input
    resumed: int  # already done by an earlier, interrupted run
    wall_s: float
    devices: list[DeviceStream]
    outputs: np.ndarray | None  # when no output file was given
    profiled: list[str] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    unit: str = "img/s"  # what its throughputs count: Network.rate_unit
    buckets: list[BucketRun] = field(default_factory=list)  # sequence buckets, one pass each, the devices in order

    @property
    def computed(self) -> int:
        return self.samples - self.resumed

    @property
    def throughput(self) -> float:
        return self.computed / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "network": self.network, "samples": self.samples, "resumed": self.resumed, "computed": self.computed,
            "wall_ms": self.wall_s * 1e3, "throughput_img_s": self.throughput, "unit": self.unit,
            "profiled": self.profiled,
            "devices": [vars(d) | {"img_s": d.throughput, "timing": vars(d.timing)} | ({"sequence": n} if n else {})
                        for d, n in zip(self.devices, row_lengths(self.buckets) or [0] * len(self.devices), strict=True)],
            "faults": [vars(f) for f in self.faults],
            "buckets": [dataclasses.asdict(b) for b in self.buckets],
        }


def chunk_size(profile: Profile, limit: int | None, sample_bytes: int, target_s: float = TARGET_CHUNK_S) -> int:
    """The most samples the device runs in about `target_s` by its profile, within its call limit and
    MAX_CHUNK_BYTES of inputs; at least 1."""
    costs = profile.cost_curve(chunk_cap(limit, sample_bytes))
    return max(1, int(np.searchsorted(costs, target_s, side="right")) - 1)


class Ledger:
    """The samples done so far, kept beside the output so that a later run resumes where this one stopped."""

    def __init__(self, path: Path | None, identity: dict, done: list[list[int]]):
        self.path, self.identity, self.done = path, identity, done
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, identity: dict) -> Ledger:
        if not path.exists():
            return cls(path, identity, [])
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise HeteroError(f"{path}: cannot read the record of an earlier run ({one_line(exc)}); "
                              f"remove it to start again") from None
        if saved.get("identity") != identity:
            raise HeteroError(f"{path}: an earlier run into this output had another network or input; remove it "
                              f"and {path.name.removesuffix(PROGRESS)}{PARTIAL} to start again, or pick another output")
        return cls(path, identity, saved["done"])

    def count(self) -> int:
        return sum(end - start for start, end in self.done)

    def pending(self, samples: int) -> list[tuple[int, int]]:
        """The ranges of samples not done yet, in order."""
        ranges, first = [], 0
        for start, end in sorted(self.done):
            if start > first:
                ranges.append((first, start))
            first = max(first, end)
        return ranges + ([(first, samples)] if first < samples else [])

    def record(self, start: int, end: int) -> None:
        with self._lock:
            merged = []
            for first, last in sorted(self.done + [[start, end]]):
                if merged and first <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], last)
                else:
                    merged.append([first, last])
            self.done = merged
            if self.path is not None:
                record = json.dumps({"identity": self.identity, "done": merged}).encode()
                write_atomically(self.path, lambda f: f.write(record))

    def remove(self) -> None:
        if self.path is not None:
            with suppress(FileNotFoundError):
                self.path.unlink()


def open_inputs(inputs: str | Path | np.ndarray | ImageFolder, network: Network) -> np.ndarray | ImageFolder:
    """The samples: an array as it is, a .npy file memory-mapped, a folder of images decoded as read; checked
    against what `network` takes."""
    if isinstance(inputs, (str, Path)) and Path(inputs).is_dir():
        data = ImageFolder(Path(inputs), network.input_shape)
    elif isinstance(inputs, (str, Path)):
        data = np.load(inputs, mmap_mode="r", allow_pickle=False)
    else:
        data = inputs if isinstance(inputs, ImageFolder) else np.asarray(inputs)
    network.check_inputs(data)
    return data


def _identity(network: Network, inputs: np.ndarray | ImageFolder, source: Path | None) -> dict:
    """What an output file's samples depend on: the network and the input (a file's path, size and time,
    a folder's images, or an array's bytes); the order they are computed in is the caller's to add."""
    if isinstance(inputs, ImageFolder):
        what = inputs.identity()
    elif source is not None:
        stat = source.stat()
        what = {"path": str(source.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    else:
        what = {"sha256": hashlib.sha256(np.ascontiguousarray(inputs).data).hexdigest()}
    return {"network": network.key, "input": what, "shape": list(inputs.shape), "dtype": str(inputs.dtype)}


def open_ledger(network: Network, data: np.ndarray | ImageFolder, inputs: str | Path | np.ndarray | ImageFolder,
                output: Path | None, order: Mapping = {}) -> Ledger:
    """The record of the samples done for `output` (that of an earlier, interrupted run into it), or an
    empty one kept in memory when the outputs are returned rather than written: the input is then not
    digested, since nothing is resumed.  `data` is what :func:`open_inputs` made of `inputs`; `order` says
    what else the record's positions depend on (the sequence buckets the samples are computed in)."""
    if output is None:
        return Ledger(None, {}, [])
    source = Path(inputs) if isinstance(inputs, (str, Path)) else None
    return Ledger.open(output.with_name(output.name + PROGRESS), _identity(network, data, source) | dict(order))


@contextmanager
def open_outputs(network: Network, data: np.ndarray | ImageFolder, inputs: str | Path | np.ndarray | ImageFolder,
                 output: Path | None, order: Mapping = {}) -> Iterator[tuple[Ledger, np.ndarray]]:
    """The record of the samples done and the array the outputs go to, for as long as the stream runs. With
    an output file, before any work: the output locked against other runs (a HeteroError naming the one
    that holds it), the record of an earlier, interrupted run into it read (:func:`open_ledger`, with `order`), and
    "<output>.partial" memory-mapped with its whole size reserved on disk (a HeteroError where it has no
    room). A run that ends with no sample done leaves no partial file. Without an output file: both in memory."""
    shape = (len(data), *network.output_shape)
    if output is None:
        yield open_ledger(network, data, inputs, None), np.empty(shape, network.output_dtype)
        return
    with output_lock(output):
        ledger = open_ledger(network, data, inputs, output, order)
        outputs = open_partial(output, network.output_dtype, shape, ledger.path if ledger.count() else None)
        try:
            yield ledger, outputs
        finally:
            if not ledger.count():  # reserved space, and nothing in it that a later run could resume
                with suppress(FileNotFoundError):
                    output.with_name(output.name + PARTIAL).unlink()


def run_device_threads(threads: Sequence[threading.Thread], queue: WorkQueue, ledger: Ledger, samples: int,
                       bar: tqdm) -> float:
    """Run each device's thread until the queue is empty, and the seconds that took. Ctrl-C hands out no
    more chunks, lets each device finish the one it computes, and raises StreamInterrupted."""
    start = time.perf_counter()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.1)
    except KeyboardInterrupt:
        queue.stop()
        for thread in threads:
            thread.join()
        raise StreamInterrupted(f"interrupted after {ledger.count()} of {samples} samples; they are kept, and the "
                                f"same command computes the rest") from None
    finally:
        bar.close()
    return time.perf_counter() - start


def finish_stream(unreadable: list[str], stats: Sequence[DeviceStream], ledger: Ledger, samples: int,
                  output: Path | None, outputs: np.ndarray) -> np.ndarray | None:
    """After the devices stopped: HeteroError if an input did not read or samples are left (those done are
    kept); else the outputs, or, with an output file, None once the partial file has become it."""
    if unreadable:
        raise HeteroError(f"{unreadable[0]}; the {ledger.count()} samples done are kept")
    left = samples - ledger.count()
    if left:
        failures = "; ".join(f"{s.device} failed: {s.error}" for s in stats if s.error) or "no device could run"
        raise HeteroError(f"{left} of {samples} samples could not run ({failures}); the {ledger.count()} done are "
                          f"kept, and the same command computes the rest")
    if output is None:
        return outputs
    outputs.flush()
    os.replace(output.with_name(output.name + PARTIAL), output)
    ledger.remove()
    return None


def _stream_devices(engines: Sequence[Engine], profiles: Sequence[Profile], samples: int,
                    sample_bytes: int) -> list[tuple[Engine, ChunkSizer]]:
    """The devices that take part, each with its chunk sizer: those a split of many chunks would give
    work, so that a device that slows the others more than it adds (its slowdown in company) stays out."""
    limits = share_limits(profiles, [engine.device for engine in engines])
    sizes = [chunk_size(profile, limit, sample_bytes) for profile, limit in zip(profiles, limits)]
    shares, _, _ = plan(profiles, min(samples, 8 * sum(sizes)))
    return [(engine, ChunkSizer(size, limit, sample_bytes))
            for engine, size, limit, share in zip(engines, sizes, limits, shares) if share]


def fastest_streaming(options: Sequence[Sequence[tuple[Engine, Profile]]], sample_bytes: int) -> tuple[list, list]:
    """Per device, the engine with the highest throughput at the chunk it would run."""
    engines, profiles = [], []
    for pairs in options:
        def rate(pair: tuple[Engine, Profile]) -> float:
            engine, profile = pair
            size = chunk_size(profile, share_limits([profile], [engine.device])[0], sample_bytes)
            return size / max(profile.predict(size), 1e-12)
        engine, profile = max(pairs, key=rate)
        engines.append(engine)
        profiles.append(profile)
    return engines, profiles


@dataclass
class Pass:
    """One network streamed over the positions [start, end) of the order a stream computes its samples in: the
    whole input in its order, or the samples of one sequence bucket (hetero.buckets), read from and written to
    where they are. Its engines are prepared only when something of it is left to compute."""

    network: Network
    prepare: Callable[[], Ready]
    start: int
    end: int
    read: Read  # the inputs at positions [start, end) of the order
    write: Deliver  # their outputs, to where those samples' outputs go
    length: int = 0  # a bucket's sequence length; 0 for a stream of one network
    decodes: bool = False  # reading decodes (images): the next chunk is read while one computes


def whole_input(network: Network, prepare: Callable[[], Ready], data: np.ndarray | ImageFolder,
                outputs: np.ndarray) -> Pass:
    """The one pass of a stream that computes its samples in input order."""

    def write(start: int, end: int, result: np.ndarray) -> None:
        outputs[start:end] = result

    # a view of an array or a memory-mapped file: the engine copies from it
    return Pass(network, prepare, 0, len(data), lambda start, end: data[start:end], write,
                decodes=isinstance(data, ImageFolder))


def _within(ranges: Sequence[Range], start: int, end: int) -> list[Range]:
    """The parts of `ranges` inside [start, end)."""
    return [(max(first, start), min(last, end)) for first, last in ranges if first < end and last > start]


def stream_into(name: str, passes: Sequence[Pass], samples: int, output: Path | None, ledger: Ledger,
                outputs: np.ndarray, progress: bool, unit: str = "img/s") -> StreamReport:
    """A stream on this machine, once its outputs are held (:func:`open_outputs`): pass after pass, every device
    pulls chunks of what is left of it through the data path until none is; `unit` is what its rates count."""
    resumed = ledger.count()
    unreadable: list[str] = []
    stats: list[DeviceStream] = []
    faults: list[Fault] = []
    profiled: list[str] = []
    runs: list[BucketRun] = []
    wall_s = 0.0
    for part in passes:
        ranges = _within(ledger.pending(samples), part.start, part.end)
        if not ranges:
            continue
        ready = part.prepare()
        profiled += ready.profiled
        faults += ready.faults
        seconds, done = _stream_pass(name, part, ready, ranges, ledger, samples, outputs, progress, unit, unreadable)
        wall_s += seconds
        stats += done
        runs.append(BucketRun(part.length, sum(end - start for start, end in ranges), seconds, len(done)))
        if unreadable:
            break
    faults += [Fault(s.device, "run", s.error) for s in stats if s.error]
    outputs = finish_stream(unreadable, stats, ledger, samples, output, outputs)
    return StreamReport(name, samples, resumed, wall_s, stats, outputs, list(dict.fromkeys(profiled)),
                        list({(f.device, f.stage, f.error): f for f in faults}.values()), unit,
                        runs if any(part.length for part in passes) else [])


def _stream_pass(name: str, part: Pass, ready: Ready, ranges: list[Range], ledger: Ledger, samples: int,
                 outputs: np.ndarray, progress: bool, unit: str, unreadable: list[str]) -> tuple[float, list[DeviceStream]]:
    """One pass over `ranges` with the engines `ready` holds: its seconds and what each device did; an input
    that did not read is added to `unreadable`."""
    sample_bytes = part.network.input_bytes
    engines, profiles = fastest_streaming(ready.options, sample_bytes)
    left = sum(end - start for start, end in ranges)
    taking = _stream_devices(engines, profiles, left, sample_bytes)
    queue = WorkQueue(ranges)
    stats = [DeviceStream(e.device.name, e.name, sizer.size) for e, sizer in taking]
    for engine, sizer in taking:
        engine.on_worker(engine.prepare, sizer.size).result()
    size = part.end - part.start
    bar = tqdm(total=size, initial=size - left, unit=unit.removesuffix("/s"), disable=not progress, leave=False,
               desc=f"{name}, sequence {part.length}" if part.length else name)

    def deliver(start: int, end: int, result: np.ndarray) -> None:
        part.write(start, end, result)
        if isinstance(outputs, np.memmap):
            outputs.flush()  # on disk before it is recorded as done
        ledger.record(start, end)
        bar.update(end - start)
        bar.set_postfix_str(", ".join(f"{s.device} {s.throughput:.0f} {unit}" for s in stats))

    def run_device(engine: Engine, sizer: ChunkSizer, stat: DeviceStream) -> None:
        try:
            engine.on_worker(feed, engine, queue, part.read, deliver, stat, sizer, part.decodes).result()
        except UnreadableInput as exc:
            unreadable.append(str(exc))

    threads = [threading.Thread(target=run_device, args=(engine, sizer, stat), name=f"hetero-stream-{engine.device.name}")
               for (engine, sizer), stat in zip(taking, stats)]
    return run_device_threads(threads, queue, ledger, samples, bar), stats
