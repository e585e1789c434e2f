"""Timing code, as ``torch.utils.benchmark`` does it: a :class:`Timer` runs a callable and gives a
:class:`Timed` holding every raw time, from which the median and the spread are derived.

Every benchmark of hetero times through here, so warm-up, synchronisation and the noise flag mean the
same everywhere.  A profile's :class:`hetero.table.Measurement` flags noise with :func:`noisy` too.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

NOISY_IQR = 0.1  # times whose interquartile range passes 10% of their median are flagged
# ONNX Runtime's threads spin for tens of milliseconds after a call (its default): resnet-18 on TVM ran
# 3x slower right after an ONNX Runtime call on this 2-core machine, 10% slower after a 50 ms pause, and
# at its own speed after 200 ms. Runs compared side by side are kept this far apart.
SETTLE_S = 0.2


def noisy(seconds: Sequence[float]) -> bool:
    """Whether repeated times disagree enough that a figure drawn from them is doubtful."""
    q1, q3 = np.percentile(seconds, [25, 75])
    return bool((q3 - q1) / statistics.median(seconds) > NOISY_IQR)


@dataclass(frozen=True)
class Timed:
    """The raw times of one timed callable, in seconds per call."""

    label: str
    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median."""
        return (max(self.seconds) - min(self.seconds)) / self.median

    @property
    def noisy(self) -> bool:
        return noisy(self.seconds)

    def __str__(self) -> str:
        flag = ", noisy" if self.noisy else ""
        return f"{self.label}: {self.median * 1e3:.3f} ms median of {len(self.seconds)}{flag}"


class Timer:
    """Times ``run``: ``sync`` (a device's) is called after each timed stretch so that work queued
    on an accelerator counts; ``clock`` is ``time.perf_counter`` (wall) unless told otherwise."""

    def __init__(self, run: Callable[[], object], label: str = "", sync: Callable[[], object] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.run = run
        self.label = label
        self.sync = sync or (lambda: None)
        self.clock = clock

    def once(self, number: int = 1) -> float:
        """Seconds per call over ``number`` calls in a row."""
        start = self.clock()
        for _ in range(number):
            self.run()
        self.sync()
        return (self.clock() - start) / number

    def timeit(self, repeats: int, warmup: int = 1, number: int = 1) -> Timed:
        """``warmup`` untimed calls, then ``repeats`` timed stretches of ``number`` calls each."""
        for _ in range(warmup):
            self.once()
        return Timed(self.label, tuple(self.once(number) for _ in range(repeats)))

    def adaptive(self, budget_s: float, min_repeats: int = 5, max_repeats: int = 15,
                 stretch_s: float = 0.05, warmup: int = 3) -> Timed:
        """Repeats of about ``stretch_s`` each (short calls are timed in groups), at least
        ``min_repeats`` and then until ``budget_s`` is spent or ``max_repeats`` are taken."""
        for _ in range(warmup):
            self.once()
        number = max(1, int(stretch_s / max(self.once(), 1e-5)))
        times: list[float] = []
        deadline = self.clock() + budget_s
        while len(times) < max_repeats and (len(times) < min_repeats or self.clock() < deadline):
            times.append(self.once(number))
        return Timed(self.label, tuple(times))


def interleave(timers: Sequence[Timer], repeats: int, warmup: int = 1, settle_s: float = SETTLE_S) -> list[Timed]:
    """Each timer's times, taken in rounds that alternate the timers so that drift (clocks, heat,
    other processes) hits all alike: the way to compare two things measured in one run.  Each run
    starts `settle_s` after the one before, so that what one leaves running (spinning threads) is not
    charged to the next."""
    times: list[list[float]] = [[] for _ in timers]
    for round_index in range(warmup + repeats):
        for timer, kept in zip(timers, times):
            time.sleep(settle_s)
            seconds = timer.once()
            if round_index >= warmup:
                kept.append(seconds)
    return [Timed(timer.label, tuple(kept)) for timer, kept in zip(timers, times)]
