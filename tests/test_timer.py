"""hetero.timer: what is timed, in which order, and what the derived figures say."""

from __future__ import annotations

import itertools
import time

import pytest

from hetero.timer import Timed, Timer, interleave, noisy


def _ticking_clock(step: float = 1.0):
    """A clock that advances `step` each time it is read, so every timed stretch has a known length."""
    counter = itertools.count()
    return lambda: next(counter) * step


def test_timeit_warms_up_untimed_then_times_each_call_and_syncs_after_each():
    calls, syncs = [], []
    timer = Timer(lambda: calls.append(1), "f", sync=lambda: syncs.append(1))
    timed = timer.timeit(repeats=4, warmup=2)
    assert len(calls) == 6 and len(syncs) == 6
    assert len(timed.seconds) == 4 and timed.label == "f"


def test_interleave_alternates_the_timers_round_by_round():
    order = []
    timers = [Timer(lambda name=name: order.append(name), name) for name in "abc"]
    timed = interleave(timers, repeats=2, warmup=1)
    assert order == list("abc") * 3
    assert [t.label for t in timed] == list("abc") and all(len(t.seconds) == 2 for t in timed)


def test_adaptive_groups_short_calls_and_stops_at_its_limits():
    calls = []
    # each clock read advances 1 ms: a call "takes" 1 ms, so stretches of 50 ms group many calls
    timer = Timer(lambda: calls.append(1), clock=_ticking_clock(1e-3))
    timed = timer.adaptive(budget_s=0.0, min_repeats=3, max_repeats=10, stretch_s=0.05, warmup=1)
    assert len(timed.seconds) == 3  # budget spent at once: the minimum only
    assert len(calls) > 3 * 20  # grouped: many calls per timed repeat


def test_derived_figures():
    steady = Timed("x", (1.0, 1.0, 1.01, 0.99))
    assert steady.median == pytest.approx(1.0) and not steady.noisy
    assert steady.spread == pytest.approx(0.02)
    assert noisy([1.0, 1.5, 1.0, 2.0])
    assert "ms median of 4" in str(steady)


def test_interleave_lets_each_run_settle_before_it_starts(monkeypatch):
    events = []
    monkeypatch.setattr(time, "sleep", lambda seconds: events.append(("pause", seconds)))
    timers = [Timer(lambda name=name: events.append(("run", name)), name) for name in "ab"]
    interleave(timers, repeats=1, warmup=0, settle_s=0.2)
    assert events == [("pause", 0.2), ("run", "a"), ("pause", 0.2), ("run", "b")]


def test_timeit_times_stretches_of_number_calls_and_reports_seconds_per_call():
    calls = []
    timer = Timer(lambda: calls.append(1), clock=_ticking_clock(1.0))
    timed = timer.timeit(repeats=2, warmup=0, number=4)
    assert len(calls) == 8
    assert timed.seconds == (0.25, 0.25)  # one clock tick per stretch, shared by its 4 calls
