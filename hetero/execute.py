"""Run a split batch: each engine its contiguous share, all at once, outputs gathered in input order.

Engines release the GIL inside their calls, so one Python thread per engine keeps every device busy
at once. A split run survives devices that fail on their share: what they did not finish is split
again over the devices still working, so every sample runs exactly once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

import numpy as np

from .devices import Device
from .engines import Engine, Timing
from .errors import HeteroError
from .feed import DeviceStream, feed_batch

log = logging.getLogger(__name__)


class ExecutionError(HeteroError):
    """Samples that no device could run: every device that could take them failed."""


@dataclass
class ShareResult:
    """What one device did with one contiguous slice of the batch."""

    device: Device
    engine: str
    start: int
    size: int
    predicted_s: float
    compile_s: float = 0.0  # spent building this device's engine in this process; 0 if cached
    timing: Timing | None = None  # summed over the calls that succeeded
    wall_s: float = 0.0  # from the start of the split run until this share finished
    error: str | None = None  # why the device stopped; samples from start + completed on ran elsewhere
    completed: int = 0
    calls: int = 0  # more than one when the share ran in chunks
    takes_over_from: str | None = None  # the failed device whose samples this share runs


# Given the indices of the engines still working and a number of samples: their shares and predicted seconds.
Replan = Callable[[list[int], int], tuple[list[int], list[float]]]


def _run_share(engine: Engine, share: ShareResult, batch: np.ndarray, limit: int | None, begin: float) -> np.ndarray:
    """On the engine's worker: the share through the data path in calls of at most `limit` samples, up to the
    first failure. Returns the outputs of the samples done, in order; the share records how far it got
    and why it stopped."""
    stats = DeviceStream(engine.device.name, engine.name, limit or len(batch))
    outputs = feed_batch(engine, batch, min(limit or len(batch), len(batch)), stats)
    share.calls = stats.chunks + (stats.error is not None)
    share.completed, share.error = stats.samples, stats.error
    share.timing = stats.timing if stats.chunks else None
    share.wall_s = time.perf_counter() - begin
    return outputs


def run_split(
    engines: Sequence[Engine],
    inputs: np.ndarray,
    shares: Sequence[int],
    predicted_s: Sequence[float],
    limits: Sequence[int | None] | None = None,
    replan: Replan | None = None,
) -> tuple[np.ndarray, list[ShareResult], float]:
    """Give each engine its contiguous slice of `inputs`, run all at once, gather outputs in input order.

    A share larger than its engine's limit (the largest batch its profile showed to fit) runs as
    consecutive chunks. When an engine fails, the samples it did not finish are split by `replan` over
    the engines still working and queued behind their work, so each sample runs exactly once. Results
    list the planned shares, one per engine, then those that took over. Without `replan`, or with no
    engine left, ExecutionError names every failure once all running shares are done.
    """
    limits = [None] * len(engines) if limits is None else limits
    working = set(range(len(engines)))
    results: list[ShareResult] = []
    running: dict[Future, tuple[int, ShareResult]] = {}
    pieces: list[tuple[int, np.ndarray]] = []
    unplaced = 0

    def launch(indices, start, sizes, predicted, takes_over_from=None):
        for i, size, seconds in zip(indices, sizes, predicted, strict=True):
            compile_s = 0.0 if takes_over_from else engines[i].load_s
            share = ShareResult(engines[i].device, engines[i].name, start, int(size), float(seconds), compile_s,
                                takes_over_from=takes_over_from)
            if size or takes_over_from is None:
                results.append(share)
            if size:
                batch = inputs[start : start + size]
                running[engines[i].on_worker(_run_share, engines[i], share, batch, limits[i], begin)] = (i, share)
            start += size

    preparing = [engine.on_worker(engine.prepare, size, limit)
                 for engine, size, limit in zip(engines, shares, limits) if size]
    wait(preparing)
    begin = time.perf_counter()
    launch(range(len(engines)), 0, shares, predicted_s)
    while running:
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            i, share = running.pop(future)
            outputs = future.result()
            if len(outputs):
                pieces.append((share.start, outputs))
            if share.error is None:
                continue
            working.discard(i)
            left = share.size - share.completed
            survivors = sorted(working)
            failed = f"{share.device.name} failed ({share.error})"
            try:
                moved, predicted = replan(survivors, left) if survivors and replan else ([], [])
            except HeteroError as exc:
                moved, predicted = [], []
                failed += f"; {exc}"
            if sum(moved) != left:
                log.warning(f"{failed}; no working device can take its last {left} samples")
                unplaced += left
                continue
            names = ", ".join(engines[j].device.name for j, size in zip(survivors, moved) if size)
            log.warning(f"{failed}; moving its last {left} samples to {names}")
            launch(survivors, share.start + share.completed, moved, predicted, share.device.name)
    wall_s = time.perf_counter() - begin
    if unplaced:
        failures = "; ".join(dict.fromkeys(f"{r.device.name} failed: {r.error}" for r in results if r.error))
        raise ExecutionError(f"{unplaced} of {len(inputs)} samples could not run: {failures}")
    pieces.sort(key=lambda piece: piece[0])
    return np.concatenate([out for _, out in pieces], axis=0), results, wall_s
