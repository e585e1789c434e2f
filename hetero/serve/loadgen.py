"""The benchmark's load generator: closed-loop clients and open-loop Poisson arrivals against any target that
`send` reaches, and what their outcomes come to (throughput, p50/p95/p99 latency, goodput).

A target is a factory of senders: each client thread calls it once for a sender of its own (its own connection),
then calls the sender once per request. A sender returns when the answer is in, raises Rejected when the server
turns the request away (HTTP 429, gRPC RESOURCE_EXHAUSTED), and raises anything else for any other failure.
This module imports no client library; hetero/serve/benchmark.py makes the senders."""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Sender = Callable[[], None]
Target = Callable[[], Sender]


class Rejected(Exception):
    """The server answered at once that it will not compute the request (429, RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class Outcome:
    latency_s: float  # from when the request was due to be sent (open loop: its arrival) to its answer
    status: str  # "ok", "rejected" or "error"


@dataclass(frozen=True)
class Stats:
    """One load point. Latency percentiles are over answered requests only (a rejection's few µs would flatter
    them); goodput counts requests answered within the deadline; throughputs are in samples per second."""

    load: str  # "4 clients" or "20/s"
    sent: int
    ok: int
    good: int  # answered within the deadline
    rejected: int
    errors: int
    seconds: float
    throughput: float
    goodput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def good_fraction(self) -> float:
        """The requests answered within the deadline, of those sent."""
        return self.good / self.sent if self.sent else 0.0


def summarize(load: str, outcomes: list[Outcome], seconds: float, request_batch: int, deadline_s: float) -> Stats:
    latencies = np.array([o.latency_s for o in outcomes if o.status == "ok"], dtype=float)
    good = int(np.count_nonzero(latencies <= deadline_s))
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) * 1e3 if len(latencies) else (math.nan,) * 3
    seconds = max(seconds, 1e-9)
    return Stats(load, len(outcomes), len(latencies), good, sum(o.status == "rejected" for o in outcomes),
                 sum(o.status == "error" for o in outcomes), seconds, len(latencies) * request_batch / seconds,
                 good * request_batch / seconds, float(p50), float(p95), float(p99))


def _timed(send: Sender, due: float) -> Outcome:
    try:
        send()
        status = "ok"
    except Rejected:
        status = "rejected"
    except Exception:  # any failure counts against the system, and the load goes on
        status = "error"
    return Outcome(time.perf_counter() - due, status)


def closed_loop(target: Target, clients: int, seconds: float) -> tuple[list[Outcome], float]:
    """`clients` threads, each sending its next request as soon as the last is answered, for `seconds`; the
    outcomes and the seconds from the start until the last answer."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    senders = [target() for _ in range(clients)]  # connections made before the clock starts
    start = time.perf_counter()
    end = start + seconds

    def client(send: Sender) -> None:
        mine = []
        while (now := time.perf_counter()) < end:
            mine.append(_timed(send, now))
        with lock:
            outcomes.extend(mine)

    _run_threads([lambda s=s: client(s) for s in senders])
    return outcomes, time.perf_counter() - start


def poisson_arrivals(rate: float, seconds: float, seed: int = 0) -> np.ndarray:
    """Arrival times (s from the start) of a Poisson process of `rate` per second over `seconds`."""
    rng = np.random.default_rng(seed)
    times, at = [], rng.exponential(1 / rate)
    while at < seconds:
        times.append(at)
        at += rng.exponential(1 / rate)
    return np.array(times)


def open_loop(target: Target, rate: float, seconds: float, workers: int = 64,
              seed: int = 0) -> tuple[list[Outcome], float]:
    """Requests arriving as a Poisson process of `rate` per second for `seconds`, whether or not the earlier
    ones are answered, sent by up to `workers` threads; a request's latency counts from its arrival, so that
    time waiting for a free worker counts too (no coordinated omission)."""
    arrivals = poisson_arrivals(rate, seconds, seed)
    due: queue.SimpleQueue[float | None] = queue.SimpleQueue()
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    senders = [target() for _ in range(max(1, min(workers, len(arrivals))))]
    start = time.perf_counter()
    for arrival in arrivals:
        due.put(start + float(arrival))
    for _ in senders:
        due.put(None)

    def worker(send: Sender) -> None:
        mine = []
        while (at := due.get()) is not None:
            if (wait := at - time.perf_counter()) > 0:
                time.sleep(wait)
            mine.append(_timed(send, at))
        with lock:
            outcomes.extend(mine)

    _run_threads([lambda s=s: worker(s) for s in senders])
    return outcomes, max(time.perf_counter() - start, seconds)


def _run_threads(bodies: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=body, daemon=True) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
