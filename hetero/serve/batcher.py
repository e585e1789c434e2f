"""The server's batcher: which requests go together, and to which device.

Requests wait in one queue, earliest deadline first. Each device has a thread of its own that, when the
device is free, pulls a batch sized from that device's own profile: the most queued samples (whole
requests, in deadline order) it is predicted to finish before the earliest of their deadlines. So a CPU
takes small batches and a GPU large ones, where Triton and Ray Serve give every instance one maximum
batch size. A request that no device can finish alone by its deadline is cut into pieces, each device
taking the part it computes by the time the devices together would finish it, and its outputs are
assembled in order before its future resolves.

Every prediction is the device's profile (hetero.table.Profile) times its recent slowdown: a high quantile
(SLOWDOWN_QUANTILE) of the measured over predicted seconds of its latest batches, so that a device busier or
slower than when it was profiled is given less. Not the median: admission fills the queue, and each device its
batch, up to the deadline, so with predictions that half the batches exceed about half the answers came late; on
a CPU shared with the server's own protocols and other processes one batch may take three times another of its
size. A measurement older than RECENT_S no longer counts: a device whose slowdown made admission refuse
everything would otherwise never compute again and never learn that it is fast again. Admission uses the same
predictions: a request that the devices, with the work queued ahead of it, are predicted to finish after its
deadline (less what its caller keeps to answer it), or one that would overfill the queue, is refused at once
(:class:`Rejected`) rather than answered late. One whose deadline passes while it waits, or that the devices are
predicted to finish after it when its turn comes, is dropped (:class:`Expired`) rather than computed late. A device
whose engine fails leaves the pool, and what it had not computed goes back to the queue for the others.

Each request has a key, and a batch holds requests of one key only: a network of named inputs served at
several sequence lengths runs each length on engines of its own (one compiled per length), profiled apart,
so that no call mixes lengths. A device has an engine and a profile per key; what it measured slower than
profiled (its slowdown) it is, whatever the key.

Batches run through the data path (hetero.feed.feed_batch) on each engine's own worker thread. The
batcher knows nothing of HTTP or gRPC: it takes arrays and hands back futures.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..engines import Engine
from ..errors import HeteroError, one_line
from ..feed import DeviceStream, feed_batch
from ..table import Profile

# what Observer.failed is told
REJECTED, EXPIRED, CANCELLED, ERROR = "rejected", "expired", "cancelled", "error"

RECENT_BATCHES = 20  # a device's slowdown is a quantile over its latest batches
RECENT_S = 3.0  # and over those of the last RECENT_S seconds: refusing everything, it is the profile again after that
SLOWDOWN_QUANTILE = 0.9  # that quantile: most batches finish within their prediction
TRUSTED_BATCHES = 3  # until it has run this many, 1.0 (its profile as measured) stands in for the rest
HEAD_CANDIDATES = 16  # queued pieces a device looks through for one it should start with
FINISH_PRECISION_S = 1e-4  # the resolution of the pool's predicted finishing time


class Rejected(HeteroError):
    """A request refused at once: predicted to miss its deadline, beyond the queue's bound, or arriving
    while the batcher closes. `retry_after_s` is the predicted time until there is room for it."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Expired(HeteroError):
    """A request whose deadline passed before it was computed: it was dropped, not computed late."""


class Observer(Protocol):
    """What the batcher reports as it works (the server's metrics implement it). It is called from the
    batcher's threads, never while the batcher holds its lock."""

    def batch(self, device: str, size: int, compute_s: float) -> None: ...

    def answered(self, queue_s: float, compute_s: float, within_deadline: bool) -> None: ...

    def failed(self, reason: str) -> None:
        """REJECTED, EXPIRED, CANCELLED or ERROR (computed with an error, or no device left)."""

    def device_out(self, device: str, error: str) -> None: ...


class _Unobserved:
    def batch(self, device: str, size: int, compute_s: float) -> None:
        pass

    def answered(self, queue_s: float, compute_s: float, within_deadline: bool) -> None:
        pass

    def failed(self, reason: str) -> None:
        pass

    def device_out(self, device: str, error: str) -> None:
        pass


@dataclass(eq=False)
class _Request:
    inputs: np.ndarray
    key: Hashable  # its batch's: only requests of one key are computed together
    deadline: float  # time.monotonic()
    arrived: float
    future: Future
    left: int  # samples not computed yet
    outputs: np.ndarray | None = None  # allocated when the first piece is computed
    started: float | None = None  # when a device first took a piece of it
    dropped: bool = False  # expired, cancelled or failed: nothing more of it is computed or delivered


@dataclass(order=True)
class _Piece:
    """Samples [start, end) of a request; queued by deadline, then by arrival, then by position."""

    deadline: float
    arrival: int
    start: int
    end: int = field(compare=False)
    request: _Request = field(compare=False)

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def inputs(self) -> np.ndarray:
        return self.request.inputs[self.start : self.end]

    def cut(self, samples: int) -> tuple[_Piece, _Piece]:
        """Its first `samples` samples, and the rest."""
        middle = self.start + samples
        return (_Piece(self.deadline, self.arrival, self.start, middle, self.request),
                _Piece(self.deadline, self.arrival, middle, self.end, self.request))


class _Plan:
    """What a device runs requests of one key with: its engine, that engine's profile and cost curve."""

    def __init__(self, engine: Engine, profile: Profile, samples: int):
        self.engine, self.profile = engine, profile
        self.call_limit = profile.max_batch()  # above it the profile predicts, and the feed runs, several calls
        self._profiled = profile.cost_curve(samples)  # seconds for 0..samples, never falling

    def curve(self, samples: int) -> np.ndarray:
        """Profiled seconds for 0..samples or more."""
        if samples >= len(self._profiled):
            self._profiled = self.profile.cost_curve(max(samples, 2 * len(self._profiled)))
        return self._profiled


class _Device:
    """One device in the pool: its engine and profile per key, its predictions, corrected by what its batches
    measured, and its record."""

    def __init__(self, name: str, plans: dict[Hashable, _Plan]):
        self.name, self.plans = name, plans
        self.working = True
        self.error: str | None = None
        self.batches = self.samples = 0
        self.busy: tuple[float, int, Hashable] | None = None  # when the batch it computes started, its samples, key
        self._ratios: deque[tuple[float, float]] = deque(maxlen=RECENT_BATCHES)  # (when, measured / profiled)
        # the slowdown, kept until a batch is learned or the oldest ratio counted expires: predictions run under
        # the batcher's lock, many to a request
        self._slowdown = 1.0
        self._slowdown_until = 0.0

    def _profiled_s(self, samples: int, key: Hashable) -> float:
        plan = self.plans.get(key)
        return math.inf if plan is None else float(plan.curve(samples)[samples])

    def predict_s(self, samples: int, key: Hashable) -> float:
        """Seconds for `samples` of `key`; never, where it has no engine for `key`."""
        return self._profiled_s(samples, key) * self.slowdown

    def capacity(self, seconds: float, samples: int, key: Hashable) -> int:
        """The most samples of `key`, up to `samples`, predicted to take at most `seconds`."""
        if seconds < 0 or key not in self.plans:
            return 0
        # the tolerance keeps predict_s(k) within the capacity of predict_s(k) seconds despite rounding
        profiled_s = seconds / self.slowdown * (1 + 1e-9)
        curve = self.plans[key].curve(samples)
        return max(int(np.searchsorted(curve[: samples + 1], profiled_s, side="right")) - 1, 0)

    def busy_s(self, now: float) -> float:
        """Seconds from `now` until the batch it computes is predicted to end; 0 when it is free."""
        if self.busy is None:
            return 0.0
        started, samples, key = self.busy
        return max(0.0, started + self.predict_s(samples, key) - now)

    @property
    def slowdown(self) -> float:
        """Measured over profiled seconds, SLOWDOWN_QUANTILE of the recent batches, 1.0 standing in for those
        missing."""
        now = time.monotonic()
        if now >= self._slowdown_until:
            recent = [(when, ratio) for when, ratio in self._ratios if now - when < RECENT_S]
            ratios = [ratio for _, ratio in recent] + [1.0] * max(0, TRUSTED_BATCHES - len(recent))
            self._slowdown = float(np.quantile(ratios, SLOWDOWN_QUANTILE))
            self._slowdown_until = min((when for when, _ in recent), default=math.inf) + RECENT_S
        return self._slowdown

    def learn(self, samples: int, key: Hashable, measured_s: float) -> None:
        profiled = self._profiled_s(samples, key)
        if 0 < profiled < math.inf and measured_s > 0:
            self._ratios.append((time.monotonic(), measured_s / profiled))
            self._slowdown_until = 0.0

    def step(self, samples: int, key: Hashable) -> int:
        """Samples per engine call for a batch of `samples` of `key`."""
        plan = self.plans[key]
        limits = [samples, plan.call_limit or samples, plan.engine.max_call or samples]
        return max(1, min(limits))


Pool = Sequence[tuple[Engine, Profile]]  # per device, the engine that computes on it and its profile


class Batcher:
    """One earliest-deadline-first queue served by every device in `devices`, each on a thread of its own.

    `devices` is a pool, (engine, profile) per device, or a pool per key: requests of a key run on its pool's
    engines, and a device that has no engine for a key leaves its requests to the others. `latency_s` is the
    deadline of a request that brings none; `max_queue` bounds the samples waiting.
    """

    def __init__(self, devices: Pool | Mapping[Hashable, Pool], latency_s: float, max_queue: int = 1024,
                 observer: Observer | None = None):
        pools = devices if isinstance(devices, Mapping) else {None: devices}
        plans: dict[str, dict[Hashable, _Plan]] = {}
        for key, pool in pools.items():
            names = [engine.device.name for engine, _ in pool]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"a batcher needs one or more devices, each named once; got {names} for {key!r}")
            for engine, profile in pool:
                plans.setdefault(engine.device.name, {})[key] = _Plan(engine, profile, max_queue)
        self.latency_s, self.max_queue = latency_s, max_queue
        self.observer: Observer = observer or _Unobserved()
        self._devices = [_Device(name, device_plans) for name, device_plans in plans.items()]
        self._heap: list[_Piece] = []
        self._queued_samples = 0
        self._in_flight = 0  # batches being computed: a failure among them may put pieces back
        self._arrivals = itertools.count()
        self._closing = False
        self._changed = threading.Condition()
        self._threads = [threading.Thread(target=self._serve, args=(device,), name=f"hetero-batcher-{device.name}",
                                          daemon=True) for device in self._devices]
        for thread in self._threads:
            thread.start()

    # -- the caller's side

    def submit(self, inputs: np.ndarray, deadline_s: float | None = None, reserve_s: float = 0.0,
               key: Hashable = None) -> Future:
        """Queue `inputs` (n samples of the network `key` names), already checked by the caller, to be answered
        within `deadline_s` seconds from now (None: latency_s), of which the caller keeps `reserve_s` to answer
        once the outputs are in: they are due that much earlier. The future's result is the n outputs. Raises
        Rejected at once when the request is predicted to miss its deadline, the queue has no room for it or
        the batcher is closing, and HeteroError when no device is left. Cancelling the future before a device
        takes the request drops it."""
        plans = [device.plans[key] for device in self._devices if key in device.plans]
        if not plans:
            raise ValueError(f"no device has an engine for {key!r}")
        future: Future = Future()
        if not len(inputs):  # nothing to queue: a piece of no samples would never be delivered
            network = plans[0].engine.network
            future.set_result(np.empty((0, *network.output_shape), network.output_dtype))
            return future
        now = time.monotonic()
        budget_s = (self.latency_s if deadline_s is None else deadline_s) - reserve_s
        request = _Request(inputs, key, now + budget_s, now, future, len(inputs))
        with self._changed:
            refusal = self._refusal(request, budget_s, reserve_s, now)
            if refusal is None:
                self._push(_Piece(request.deadline, next(self._arrivals), 0, len(inputs), request))
                self._changed.notify_all()
        if refusal is not None:
            self.observer.failed(REJECTED if isinstance(refusal, Rejected) else ERROR)
            raise refusal
        future.add_done_callback(lambda done: self._forget(request) if done.cancelled() else None)
        return future

    def _refusal(self, request: _Request, budget_s: float, reserve_s: float, now: float) -> HeteroError | None:
        """Why `request`, due `budget_s` from `now`, cannot be queued now, or None; under the lock."""
        samples, key = len(request.inputs), request.key
        if not any(device.working for device in self._devices):
            return HeteroError(f"no device is left: {self._outs()}")
        if self._closing:
            return Rejected("the server is shutting down",
                            self._pool_finish_s(self._as_samples_of(key, self._heap), now, key))
        if samples > self.max_queue:
            return Rejected(f"{samples} samples are more than the queue holds ({self.max_queue})",
                            self._pool_finish_s(self._as_samples_of(key, self._heap), now, key))
        if self._queued_samples + samples > self.max_queue:
            excess = self._queued_samples + samples - self.max_queue
            return Rejected(f"the queue is full ({self._queued_samples} of {self.max_queue} samples waiting)",
                            self._pool_finish_s(min(excess, self._as_samples_of(key, self._heap)), now, key))
        pieces_ahead = [piece for piece in self._heap if piece.deadline <= request.deadline]
        ahead = sum(piece.size for piece in pieces_ahead)
        finish_s = self._pool_finish_s(self._as_samples_of(key, pieces_ahead) + samples, now, key)
        if finish_s <= budget_s:
            return None
        idle_s = self._pool_finish_s(samples, now, key, all_free=True)
        why = (f"the devices need {idle_s * 1e3:.1f} ms for its {samples} samples even when idle" if idle_s > budget_s
               else f"it would be done in {finish_s * 1e3:.1f} ms, after the {ahead} samples queued ahead of it")
        kept = f", {reserve_s * 1e3:.1f} ms of it kept to answer" if reserve_s else ""
        return Rejected(f"predicted to miss its deadline of {(budget_s + reserve_s) * 1e3:.1f} ms{kept}: {why}",
                        finish_s - budget_s)

    def _forget(self, request: _Request) -> None:
        """A request cancelled while it waited: its pieces leave the queue."""
        with self._changed:
            request.dropped = True
            self._heap = [piece for piece in self._heap if piece.request is not request]
            heapq.heapify(self._heap)
            self._queued_samples = sum(piece.size for piece in self._heap)
            self._changed.notify_all()
        self.observer.failed(CANCELLED)

    @property
    def ready(self) -> bool:
        """Whether a request submitted now could be computed: some device works and the batcher is open."""
        with self._changed:
            return not self._closing and any(device.working for device in self._devices)

    def status(self) -> dict:
        """Each device's engines (one name per engine of its keys), whether it is in the pool (else the error
        that took it out), its batches and samples, and its slowdown against its profile; the requests and
        samples queued."""
        with self._changed:
            return {
                "devices": {
                    device.name: {"engine": ", ".join(sorted({plan.engine.name for plan in device.plans.values()})),
                                  "in": device.working, "error": device.error,
                                  "batches": device.batches, "samples": device.samples,
                                  "slowdown": device.slowdown}
                    for device in self._devices
                },
                "queued": len({id(piece.request) for piece in self._heap}),
                "queued_samples": self._queued_samples,
            }

    def close(self, drain: bool = True) -> None:
        """Take no more requests; with `drain`, compute every queued and in-flight one first, else fail the
        queued ones (those in flight still finish). Returns once every device's thread has ended."""
        settle: list[Callable[[], None]] = []
        with self._changed:
            self._closing = True
            if not drain:
                self._fail_queued(HeteroError("the server shut down before computing it"), settle)
            self._changed.notify_all()
        _run_all(settle)
        for thread in self._threads:
            thread.join()

    # -- predictions

    def _as_samples_of(self, key: Hashable, pieces: Sequence[_Piece]) -> int:
        """The samples of `key` the working devices are predicted to take as long for as for `pieces`, of any
        keys: a piece of another key counts its samples times the ratio of the two keys' predicted seconds at
        its size, summed over the devices that run both. The pool's predictions are in samples of one key."""
        total = 0.0
        for piece in pieces:
            other = piece.request.key
            if other == key:
                total += piece.size
                continue
            both = [d for d in self._devices if d.working and key in d.plans and other in d.plans]
            theirs = sum(device.predict_s(piece.size, other) for device in both)
            ours = sum(device.predict_s(piece.size, key) for device in both)
            total += piece.size * (theirs / ours if ours > 0 else 1.0)
        return math.ceil(total)

    def _pool_finish_s(self, samples: int, now: float, key: Hashable, all_free: bool = False) -> float:
        """Seconds from `now` until the working devices together compute `samples` more of `key`, each starting
        when its current batch is predicted to end (with `all_free`, at once) and taking the share it finishes
        by then: the time at which their capacities first add up to `samples`."""
        starts = {device: 0.0 if all_free else device.busy_s(now) for device in self._devices if device.working}
        if not starts:
            return math.inf
        low, high = 0.0, min(start + device.predict_s(samples, key) for device, start in starts.items())
        if not math.isfinite(high):
            return math.inf
        while high - low > FINISH_PRECISION_S:
            middle = (low + high) / 2
            if sum(device.capacity(middle - start, samples, key) for device, start in starts.items()) >= samples:
                high = middle
            else:
                low = middle
        return high

    def _share(self, device: _Device, piece: _Piece, now: float) -> int:
        """How many of `piece`'s samples `device`, free now, should take: all of them when it finishes them
        by their deadline; otherwise its part of a split by the devices' rates, which is none when the
        others finish the piece sooner without it."""
        key = piece.request.key
        if now + device.predict_s(piece.size, key) <= piece.deadline:
            return piece.size
        finish_s = self._pool_finish_s(piece.size, now, key)  # `device` is free: it starts at once
        return min(piece.size, device.capacity(finish_s, piece.size, key))

    # -- the queue, under the lock

    def _push(self, piece: _Piece) -> None:
        heapq.heappush(self._heap, piece)
        self._queued_samples += piece.size

    def _pop(self) -> _Piece:
        piece = heapq.heappop(self._heap)
        self._queued_samples -= piece.size
        return piece

    def _next_batch(self, device: _Device, now: float, settle: list[Callable[[], None]]) -> list[_Piece]:
        """The pieces `device` computes next, in deadline order and all of the first one's key, each request among
        them marked started; pieces whose deadline passed, or that the devices would finish after it, are dropped on
        the way. Empty when it should leave the queue to others."""
        batch: list[_Piece] = []
        left_alone: list[_Piece] = []
        head_deadline, samples, key, other_keys = math.inf, 0, None, 0
        while self._heap:
            piece = self._pop()
            request = piece.request
            if request.dropped or request.future.cancelled():
                continue
            if piece.deadline <= now:
                late_ms = (now - piece.deadline) * 1e3
                self._drop(request, Expired(f"its deadline passed {late_ms:.1f} ms before a device was free for it"),
                           EXPIRED, settle)
                continue
            if not batch:
                key = request.key
                if (now + device.predict_s(piece.size, key) > piece.deadline
                        and now + (finish_s := self._pool_finish_s(piece.size, now, key)) > piece.deadline):
                    late_ms = (now + finish_s - piece.deadline) * 1e3
                    self._drop(request, Expired(f"when a device was free for it, it was predicted to be done {late_ms:.1f}"
                                                " ms after its deadline"), EXPIRED, settle)
                    continue
                share = self._share(device, piece, now)
                if not share:  # the others finish it sooner; look for one this device should start with
                    left_alone.append(piece)
                    if len(left_alone) == HEAD_CANDIDATES:
                        break
                    continue
                if share < piece.size:  # split: the rest waits for the other devices
                    piece, rest = piece.cut(share)
                    left_alone.append(rest)
                    batch.append(piece)
                    break
                batch.append(piece)
                head_deadline, samples = piece.deadline, piece.size
            elif request.key != key:  # computed in a batch of its own key; look on for this one's
                left_alone.append(piece)
                other_keys += 1
                if other_keys == HEAD_CANDIDATES:
                    break
            elif now + device.predict_s(samples + piece.size, key) <= head_deadline:
                batch.append(piece)
                samples += piece.size
            else:
                left_alone.append(piece)
                break
        for piece in left_alone:
            self._push(piece)
        taken = []
        for piece in batch:
            request = piece.request
            if request.started is None:
                if not request.future.set_running_or_notify_cancel():
                    continue  # cancelled since it was popped; its callback accounts for it
                request.started = now
            taken.append(piece)
        return taken

    def _drop(self, request: _Request, error: HeteroError, reason: str, settle: list[Callable[[], None]]) -> None:
        """Compute nothing more of `request`; its future fails with `error` once the lock is released."""
        request.dropped = True

        def fail() -> None:
            if _settled(request.future, error=error):
                self.observer.failed(reason)

        settle.append(fail)

    def _fail_queued(self, error: HeteroError, settle: list[Callable[[], None]]) -> None:
        while self._heap:
            request = self._pop().request
            if not request.dropped:
                self._drop(request, error, ERROR, settle)

    def _deliver(self, piece: _Piece, outputs: np.ndarray, now: float, settle: list[Callable[[], None]]) -> None:
        """`outputs` of the first len(outputs) samples of `piece`; a request complete with them is answered."""
        request = piece.request
        if request.dropped:
            return
        if request.outputs is None and len(outputs) == len(request.inputs):
            request.outputs = outputs  # the whole request in one piece: no copy
        else:
            if request.outputs is None:
                request.outputs = np.empty((len(request.inputs), *outputs.shape[1:]), outputs.dtype)
            request.outputs[piece.start : piece.start + len(outputs)] = outputs
        request.left -= len(outputs)
        if request.left:
            return

        def answer() -> None:
            if _settled(request.future, result=request.outputs):
                self.observer.answered(request.started - request.arrived, now - request.started,
                                       now <= request.deadline)

        settle.append(answer)

    def _leave(self, device: _Device, error: str, settle: list[Callable[[], None]]) -> None:
        """`device` failed: out of the pool; with none left, every queued request fails."""
        device.working, device.error = False, error
        settle.append(lambda: self.observer.device_out(device.name, error))
        if not any(other.working for other in self._devices):
            self._fail_queued(HeteroError(f"no device is left: {self._outs()}"), settle)

    def _outs(self) -> str:
        return "; ".join(f"{device.name}: {device.error}" for device in self._devices if not device.working)

    # -- each device's thread

    def _serve(self, device: _Device) -> None:
        while (batch := self._take(device)) is not None:
            self._compute(device, batch)

    def _take(self, device: _Device) -> list[_Piece] | None:
        """The next batch for `device`, waiting for one; None once it is out of the pool, or once the batcher
        closes with nothing queued or in flight (a failing batch in flight puts its pieces back)."""
        while True:
            settle: list[Callable[[], None]] = []
            with self._changed:
                if not device.working or (self._closing and not self._heap and not self._in_flight):
                    return None
                now = time.monotonic()
                batch = self._next_batch(device, now, settle)
                if batch:
                    device.busy = (now, sum(piece.size for piece in batch), batch[0].request.key)
                    self._in_flight += 1
                elif not settle:
                    # what it left to faster devices changes when they take or finish a batch (they notify),
                    # or when the earliest deadline passes: then it is dropped here, not when one is free
                    self._changed.wait(max(0.0, self._heap[0].deadline - now) if self._heap else None)
            _run_all(settle)
            if batch:
                return batch

    def _compute(self, device: _Device, batch: list[_Piece]) -> None:
        """Run `batch` through the data path on `device`'s engine; deliver what it computed and queue again
        what it did not (all of it, or the rest after the engine failed)."""
        key = batch[0].request.key
        engine = device.plans[key].engine
        inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([piece.inputs for piece in batch])
        step = device.step(len(inputs), key)
        stats = DeviceStream(device.name, engine.name, step)
        try:
            outputs, compute_s = engine.on_worker(_timed_feed, engine, inputs, step, stats).result()
        except Exception as exc:  # noqa: BLE001 -- any failure of the device's call takes the device out
            stats.error, outputs, compute_s = one_line(exc), inputs[:0], 0.0
        settle: list[Callable[[], None]] = []
        with self._changed:
            now = time.monotonic()
            self._in_flight -= 1
            device.busy = None
            device.samples += len(outputs)
            offset = 0
            for piece in batch:
                computed = min(max(len(outputs) - offset, 0), piece.size)
                if computed:
                    self._deliver(piece, outputs[offset : offset + computed], now, settle)
                if computed < piece.size and not piece.request.dropped:
                    self._push(piece.cut(computed)[1])
                offset += piece.size
            if stats.error is not None:
                self._leave(device, stats.error, settle)
            else:
                device.batches += 1
                device.learn(len(inputs), key, compute_s)
                settle.append(lambda: self.observer.batch(device.name, len(inputs), compute_s))
            self._changed.notify_all()
        _run_all(settle)


def _timed_feed(engine: Engine, batch: np.ndarray, step: int, stats: DeviceStream) -> tuple[np.ndarray, float]:
    """feed_batch, on the engine's worker, with its seconds there: timed on the worker, so that they leave out
    any wait behind other work on it (the feed's own busy_s leaves out a call computed as it is launched)."""
    started = time.perf_counter()
    outputs = feed_batch(engine, batch, step, stats)
    return outputs, time.perf_counter() - started


def _settled(future: Future, result: np.ndarray | None = None, error: BaseException | None = None) -> bool:
    """Resolve `future`; False when it was cancelled first (a waiting request's client may give up at any time)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        return False
    return True


def _run_all(actions: list[Callable[[], None]]) -> None:
    """Resolve futures and tell the observer, outside the lock: a future's callbacks may call back in."""
    for action in actions:
        action()
