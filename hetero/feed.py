"""The data path: one loop per device that keeps its engine fed at the engine's compute speed.

A device's loop takes a range of samples from a :class:`WorkQueue`, hands its engine a view of those
samples (the engine copies them straight into its own staging, with as many threads as the copy needs;
nothing is copied beforehand), and keeps up to ``engine.in_flight`` calls launched at once, so that an
accelerator stages and uploads one chunk and downloads another while it computes a third. Each chunk's
outputs go to ``deliver`` in the order the device took them. Chunk sizes follow the throughput measured
as the loop runs, and near the end of the queue each device takes only its fair part of what is left,
so that the devices finish together.

The loop knows nothing of files, Ray or servers: a split batch (hetero.execute), a stream with its
ledger (hetero.stream) and a Ray node (hetero.cluster) are its callers, each with its own ``deliver``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .engines import Call, Engine, Timing
from .errors import UnreadableInput, one_line

TARGET_CHUNK_S = 0.25  # long enough for efficient calls, short enough that the last chunks end together
MAX_CHUNK_BYTES = 256 << 20  # a chunk's inputs: an accelerator stages in_flight of them at once

Range = tuple[int, int]  # samples [start, end)
Read = Callable[[int, int], np.ndarray]  # the samples of a range: a view of them where the input allows
Deliver = Callable[[int, int, np.ndarray], None]  # a range's outputs, valid only during the call


@dataclass
class DeviceStream:
    """What one device did in a feed."""

    device: str
    engine: str
    chunk: int  # samples per chunk, at the start
    samples: int = 0
    chunks: int = 0
    busy_s: float = 0.0  # with at least one call in flight, copies included
    error: str | None = None
    timing: Timing = field(default_factory=lambda: Timing(0.0, 0.0, 0.0))  # the calls' own, summed

    @property
    def throughput(self) -> float:
        return self.samples / self.busy_s if self.busy_s else 0.0


class WorkQueue:
    """The ranges of samples still to compute; each device takes the next samples of the first range.

    A range taken is in flight until it is done or given back (its device failed); a device that finds
    nothing to take waits while others have ranges in flight, since a failure may give one back.
    Devices that report their throughput (:meth:`report`) take, near the end, no more than their part
    of what is left in proportion to it, so that a slow device does not hold the others up with a
    last chunk that they would have finished sooner.
    """

    def __init__(self, ranges: list[Range]):
        self._ranges = list(ranges)
        self._in_flight = 0
        self._changed = threading.Condition()
        self._stopped = False
        self._rates: dict[str, float] = {}

    def report(self, device: str, rate: float | None) -> None:
        """`device`'s samples per second, or None once it takes no more."""
        with self._changed:
            if rate is None:
                self._rates.pop(device, None)
            else:
                self._rates[device] = rate
            self._changed.notify_all()

    def _fair(self, device: str | None, size: int) -> int:
        rate, total = self._rates.get(device or "", 0.0), sum(self._rates.values())
        if not rate or rate == total:
            return size
        left = sum(end - start for start, end in self._ranges)
        part = left * rate / total
        # the fastest rounds up, so that no sample is left over for a chunk of its own
        return min(size, math.ceil(part) if rate >= max(self._rates.values()) else int(part))

    def take(self, size: int, wait: bool = True, device: str | None = None) -> Range | None:
        with self._changed:
            while True:
                if self._stopped:
                    return None
                fair = self._fair(device, size) if self._ranges else 0
                if fair or (self._ranges and not wait):
                    break
                if not wait or not (self._ranges or self._in_flight):
                    return None
                self._changed.wait()
            if not fair:
                return None
            start, end = self._ranges[0]
            taken = (start, min(end, start + fair))
            if taken[1] == end:
                self._ranges.pop(0)
            else:
                self._ranges[0] = (taken[1], end)
            self._in_flight += 1
            return taken

    def left(self) -> list[Range]:
        """The ranges no device has taken."""
        with self._changed:
            return list(self._ranges)

    def done(self) -> None:
        with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()

    def give_back(self, taken: Range) -> None:
        with self._changed:
            self._ranges.insert(0, taken)
            self._ranges.sort()
            self._in_flight -= 1
            self._changed.notify_all()

    def stop(self) -> None:
        """Hand out nothing more (Ctrl-C): each device finishes the chunks it has."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()


def chunk_cap(limit: int | None, sample_bytes: int) -> int:
    """The most samples one chunk holds: within the engine's call limit and MAX_CHUNK_BYTES of inputs."""
    return max(1, min(limit or MAX_CHUNK_BYTES, MAX_CHUNK_BYTES // max(sample_bytes, 1)))


class ChunkSizer:
    """A device's chunk size: what it computes in about `target_s`, first by its profile, then by the
    throughput measured as it runs; a power of two (so an engine meets few call sizes), within the
    engine's call limit and MAX_CHUNK_BYTES of inputs."""

    def __init__(self, first: int, limit: int | None, sample_bytes: int, target_s: float = TARGET_CHUNK_S,
                 adaptive: bool = True):
        self.cap = chunk_cap(limit, sample_bytes)
        self.target_s, self.adaptive = target_s, adaptive
        self.size = min(first, self.cap)

    def update(self, rate: float) -> None:
        if not self.adaptive:
            return
        wanted = max(1, min(self.cap, int(rate * self.target_s)))
        self.size = wanted if wanted == self.cap else 1 << (wanted.bit_length() - 1)


def feed(engine: Engine, queue: WorkQueue, read: Read, deliver: Deliver, stats: DeviceStream,
         sizer: ChunkSizer, read_ahead: bool = False) -> None:
    """Run chunks of `queue` on `engine` until none is left for it; call on the engine's worker thread.

    `read(start, end)` gives the samples (with `read_ahead`, for inputs that decode as they are read, the
    next chunk is read on a thread of its own while the current one is launched); `deliver(start, end,
    outputs)` takes each chunk's outputs, in the order taken. When the engine fails, its ranges go back to
    the queue and `stats.error` says why; an UnreadableInput stops the queue, the chunks in flight are
    finished, and it is raised.
    """
    in_flight: deque[tuple[Range, Call, int]] = deque()  # (range, call, samples)
    reader = ThreadPoolExecutor(1, f"hetero-{engine.device.name}-read") if read_ahead else None
    ahead: tuple[Range, Future] | None = None
    unreadable: UnreadableInput | None = None
    busy_since = 0.0

    def give_back_all(current: Range | None) -> None:
        for taken in [current, *(r for r, _, _ in in_flight)]:
            if taken is not None:
                queue.give_back(taken)
        in_flight.clear()

    try:
        while True:
            while unreadable is None and len(in_flight) < engine.in_flight:
                if ahead is not None:
                    (taken, reading), ahead = ahead, None
                else:
                    taken = queue.take(sizer.size, not in_flight, stats.device)
                    if taken is None:
                        break
                    reading = reader.submit(read, *taken) if reader else None
                if reader is not None:
                    following = queue.take(sizer.size, False, stats.device)
                    ahead = (following, reader.submit(read, *following)) if following else None
                try:
                    batch = reading.result() if reading else read(*taken)
                except UnreadableInput as exc:
                    unreadable = exc
                    queue.give_back(taken)
                    queue.stop()
                    break
                if not in_flight:  # before the launch: an engine that does not overlap calls computes in it
                    busy_since = time.perf_counter()
                try:
                    call = engine.launch(batch)
                except Exception as exc:  # out of memory, a lost device: the others take its samples
                    stats.error = one_line(exc)
                    give_back_all(taken)
                    return
                in_flight.append((taken, call, len(batch)))
            if not in_flight:
                break
            taken, call, samples = in_flight.popleft()
            try:
                outputs, timing = call.result()
            except Exception as exc:  # noqa: BLE001 -- as above
                stats.error = one_line(exc)
                give_back_all(taken)
                return
            now = time.perf_counter()
            stats.busy_s += now - busy_since
            busy_since = now
            deliver(*taken, outputs)
            queue.done()
            stats.samples += samples
            stats.chunks += 1
            stats.timing = Timing.summed([stats.timing, timing])
            sizer.update(stats.throughput)
            queue.report(stats.device, stats.throughput)
    finally:
        queue.report(stats.device, None)
        if ahead is not None:
            queue.give_back(ahead[0])
        if reader is not None:
            reader.shutdown(wait=False)
    if unreadable is not None:
        raise unreadable


def feed_batch(engine: Engine, batch: np.ndarray, step: int, stats: DeviceStream) -> np.ndarray:
    """`batch` through `engine` in calls of `step` samples, on the engine's worker thread: the outputs of the
    samples done, in order; all of them, unless `stats.error` says why the engine stopped."""
    outputs = np.empty((len(batch), *engine.network.output_shape), engine.network.output_dtype)

    def deliver(start: int, end: int, result: np.ndarray) -> None:
        outputs[start:end] = result

    feed(engine, WorkQueue([(0, len(batch))]), lambda start, end: batch[start:end], deliver, stats,
         ChunkSizer(step, step, 0, adaptive=False))
    return outputs[: stats.samples]
